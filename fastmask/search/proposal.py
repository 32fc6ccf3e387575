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


def _summed_effect(grad: torch.Tensor, site_input: torch.Tensor, coeffs: Optional[torch.Tensor]) -> torch.Tensor:
    """sum over the batch of the per-image size |dL/dy * (r(x) - relu(x))|, float64."""
    return (grad.float() * _replacement_delta(site_input, coeffs)).abs().sum(dim=0).double()


def removal_costs(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
                  ) -> torch.Tensor:
    """First-order size of the loss change of removing each ReLU: float64 [MaskSet(model).total()], +inf where
    absent.

    For a present ReLU with input x and output y = relu(x), replacing it by r changes y by r(x) - relu(x); to first
    order image n's cross-entropy changes by e_n = dL_n/dy * (r(x) - relu(x)). The cost is sum_n |e_n|: the size of
    the change, which does not let large per-image effects of opposite sign cancel (a ReLU with such effects is not
    cheap to remove; ranked by |sum_n e_n| instead, BCD's models came out less accurate, bench/FIDELITY.md). Units:
    summed CE over the images. Runs in eval mode (train/eval flags restored) and computes gradients for the site
    outputs only, never weights.
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
                    sums[i] += _summed_effect(grad, captured[i][0], mask_set.sites[i].coeffs)
                captured.clear()
    finally:
        for handle in handles:
            handle.remove()
    costs = torch.cat([s.reshape(-1).cpu() for s in sums])
    costs[~mask_set.flat()] = math.inf
    return costs


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
            temperature: float) -> list[torch.Tensor]:
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

    # few enough to list them all
    if k == count or (count <= rt and math.comb(count, k) <= rt):
        subsets = [torch.tensor(c, dtype=torch.int64) for c in itertools.combinations(present.tolist(), k)]
        subsets.sort(key=lambda s: (float(costs[s].abs().sum()), s.tolist()))
        return subsets

    ranked = _ranked(costs, present, generator)
    size = min(count, max(math.ceil(pool * k), _smallest_pool(k, rt, count)))
    members, base = ranked[:size], _pool_preference(costs.abs()[ranked[:size]])

    candidates: list[torch.Tensor] = []
    seen: set[tuple[int, ...]] = set()
    heat = float(temperature)
    for _ in range(ATTEMPTS_PER_CANDIDATE * rt):
        if len(candidates) == rt:
            break
        logits = -base / heat if math.isfinite(heat) else torch.zeros_like(base)
        chosen = members[_gumbel_top_k(logits, k, generator)].sort().values
        key = tuple(chosen.tolist())
        if key in seen:
            heat *= 2.0
            continue
        seen.add(key)
        candidates.append(chosen)
    return candidates
