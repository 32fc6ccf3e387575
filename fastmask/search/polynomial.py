"""AutoReP-style replacement: a removed ReLU becomes a per-channel quadratic c0 + c1 x + c2 x^2 instead of the
identity, initialised by least squares to relu on the channel's own pre-activations.

The identity is the best linear stand-in for relu only when inputs are mostly positive; a quadratic fitted to the
channel's input distribution follows relu far closer (x^2 bends the way relu does), so each removal costs less and
finetuning starts nearer the original function. The coefficients are learnable and finetuned with the weights.

Only sites whose input is a normalization's output take the quadratic (MaskedReLU.normalized_input: in ResNet18
the ReLU after bn1, not the one after the residual add; every site of the pre-activation WRN). A quadratic of the
residual stream squares a sum that grows block after block: with three quarters of ResNet18's ReLUs removed at
random and BN statistics re-estimated, quadratics at every site gave non-finite outputs, quadratics after bn1 alone a
model more accurate than the identity's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import FastmaskError
from ..masks import MaskSet
from .scoring import _model_device, _ScoringMode

IDENTITY = (0.0, 1.0, 0.0)
# A channel's (equilibrated) normal equations with eigenvalue ratio below this are treated as singular.
SINGULAR_RATIO = 1e-10


def make_polynomial(model: nn.Module) -> nn.Module:
    """Gives every MaskedReLU whose input is normalized (MaskedReLU.normalized_input) and that has no coefficients a
    learnable [C, 3] Parameter set to the identity (0, 1, 0), on its mask's device, and marks the model's spec
    polynomial so checkpoints reload with them. Returns the model. Sites after a residual add keep the identity.

    New Parameters are not in optimizers made before this call: make those after it.
    """
    for site in MaskSet(model).sites:
        if site.coeffs is None and site.normalized_input:
            channels = site.shape[0]
            identity = torch.tensor([IDENTITY], dtype=torch.float32, device=site.mask.device).repeat(channels, 1)
            site.coeffs = nn.Parameter(identity)
    spec = getattr(model, "fastmask_spec", None)
    if isinstance(spec, dict):
        spec["polynomial"] = True
    return model


def _channel_major(x: torch.Tensor) -> torch.Tensor:
    """[N, C, ...] -> [C, N * ...] in float64 (a 2-D [N, D] input has D channels of one value each)."""
    return x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()


class _Moments:
    """Per channel: sums of x^0..x^4, of x^j * relu(x) for j = 0..2, and of relu(x)^2."""

    def __init__(self, channels: int, device: torch.device):
        self.power = torch.zeros(channels, 5, dtype=torch.float64, device=device)
        self.target = torch.zeros(channels, 3, dtype=torch.float64, device=device)
        self.relu_square = torch.zeros(channels, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        v = _channel_major(x)
        r = torch.relu(v)
        powers = [torch.ones_like(v), v, v * v]
        powers += [powers[2] * v, powers[2] * powers[2]]
        self.power += torch.stack([p.sum(dim=1) for p in powers], dim=1)
        self.target += torch.stack([(p * r).sum(dim=1) for p in powers[:3]], dim=1)
        self.relu_square += (r * r).sum(dim=1)

    def normal_matrix(self) -> torch.Tensor:
        p = self.power
        return torch.stack([p[:, 0:3], p[:, 1:4], p[:, 2:5]], dim=1)  # [C, 3, 3], A[i][j] = sum x^(i+j)

    def solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(coeffs [C, 3] float64, solved [C] bool); unsolvable channels get the identity."""
        a, b = self.normal_matrix(), self.target
        channels = a.shape[0]
        # Equilibrate with D = diag(1, s, s^2), s the channel's RMS input, before solving: raw moments up to x^4 are
        # badly scaled when inputs are far from unit size.
        count = self.power[:, 0]
        rms = (self.power[:, 2] / count.clamp(min=1.0)).sqrt()
        scale = torch.stack([torch.ones_like(rms), rms, rms * rms], dim=1)
        usable = (count > 0) & (rms > 0) & torch.isfinite(rms)
        scale = torch.where(usable.unsqueeze(1), scale, torch.ones_like(scale))
        a_scaled = a / (scale.unsqueeze(2) * scale.unsqueeze(1))
        b_scaled = b / scale
        eigen = torch.linalg.eigvalsh(a_scaled)
        well_posed = usable & (eigen[:, 0] > SINGULAR_RATIO * eigen[:, -1].clamp(min=0)) & (eigen[:, -1] > 0)
        coeffs = torch.tensor([IDENTITY], dtype=torch.float64, device=a.device).repeat(channels, 1)
        if well_posed.any():
            solved = torch.linalg.solve(a_scaled[well_posed], b_scaled[well_posed].unsqueeze(2)).squeeze(2)
            coeffs[well_posed] = solved / scale[well_posed]
        return coeffs, well_posed

    def mse(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Mean of (c0 + c1 x + c2 x^2 - relu(x))^2 per channel, from the moments: c^T A c - 2 c^T b + sum relu^2."""
        a = self.normal_matrix()
        quadratic = torch.einsum("ci,cij,cj->c", coeffs, a, coeffs)
        linear = (coeffs * self.target).sum(dim=1)
        return (quadratic - 2 * linear + self.relu_square).clamp(min=0) / self.power[:, 0].clamp(min=1.0)


def fit_polynomial(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> list[dict]:
    """Sets every polynomial site's coeffs to the per-channel least-squares fit of relu(x) ~ c0 + c1 x + c2 x^2 over
    that channel's inputs (all its positions) on `images`; channels whose normal equations are singular (e.g. a
    constant input) get the identity. Sites get coeffs first where make_polynomial gives them; the others (after a
    residual add) keep the identity and are not in the report.

    One forward pass in eval mode (flags restored) with the current masks and coefficients: a site's inputs are those
    the model feeds it now. The fit covers every position of a channel, kept or removed, since one set of coefficients
    serves all the channel's positions that are or will be removed. Returns per site: name, channels, fallback
    channels (identity kept), and the mean squared error to relu of the fit and of the identity on these images.
    """
    if images.shape[0] == 0:
        raise FastmaskError("fit_polynomial needs at least one image")
    if batch_size < 1:
        raise FastmaskError(f"batch_size must be >= 1, got {batch_size}")
    if MaskSet(model).carries_alphas():
        raise FastmaskError("fit_polynomial: the model still carries SNL alphas; binarize them first")
    make_polynomial(model)
    mask_set = MaskSet(model)
    named = [(name, site) for name, site in zip(mask_set.names, mask_set.sites, strict=True) if site.coeffs is not None]
    device = _model_device(model)
    moments = [_Moments(site.shape[0], device) for _, site in named]

    def hook_for(index: int):
        def hook(module, args):
            moments[index].add(args[0])
        return hook

    handles = [site.register_forward_pre_hook(hook_for(i)) for i, (_, site) in enumerate(named)]
    try:
        with _ScoringMode(model), torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                model(images[start:start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()

    report = []
    with torch.no_grad():
        for (name, site), moment in zip(named, moments, strict=True):
            coeffs, solved = moment.solve()
            site.coeffs.copy_(coeffs.to(site.coeffs.dtype))
            identity = torch.tensor([IDENTITY], dtype=torch.float64, device=coeffs.device).expand_as(coeffs)
            report.append({"site": name, "channels": int(coeffs.shape[0]), "fallback": int((~solved).sum()),
                           "mse_fit": float(moment.mse(coeffs).mean()),
                           "mse_identity": float(moment.mse(identity).mean())})
    return report
