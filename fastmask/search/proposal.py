"""Informed candidates: a first-order estimate of what removing each present ReLU costs, and candidates drawn from the
cheap end of it.

Uniform candidates (MaskSet.sample) spend most of a step's scoring on removals that are plainly harmful. One forward
and backward pass over the scoring subset gives every ReLU a Taylor estimate of the loss change its replacement
causes, so candidates can be drawn where removal is estimated to change little, while still differing from each
other so that scoring (or racing) chooses among real alternatives.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FastmaskError
from ..masks import MaskSet
from .scoring import _check_data, _model_device, _ScoringMode

# Draw attempts per wanted candidate before giving up on finding more distinct ones.
ATTEMPTS_PER_CANDIDATE = 20


def _replacement_delta(x: torch.Tensor, coeffs: Optional[torch.Tensor]) -> torch.Tensor:
    """r(x) - relu(x) in fp32, where r is the site's replacement (identity, or c0 + c1 x + c2 x^2 per channel)."""
    xf = x.float()
    if coeffs is None:
        return xf - torch.relu(xf)  # min(x, 0)
    view = (1, -1) + (1,) * (x.dim() - 2)
    c = coeffs.detach().float()
    replaced = c[:, 0].view(view) + c[:, 1].view(view) * xf + c[:, 2].view(view) * xf * xf
    return replaced - torch.relu(xf)


def _summed_effect(grad: torch.Tensor, site_input: torch.Tensor, coeffs: Optional[torch.Tensor], absolute: bool,
                   scale: float = 1.0) -> torch.Tensor:
    """sum over the batch of scale * dL/dy * (r(x) - relu(x)) (of its size per image when absolute), float64."""
    effect = grad.float() * _replacement_delta(site_input, coeffs) * scale
    return (effect.abs() if absolute else effect).sum(dim=0).double()


def removal_costs(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256, *,
                  absolute: bool = False) -> torch.Tensor:
    """First-order loss increase of removing each ReLU: float64 [MaskSet(model).total()], +inf where absent.

    For a present ReLU with input x and output y = relu(x), replacing it by r changes y by r(x) - relu(x); to first
    order the summed cross-entropy over `images` changes by sum_n dL/dy * (r(x) - relu(x)). Positive means the loss is
    estimated to rise. Units: summed CE over the images (divide by len(images) for the mean CE the scorer reports).
    absolute=True sums |dL/dy * (r(x) - relu(x))| per image instead: the size of the change, which does not let
    large per-image effects of opposite sign cancel (a ReLU with such effects is not cheap to remove).
    Runs in eval mode (train/eval flags restored) and computes gradients for the site outputs only, never weights.
    """
    return removal_and_restore_costs(model, images, labels, batch_size, absolute=absolute, restore=False)[0]


def removal_and_restore_costs(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                              *, absolute: bool = False, restore: bool = True
                              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(removal_costs, restore gains) from one forward and backward pass.

    The restore gain of an absent ReLU is the first-order loss decrease of putting it back: its output changes by
    relu(x) - r(x), so the summed cross-entropy falls by sum_n dL/dy * (r(x) - relu(x)), always signed (a gain must
    say which way the loss moves, as an SNL alpha's gradient does when it grows an alpha back). float64
    [MaskSet(model).total()], -inf where present; None when restore=False.
    """
    _check_data(images, labels)
    if batch_size < 1:
        raise FastmaskError(f"batch_size must be >= 1, got {batch_size}")
    mask_set = MaskSet(model)
    if mask_set.carries_alphas():
        raise FastmaskError("removal_costs: the model still carries SNL alphas; binarize them before estimating")
    if any(site.hypotheses is not None for site in mask_set.sites):
        raise FastmaskError("removal_costs: a site holds candidate hypotheses; clear them first")
    device = _model_device(model)
    sums = [torch.zeros(site.shape, dtype=torch.float64, device=device) for site in mask_set.sites]
    gains = [torch.zeros_like(s) for s in sums] if restore else None
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(index: int):
        def hook(module, args, output):
            captured[index] = (args[0].detach(), output)
        return hook

    handles = [site.register_forward_hook(hook_for(i)) for i, site in enumerate(mask_set.sites)]
    try:
        with _ScoringMode(model), torch.enable_grad():
            for start in range(0, images.shape[0], batch_size):
                x = images[start:start + batch_size].to(device)
                y = labels[start:start + batch_size].to(device)
                captured.clear()
                # Input grad on, so every site output is in the graph even when the weights are frozen; autograd.grad
                # then walks only what the site outputs need and leaves every .grad untouched.
                logits = model(x.detach().requires_grad_(True))
                loss = F.cross_entropy(logits.float(), y, reduction="sum")
                order = sorted(captured)
                outputs = [captured[i][1] for i in order]
                grads = torch.autograd.grad(loss, outputs, allow_unused=True)
                for i, grad in zip(order, grads, strict=True):
                    if grad is None:  # a site whose output does not reach the loss
                        continue
                    coeffs = mask_set.sites[i].coeffs
                    effect = _summed_effect(grad, captured[i][0], coeffs, absolute)
                    sums[i] += effect
                    if gains is not None:  # signed: the same sum unless the costs are absolute
                        gains[i] += _summed_effect(grad, captured[i][0], coeffs, absolute=False) if absolute \
                            else effect
                captured.clear()
    finally:
        for handle in handles:
            handle.remove()
    present = mask_set.flat()
    costs = torch.cat([s.reshape(-1).cpu() for s in sums])
    costs[~present] = math.inf
    if gains is None:
        return costs, None
    restore_gains = torch.cat([g.reshape(-1).cpu() for g in gains])
    restore_gains[present] = -math.inf
    return costs, restore_gains


def to_restore(gains: torch.Tensor, k: int) -> torch.Tensor:
    """The k absent ReLUs of largest positive restore gain (sorted CPU int64 flat indices; fewer when fewer are
    estimated to lower the loss). Ties go to the lower index, so every process picks the same."""
    gains = gains.detach().cpu().double().reshape(-1)
    if torch.isnan(gains).any():
        raise FastmaskError("to_restore: gains hold NaN")
    positive = (gains > 0).nonzero().squeeze(1)
    if k <= 0 or positive.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.sort(-gains[positive], stable=True).indices
    return positive[order[:k]].sort().values


class FinetuneCosts:
    """removal_costs' estimate summed over the batches a finetune trains on, at no extra pass.

    Inside the `with` block every training-mode forward that builds a graph hooks each site's output; when the
    finetune's backward reaches it, dL/dy * (r(x) - relu(x)) is summed per ReLU over the batch, times the batch size
    so that a mean loss counts like removal_costs' summed one (the finetune's loss, with its distillation term, not
    the scoring subset's cross-entropy). The finetune sees many more images than the scoring subset, and sees them
    while the weights move through the removals, as SNL's alphas do: its sums add to the subset's estimate.
    costs() is float64 [MaskSet(model).total()], 0 where no batch reached the ReLU (absent ones included: the fresh
    estimate they are added to marks those +inf).
    """

    def __init__(self, model: nn.Module, *, absolute: bool = False):
        self.mask_set = MaskSet(model)
        self.absolute = bool(absolute)
        self.sums: Optional[list[torch.Tensor]] = None
        self.handles: list = []

    def __enter__(self) -> "FinetuneCosts":
        self.handles = [site.register_forward_hook(self._hook_for(i)) for i, site in enumerate(self.mask_set.sites)]
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return False

    def _hook_for(self, index: int):
        site = self.mask_set.sites[index]

        def add(site_input: torch.Tensor, grad: torch.Tensor) -> None:
            if self.sums is None:
                self.sums = [torch.zeros(s.shape, dtype=torch.float64, device=s.mask.device)
                             for s in self.mask_set.sites]
            self.sums[index] += _summed_effect(grad, site_input, site.coeffs, self.absolute, scale=grad.shape[0])

        def hook(module, args, output):
            if module.training and output.requires_grad and module.hypotheses is None:
                site_input = args[0].detach()
                output.register_hook(lambda grad: add(site_input, grad))
        return hook

    def costs(self) -> torch.Tensor:
        if self.sums is None:
            return torch.zeros(self.mask_set.total(), dtype=torch.float64)
        return torch.cat([s.reshape(-1).cpu() for s in self.sums])


def channel_weights(mask_set: MaskSet) -> torch.Tensor:
    """Per ReLU, how many ReLUs its channel still has relative to the mean over its site's channels that have any:
    float64 [mask_set.total()] (1 for sites without channels, [D]; absent ReLUs get their channel's value).

    Multiplied into the absolute estimate (bcd.concentrate channels), it makes a ReLU left with few others in an
    otherwise linear channel cheaper and one in a channel that is still mostly nonlinear dearer, so the kept ReLUs
    gather in fewer channels, as SNL's do (bench/FIDELITY.md). The mean is over channels in use, so a site's weights
    average about 1 and the estimate's balance between sites stays.
    """
    parts = []
    for site in mask_set.sites:
        mask = site.mask.detach().cpu()
        if mask.dim() < 2:
            parts.append(torch.ones(mask.numel(), dtype=torch.float64))
            continue
        per_channel = mask.reshape(mask.shape[0], -1).sum(dim=1).double()
        used = per_channel[per_channel > 0]
        mean = float(used.mean()) if used.numel() else 1.0
        weight = (per_channel / mean).view(-1, *([1] * (mask.dim() - 1))).expand(mask.shape)
        parts.append(weight.reshape(-1))
    return torch.cat(parts)


def _gumbel_top_k(logits: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k indices drawn without replacement with probabilities softmax(logits) (the Gumbel-top-k trick)."""
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64).clamp_(1e-300, 1.0)
    keys = logits - torch.log(-torch.log(uniform))
    return torch.topk(keys, k).indices


def _smallest_pool(k: int, rt: int, present: int) -> int:
    """The smallest pool size holding at least 2 * rt distinct k-subsets (capped at the present count)."""
    size = k
    while size < present and math.comb(size, k) < 2 * rt:
        size += 1
    return size


def site_quotas(present: list[int], k: int) -> list[int]:
    """k split over sites in proportion to their present ReLUs: each site gets floor(k * present / total), and what
    is left goes one each to the sites with the largest remainders (ties: the larger site, then the earlier). A quota
    never exceeds its site's present count."""
    total = sum(present)
    if not 0 <= k <= total:
        raise FastmaskError(f"cannot split {k} removals over sites holding {total} present ReLUs")
    if k == 0:
        return [0] * len(present)
    quotas = [k * p // total for p in present]
    order = sorted(range(len(present)), key=lambda i: (-(k * present[i] % total), -present[i], i))
    for i in order[:k - sum(quotas)]:
        quotas[i] += 1
    return quotas


def _ranked(costs: torch.Tensor, present: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`present` (flat indices) cheapest |cost| first; ties broken at random (many ReLUs cost exactly 0: inputs never
    negative on the subset)."""
    shuffled = present[torch.randperm(present.numel(), generator=generator)]
    return shuffled[torch.sort(costs[shuffled].abs(), stable=True).indices]


def _pool_preference(member_costs: torch.Tensor) -> torch.Tensor:
    """A pool's |costs| scaled to [0, 1] over the pool (0: its cheapest), so the temperature is unit-free."""
    spread = float(member_costs.max() - member_costs.min())
    return (member_costs - member_costs.min()) / spread if spread > 0 else torch.zeros_like(member_costs)


def propose(costs: torch.Tensor, k: int, rt: int, generator: torch.Generator, *, pool: float,
            temperature: float, site_sizes: Optional[list[int]] = None) -> list[torch.Tensor]:
    """rt distinct candidates of k present ReLUs each (sorted CPU int64 flat indices), drawn from the cheap end.

    Cheap means a small |cost|: the smallest estimated change, not the most negative estimate. The most negative
    first-order estimates belong to the largest perturbations, where a linear estimate fails worst, so drawing from
    them picks the most harmful removals (on small ResNets they raised the loss 5-20x more than uniform candidates).
    Rule: the pool is the ceil(pool * k) present ReLUs of smallest |cost| (ties broken at random), grown when needed
    so it holds at least 2 * rt distinct k-subsets. Each candidate is a Gumbel-top-k draw from the pool with logits
    -(|cost| - min) / (temperature * (max - min)) over the pool: the preference is unit-free (the cost scale changes
    with the model and the subset size), temperature=inf gives uniform k-subsets of the pool, small values approach
    its cheapest k. The pool bounds how far a candidate strays from the estimate; sampling inside it keeps candidates
    diverse, since a first-order estimate misses interactions between removed ReLUs.

    site_sizes (the sites' ReLU counts, in the order of the flat index) draws per site instead: each site gives
    site_quotas of the k, in proportion to its present ReLUs, each drawn by the rule above from that site's own pool
    (pool * quota of its cheapest, its own cost spread). The estimate then chooses which ReLUs of a site go, not how
    many: the share of each site stays that of the model the search starts from.

    A draw equal to an earlier candidate is discarded and the temperature doubled, so candidates always differ. When
    fewer than rt distinct k-subsets of the present ReLUs exist, every one is returned (smallest total |cost| first).
    Deterministic given the generator's state; +inf costs mark absent ReLUs, which are never proposed.
    """
    costs = costs.detach().cpu().double().reshape(-1)
    if torch.isnan(costs).any():
        raise FastmaskError("propose: costs hold NaN")
    if k < 1 or rt < 1:
        raise FastmaskError(f"propose needs k >= 1 and rt >= 1, got k={k}, rt={rt}")
    if not pool >= 1.0:
        raise FastmaskError(f"pool must be >= 1 (a multiple of k), got {pool}")
    if not temperature > 0:
        raise FastmaskError(f"temperature must be > 0, got {temperature}")
    present = torch.isfinite(costs).nonzero().squeeze(1)
    count = present.numel()
    if k > count:
        raise FastmaskError(f"cannot propose {k} ReLUs: only {count} are present")

    # few enough to list them all (with quotas, only when every present ReLU goes: a listing ignores the sites)
    if k == count or (site_sizes is None and count <= rt and math.comb(count, k) <= rt):
        subsets = [torch.tensor(c, dtype=torch.int64) for c in itertools.combinations(present.tolist(), k)]
        subsets.sort(key=lambda s: (float(costs[s].abs().sum()), s.tolist()))
        return subsets

    size_of_change = costs.abs()
    if site_sizes is None:
        groups = [(present, k)]
    else:
        if sum(site_sizes) != costs.numel():
            raise FastmaskError(f"propose: site sizes sum to {sum(site_sizes)}, costs hold {costs.numel()}")
        offsets = [0, *itertools.accumulate(site_sizes)]
        in_site = [present[(present >= a) & (present < b)] for a, b in zip(offsets[:-1], offsets[1:])]
        groups = [(members, q) for members, q in zip(in_site, site_quotas([m.numel() for m in in_site], k)) if q]
    pools = []
    for members, quota in groups:
        ranked = _ranked(costs, members, generator)
        size = min(ranked.numel(), max(math.ceil(pool * quota), _smallest_pool(quota, rt, ranked.numel())))
        pools.append((ranked[:size], _pool_preference(size_of_change[ranked[:size]]), quota))

    candidates: list[torch.Tensor] = []
    seen: set[tuple[int, ...]] = set()
    heat = float(temperature)
    for _ in range(ATTEMPTS_PER_CANDIDATE * rt):
        if len(candidates) == rt:
            break
        chosen = torch.cat([members[_gumbel_top_k(-base / heat if math.isfinite(heat) else torch.zeros_like(base),
                                                   quota, generator)] for members, base, quota in pools]).sort().values
        key = tuple(chosen.tolist())
        if key in seen:
            heat *= 2.0
            continue
        seen.add(key)
        candidates.append(chosen)
    return candidates
