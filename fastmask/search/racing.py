"""Successive halving over candidate masks: score everyone on a small slice of the scoring subset, keep the better
1/eta, grow the slice by eta, and score the last survivors on the whole subset.

Exact scoring spends rt * n image-forwards per step. Most candidates are plainly worse than the best after a few
hundred images, so racing spends roughly (rounds + 1) * rt * first_slice instead and keeps the full-subset score,
which is what acceptance (drop < ADT) needs, for the candidates still in contention.

Elimination ranks by mean cross-entropy, whatever the criterion: on a slice of a few hundred images accuracy moves in
steps of several tenths of a point and ties are common, while the loss is continuous and varies less from slice to
slice at equal size. The final pick among survivors, scored on the whole subset, follows the criterion (accuracy with
loss as tie-break, or loss), so acceptance means the same as in exact scoring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..distributed import Group
from ..errors import FastmaskError
from .scoring import CRITERIA, score_hypotheses

# Smallest default first slice: below a few hundred images the loss of a slice says little about the subset's.
MIN_FIRST_SLICE = 256


@dataclass
class RaceResult:
    order: list[int]  # every candidate, best first: survivors by the final pick, then by the round they fell in
    best: int  # index into the candidates: the accepted one, else the fallback (best survivor)
    survivors: list[int]  # candidates scored on the whole subset, best first
    accuracy: list[float]  # survivors' whole-subset accuracy (percent), aligned with `survivors`
    loss: list[float]  # survivors' whole-subset mean cross-entropy, aligned with `survivors`
    accepted: Optional[int]  # `best` when its whole-subset drop < adt (reference and adt given), else None
    forward_images: int  # sum over rounds of candidates in the round * images in the round
    rounds: list[dict] = field(default_factory=list)  # per round: images, candidates scored, survivors kept

    @property
    def best_scores(self) -> tuple[float, float]:
        """(accuracy %, mean CE) of `best` on the whole subset."""
        position = self.survivors.index(self.best)
        return self.accuracy[position], self.loss[position]


def default_first_slice(candidates: int, images: int, eta: int) -> int:
    """The slice that leaves about eta survivors for the whole subset: n / eta^(ceil(log_eta K) - 1), at least
    MIN_FIRST_SLICE images (or the whole subset when smaller)."""
    if candidates <= 1:
        return images
    cuts = max(0, math.ceil(math.log(candidates) / math.log(eta) - 1e-9) - 1)
    return min(images, max(MIN_FIRST_SLICE, math.ceil(images / eta ** cuts)))


def _final_key(criterion: str, accuracy: float, loss: float, index: int) -> tuple:
    if criterion == "accuracy":
        return (-accuracy, loss, index)
    return (loss, index)


def race(model: nn.Module, candidates: Sequence[torch.Tensor], images: torch.Tensor, labels: torch.Tensor, *,
         criterion: str = "accuracy", reference: Optional[tuple[float, float]] = None, adt: Optional[float] = None,
         first_slice: Optional[int] = None, eta: int = 2, batch_size: int = 512, shuffle_seed: Optional[int] = 0,
         fused: Optional[bool] = None, memory_budget_mb: Optional[float] = None, chunk_size: Optional[int] = None,
         group: Optional[Group] = None) -> RaceResult:
    """Successive halving of `candidates` (flat MaskSet indices to remove) on the scoring subset.

    Round r scores the survivors on the first n_r images of the subset (n_0 = first_slice, default
    default_first_slice(K, n, eta); n_{r+1} = eta * n_r) and keeps the ceil(1/eta) share with the lowest loss (ties:
    lower index). Once n_r reaches the subset, or one candidate is left, the survivors are scored on the whole
    subset in its given order and ranked by the criterion. Slices are prefixes of a fixed shuffle of the subset
    (shuffle_seed; None keeps the given order), so a subset stored in class order still gives unbiased slices.
    With `reference` (the current model's whole-subset (accuracy, loss), from score_current) and `adt`, `accepted` is
    the best survivor when its drop < adt. Deterministic; the model's masks and train/eval flags are left unchanged.
    With a `group` (torchrun), every round's scoring is shared out (score_hypotheses) and every process returns the
    same result; `chunk_size` caps the candidates per stacked pass.
    """
    if criterion not in CRITERIA:
        raise FastmaskError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if (reference is None) != (adt is None):
        raise FastmaskError("pass both reference and adt to accept a candidate, or neither")
    if not candidates:
        raise FastmaskError("race needs at least one candidate")
    if int(eta) != eta or eta < 2:
        raise FastmaskError(f"eta must be an integer >= 2, got {eta}")
    if labels.shape[0] != images.shape[0] or images.shape[0] == 0:
        raise FastmaskError(f"race needs matching, non-empty images and labels ({images.shape[0]} vs "
                            f"{labels.shape[0]})")
    eta = int(eta)
    total = images.shape[0]
    n = default_first_slice(len(candidates), total, eta) if first_slice is None else int(first_slice)
    if n < 1:
        raise FastmaskError(f"first_slice must be >= 1, got {first_slice}")
    score_options = dict(batch_size=batch_size, fused=fused, memory_budget_mb=memory_budget_mb,
                         chunk_size=chunk_size, group=group)
    order_of_images = None
    if shuffle_seed is not None and n < total:
        generator = torch.Generator().manual_seed(int(shuffle_seed))
        order_of_images = torch.randperm(total, generator=generator)

    alive = list(range(len(candidates)))
    eliminated: list[list[int]] = []  # per round, the fallen, best first
    rounds: list[dict] = []
    spent = 0
    while n < total and len(alive) > 1:
        if order_of_images is None:
            slice_images, slice_labels = images[:n], labels[:n]
        else:
            take = order_of_images[:n]
            slice_images, slice_labels = images[take.to(images.device)], labels[take.to(labels.device)]
        scores = score_hypotheses(model, [candidates[i] for i in alive], slice_images, slice_labels, **score_options)
        spent += len(alive) * n
        ranked = sorted(range(len(alive)), key=lambda j: (float(scores.loss[j]), alive[j]))
        keep = max(1, math.ceil(len(alive) / eta))
        eliminated.append([alive[j] for j in ranked[keep:]])
        rounds.append({"images": n, "candidates": len(alive), "kept": keep})
        alive = sorted(alive[j] for j in ranked[:keep])
        n *= eta

    scores = score_hypotheses(model, [candidates[i] for i in alive], images, labels, **score_options)
    spent += len(alive) * total
    rounds.append({"images": total, "candidates": len(alive), "kept": len(alive)})
    final = sorted(range(len(alive)), key=lambda j: _final_key(criterion, float(scores.accuracy[j]),
                                                               float(scores.loss[j]), alive[j]))
    survivors = [alive[j] for j in final]
    accuracy = [float(scores.accuracy[j]) for j in final]
    loss = [float(scores.loss[j]) for j in final]
    best = survivors[0]
    accepted = None
    if reference is not None:
        drop = reference[0] - accuracy[0] if criterion == "accuracy" else loss[0] - reference[1]
        if drop < adt:
            accepted = best
    order = survivors + [i for fallen in reversed(eliminated) for i in fallen]
    return RaceResult(order=order, best=best, survivors=survivors, accuracy=accuracy, loss=loss, accepted=accepted,
                      forward_images=spent, rounds=rounds)
