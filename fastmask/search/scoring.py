"""score_hypotheses: K candidate masks scored in one stacked pass, with a shared prefix, chunking and early stop.

Candidates share every weight and differ only in masks, so the batch is the scoring images repeated K times
([K*N, ...]) and each MaskedReLU a candidate touches gets `hypotheses` [K, *shape]: image n uses mask n // N.
Blocks before the first block any candidate touches run once at batch N and their output is expanded K times.
K is cut into chunks whose activations fit a memory budget; on the CPU, chunk and image batch are also cut to the pass
size that timing found fastest per image (cpu_pass), and freed activations stay in the process (cpu_memory). With a
stop rule, chunks are scored in order and scoring stops after the first chunk holding a passing candidate, so the
accepted one is the one a sequential loop would accept.
Polynomial sites keep their coefficients on both paths: only the masks are stacked, the replacement is the site's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import cpu_memory
from ..distributed import Group
from ..errors import FastmaskError
from ..masks import MaskSet
from ..models.external import ConvertedModel
from ..ops import backends
from . import cpu_pass, fused_forward, fused_graph

CRITERIA = ("accuracy", "loss")
# Activations live at once inside one block (input, conv output, intermediate, shortcut): the budget's multiplier.
LIVE_ACTIVATIONS = 4
DEFAULT_CPU_BUDGET_MB = 512
CUDA_BUDGET_FRACTION = 0.5
# One stacked activation stays under 2^31 elements, the limit of 32-bit indexing in cuDNN and library kernels.
MAX_ELEMENTS_PER_TENSOR = 2**31 - 1

__all__ = ["CRITERIA", "HypothesisScores", "first_differing_block", "score_current", "score_hypotheses"]


@dataclass
class HypothesisScores:
    accuracy: torch.Tensor  # [K] float64 percent; nan = not scored
    loss: torch.Tensor  # [K] float64 mean cross-entropy; nan = not scored
    correct: torch.Tensor  # [K] int64; -1 = not scored
    scored: int  # candidates scored: always a prefix 0..scored-1
    accepted: Optional[int] = None  # first candidate whose drop < adt, when a stop rule was given

    def drop(self, reference: tuple[float, float], criterion: str = "accuracy") -> torch.Tensor:
        """Per-candidate drop against the reference (accuracy points, or loss increase); nan where not scored."""
        ref_acc, ref_loss = reference
        return ref_acc - self.accuracy if criterion == "accuracy" else self.loss - ref_loss


# ---- the model as stages: stem, blocks..., head ------------------------------------------------------------------
class _Stages:
    """The model cut where it can be cut: stem, each block, head (or the whole model as one stage).

    site_stage[s] is the stage holding site s; a site outside every block counts as stage 0, since stem and head
    are methods whose modules cannot be told apart, so a candidate there repeats the whole model.
    """

    def __init__(self, model: nn.Module, mask_set: MaskSet, fused: bool):
        self.fused = fused
        blocks = list(getattr(model, "blocks", []) or [])
        has_stages = blocks and callable(getattr(model, "stem", None)) and callable(getattr(model, "head", None))
        if fused and isinstance(model, ConvertedModel):
            # The fused graph has stages of its own (its chains are single calls); sites are found in them the same way.
            stages = fused_graph.fused_stages(model.net, fused_forward.conv_bn_act_or_raise())
            self.body, self.head = stages[:-1] or stages, (stages[-1] if len(stages) > 1 else (lambda x: x))
            owner = {id(m): index for index, stage in enumerate(self.body) for m in stage.modules()}
        elif has_stages:
            runner = fused_forward.FusedBlocks(blocks) if fused else None
            self.body: list[Callable] = [model.stem]
            self.body += [runner.block_forward(i) if runner else block for i, block in enumerate(blocks)]
            self.head: Callable = model.head
            owner = {id(m): index + 1 for index, block in enumerate(blocks) for m in block.modules()}
        else:
            if fused:
                raise FastmaskError("fused scoring needs a model from fastmask.models (stem, blocks, head) or a "
                                    "converted one; pass fused=False for other models")
            self.body, self.head, owner = [model], (lambda x: x), {}
        self.site_stage = [owner.get(id(site), 0) for site in mask_set.sites]

    def first_stage(self, touched_sites: Sequence[int]) -> int:
        """The first stage where the candidates can differ; len(body) when none touches anything."""
        return min((self.site_stage[s] for s in touched_sites), default=len(self.body))


def _touched_sites(mask_set: MaskSet, candidates: Sequence[torch.Tensor]) -> list[int]:
    flats = [c.reshape(-1).cpu() for c in candidates if c.numel()]
    if not flats:
        return []
    return sorted(set(mask_set.site_of(torch.cat(flats)).tolist()))


def first_differing_block(model: nn.Module, candidates: Sequence[torch.Tensor]) -> Optional[int]:
    """Index into model.blocks of the first block any candidate touches: where batched scoring starts repeating
    the batch K times (the stem and every block before it run once). -1 when a candidate touches a site outside
    the blocks (or the model has none), so everything repeats; None when no candidate changes any site."""
    mask_set = MaskSet(model)
    stages = _Stages(model, mask_set, fused=False)
    first = stages.first_stage(_touched_sites(mask_set, candidates))
    return None if first >= len(stages.body) else first - 1


# ---- modes and transient state --------------------------------------------------------------------------------
class _ScoringMode:
    """Eval mode for the duration, then every module's own train/eval flag back (not one flag for all)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self

    def __exit__(self, *exc):
        for module, flag in self.flags:
            module.training = flag
        return False


def _check_model(mask_set: MaskSet) -> None:
    if mask_set.carries_alphas():
        raise FastmaskError("score_hypotheses: the model still carries SNL alphas; binarize them (alpha = None) "
                            "before scoring masks")


def _has_stages(model: nn.Module) -> bool:
    return bool(list(getattr(model, "blocks", []) or [])) and callable(getattr(model, "stem", None)) \
        and callable(getattr(model, "head", None))


def _use_fused(fused: Optional[bool], device: torch.device, model: Optional[nn.Module] = None) -> bool:
    if fused is None:
        # Without Triton the fused op falls back to separate torch ops: slower than cuDNN BN + the CUDA kernel. A
        # model with neither stem/blocks/head nor a graph to rewrite takes the generic path: the whole model, stacked.
        return (device.type == "cuda" and fused_forward.available() and backends.triton_supports("cuda")
                and (model is None or _has_stages(model) or isinstance(model, ConvertedModel)))
    if fused and not fused_forward.available():
        raise FastmaskError(f"fused scoring needs fastmask.ops.conv_bn_act, which is unavailable here "
                            f"({fused_forward.unavailable_reason()}); pass fused=False")
    return bool(fused)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


# ---- accumulation -----------------------------------------------------------------------------------------------
def _accumulate(logits: torch.Tensor, labels: torch.Tensor, groups: int, correct: torch.Tensor,
                loss_sum: torch.Tensor) -> None:
    """Adds one batch's per-group correct counts and summed CE ([groups*N] logits, [N] labels)."""
    n = labels.shape[0]
    tiled = labels.repeat(groups)
    per_image = F.cross_entropy(logits.float(), tiled, reduction="none").view(groups, n)
    hits = (logits.argmax(dim=1) == tiled).view(groups, n)
    correct += hits.sum(dim=1)
    loss_sum += per_image.double().sum(dim=1)


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device):
    """Batches of at most batch_size images, of near-equal sizes: no short last batch, which costs a pass for a few
    images and may round differently on the CPU (see cpu_pass.MIN_ROWS), so that scores do not depend on where the
    pass size cuts the images."""
    if batch_size < 1:
        raise FastmaskError(f"batch_size must be >= 1, got {batch_size}")
    total = images.shape[0]
    count = math.ceil(total / batch_size)
    for index in range(count):
        start, end = index * total // count, (index + 1) * total // count
        yield images[start:end].to(device, non_blocking=True), labels[start:end].to(device, non_blocking=True)


def _check_data(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.shape[0] == 0:
        raise FastmaskError("scoring needs at least one image")
    if labels.shape[0] != images.shape[0]:
        raise FastmaskError(f"{images.shape[0]} images but {labels.shape[0]} labels")


# ---- public -----------------------------------------------------------------------------------------------------
def score_current(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512,
                  *, fused: Optional[bool] = None) -> tuple[float, float]:
    """(accuracy %, mean CE) of the model with its current masks, in eval mode (the mode is restored after)."""
    _check_data(images, labels)
    device = _model_device(model)
    if device.type == "cpu":
        cpu_memory.keep_freed_memory()
    mask_set = MaskSet(model)
    _check_model(mask_set)
    stages = _Stages(model, mask_set, _use_fused(fused, device, model))
    with _ScoringMode(model), torch.inference_mode():
        correct = torch.zeros(1, dtype=torch.int64, device=device)
        loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
        for x, y in _batches(images, labels, batch_size, device):
            for stage in stages.body:
                x = stage(x)
            _accumulate(stages.head(x), y, 1, correct, loss_sum)
    total = images.shape[0]
    return 100.0 * int(correct[0]) / total, float(loss_sum[0]) / total


def score_hypotheses(model: nn.Module, candidates: Sequence[torch.Tensor], images: torch.Tensor,
                     labels: torch.Tensor, *, reference: Optional[tuple[float, float]] = None,
                     adt: Optional[float] = None, criterion: str = "accuracy", batch_size: int = 512,
                     memory_budget_mb: Optional[float] = None, fused: Optional[bool] = None,
                     chunk_size: Optional[int] = None, group: Optional[Group] = None) -> HypothesisScores:
    """Scores K candidates (each: flat MaskSet indices to remove from the current masks) on fixed images.

    With `reference` (accuracy, loss of the current masks) and `adt`, chunks are scored in order and scoring
    stops after the first chunk holding a candidate whose drop < adt; `accepted` is the first such index.
    `memory_budget_mb` bounds one chunk's activations plus the kept outputs of the shared prefix (half each when
    there is a prefix; default: half the free GPU memory, torch's cache counted as free, or 512 MB on the CPU; on the
    CPU, candidates per chunk and then images per batch are also cut to the pass size cpu_pass measured fastest);
    `fused` runs blocks through fastmask.ops.conv_bn_act (None: on CUDA when available); `chunk_size` caps the
    candidates per chunk below what the budget allows.
    With a `group` (torchrun), chunk i is scored by process i % size, a wave of `size` chunks at a time, and the
    results are gathered, so every process returns the same scores. Chunks are cut as one process cuts them (capped
    so that every process gets one when there are enough candidates): with the same `chunk_size`, each candidate's
    numbers are bit for bit one process's, and so is the accepted index.
    The model's masks and train/eval flags are as they were on return.
    """
    if criterion not in CRITERIA:
        raise FastmaskError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if (reference is None) != (adt is None):
        raise FastmaskError("pass both reference and adt for early stopping, or neither")
    _check_data(images, labels)
    k = len(candidates)
    scores = HypothesisScores(accuracy=torch.full((k,), math.nan, dtype=torch.float64),
                              loss=torch.full((k,), math.nan, dtype=torch.float64),
                              correct=torch.full((k,), -1, dtype=torch.int64), scored=0)
    if k == 0:
        return scores
    device = _model_device(model)
    if device.type == "cpu":  # without it, page faults cost a CPU pass 20 to 40% of its time (cpu_memory)
        cpu_memory.keep_freed_memory()
    mask_set = MaskSet(model)
    _check_model(mask_set)
    total = mask_set.total()
    for index, candidate in enumerate(candidates):
        if candidate.numel() and (int(candidate.min()) < 0 or int(candidate.max()) >= total):
            raise FastmaskError(f"candidate {index} holds flat indices outside [0, {total}): "
                                "it was sampled from another model")
    stages = _Stages(model, mask_set, _use_fused(fused, device, model))
    batch_n = min(batch_size, images.shape[0])
    shared_from = stages.first_stage(_touched_sites(mask_set, candidates))
    # One budget for both: the kept prefix outputs stay allocated while every chunk runs.
    budget = _budget_bytes(device, memory_budget_mb)
    chunk_budget = budget if shared_from == 0 else budget / 2
    elements = _largest_activation(mask_set, stages, images, shared_from)
    row_bytes = LIVE_ACTIVATIONS * elements * images.element_size()
    chunk = _chunk_size(elements, row_bytes, batch_n, chunk_budget)
    if chunk_size is not None:
        if chunk_size < 1:
            raise FastmaskError(f"chunk_size must be >= 1, got {chunk_size}")
        chunk = min(chunk, chunk_size)
    processes = 1 if group is None else group.size
    chunk = min(chunk, math.ceil(k / processes))
    if device.type == "cpu":
        rows = _cpu_pass_rows(model, mask_set, stages, shared_from, images, row_bytes, batch_n * chunk, group)
        batch_n, chunk = _split_cpu_pass(rows, batch_n, chunk)
    prefix_cache = _PrefixCache(stages, shared_from, images, labels, batch_n, device, budget - chunk_budget)

    starts = list(range(0, k, chunk))
    with _ScoringMode(model), torch.inference_mode():
        for wave in range(0, len(starts), processes):
            mine = wave + (0 if group is None else group.rank)
            local = None
            if mine < len(starts):
                local = _score_chunk(mask_set, stages, list(candidates[starts[mine]:starts[mine] + chunk]),
                                     prefix_cache, shared_from)
            results = [local] if group is None else group.all_gather(local)
            for start, result in zip(starts[wave:wave + processes], results):
                correct, loss_sum = result
                end = start + len(correct)
                scores.correct[start:end] = correct
                scores.accuracy[start:end] = 100.0 * correct.double() / images.shape[0]
                scores.loss[start:end] = loss_sum / images.shape[0]
                scores.scored = end
                if reference is not None:
                    drop = scores.drop(reference, criterion)[start:end]
                    passing = (drop < adt).nonzero()
                    if passing.numel():  # later chunks of this wave are dropped: one process never scored them
                        scores.accepted = start + int(passing[0, 0])
                        return scores
    return scores


def _score_chunk(mask_set: MaskSet, stages: _Stages, part: list[torch.Tensor], prefix_cache: "_PrefixCache",
                 shared_from: int) -> tuple[torch.Tensor, torch.Tensor]:
    groups = len(part)
    touched = set(_touched_sites(mask_set, part))
    # Untouched sites get None: their one mask applies to every group.
    masks = [m if s in touched else None for s, m in enumerate(mask_set.candidate_masks(part))]
    expand_at = stages.first_stage(touched)
    # Sums stay on the device until the chunk ends: no host sync per batch.
    correct = torch.zeros(groups, dtype=torch.int64, device=prefix_cache.device)
    loss_sum = torch.zeros(groups, dtype=torch.float64, device=prefix_cache.device)
    with mask_set.hypotheses(masks):
        for x, y in prefix_cache:
            for stage in stages.body[shared_from:expand_at]:  # this chunk may start differing later than the rest
                x = stage(x)
            x = torch.cat([x] * groups) if groups > 1 else x  # [K*N, ...]; cat keeps a channels_last layout
            for stage in stages.body[expand_at:]:
                x = stage(x)
            _accumulate(stages.head(x), y, groups, correct, loss_sum)
    return correct.cpu(), loss_sum.cpu()


class _PrefixCache:
    """Outputs of the shared stages per image batch: computed once and kept when they fit the budget, else recomputed
    for each chunk (only when early stop did not end the scoring first)."""

    def __init__(self, stages: _Stages, shared_from: int, images, labels, batch_size, device, budget_bytes: float):
        self.stages, self.shared_from = stages, shared_from
        self.images, self.labels, self.batch_size, self.device = images, labels, batch_size, device
        self.budget_bytes = budget_bytes
        self.kept: Optional[list] = None
        self.too_big = shared_from == 0  # nothing to share: the batches are just the images

    def _compute(self):
        for x, y in _batches(self.images, self.labels, self.batch_size, self.device):
            for stage in self.stages.body[:self.shared_from]:
                x = stage(x)
            yield x, y

    def __iter__(self):
        if self.kept is not None:
            yield from self.kept
            return
        if self.too_big:
            yield from self._compute()
            return
        kept, used = [], 0
        for x, y in self._compute():
            used += x.numel() * x.element_size()
            if used <= self.budget_bytes:
                kept.append((x, y))
            else:
                self.too_big, kept = True, []
            yield x, y
        if not self.too_big:
            self.kept = kept


def _budget_bytes(device: torch.device, budget_mb: Optional[float]) -> float:
    if budget_mb is not None:
        if budget_mb <= 0:
            raise FastmaskError(f"memory_budget_mb must be positive, got {budget_mb}")
        return budget_mb * 2**20
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Memory torch's allocator caches but no tensor holds is free to us: without it the chunk (and so the conv
        # kernel's tuning key) would shrink after the first call.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return CUDA_BUDGET_FRACTION * (free + cached)
    return DEFAULT_CPU_BUDGET_MB * 2**20


def _largest_activation(mask_set: MaskSet, stages: _Stages, images: torch.Tensor, shared_from: int) -> int:
    """Elements of the largest activation of one image after the prefix.

    Read off the masked sites from the last shared stage on: in our models every block's output has the shape of a
    site inside it, and its input the shape of a site of the stage before (a stride-2 block's input is twice its
    sites' size), so no probe forward is needed."""
    first = max(shared_from - 1, 0)
    return max((site.mask.numel() for site, stage in zip(mask_set.sites, stages.site_stage) if stage >= first),
               default=images[0].numel())


def _chunk_size(elements: int, row_bytes: int, batch_n: int, budget_bytes: float) -> int:
    """Candidates per chunk: the largest K whose activations (K x batch x row_bytes, the bytes one image keeps live
    in a block) fit the budget; at least 1."""
    by_budget = int(budget_bytes // max(1, row_bytes * batch_n))
    by_indexing = MAX_ELEMENTS_PER_TENSOR // max(1, elements * batch_n)  # 32-bit indexing in library kernels
    return max(1, min(by_budget, by_indexing))


# ---- rows per stacked pass on the CPU -----------------------------------------------------------------------------
def _cpu_pass_rows(model: nn.Module, mask_set: MaskSet, stages: _Stages, shared_from: int, images: torch.Tensor,
                   row_bytes: int, max_rows: int, group: Optional[Group]) -> int:
    """Rows per stacked pass: cpu_pass's measurement of the stages from shared_from on, on the scoring images."""
    threads = torch.get_num_threads()
    parameters = sum(p.numel() for p in model.parameters())
    key = (type(model).__qualname__, tuple(site.shape for site in mask_set.sites), parameters,
           tuple(images.shape[1:]), images.dtype, shared_from, len(stages.body), stages.fused, threads, max_rows)
    where = {"model": type(model).__name__, "parameters": parameters, "image": list(images.shape[1:]),
             "dtype": str(images.dtype).removeprefix("torch."), "stacked_from_stage": shared_from,
             "fused": stages.fused, "threads": threads, "max_rows": max_rows}
    device = _model_device(model)

    def sample() -> torch.Tensor:  # real inputs of the stacked part
        x = images[:cpu_pass.MIN_ROWS].to(device)
        for stage in stages.body[:shared_from]:
            x = stage(x)
        return x

    def forward(x: torch.Tensor) -> torch.Tensor:
        for stage in stages.body[shared_from:]:
            x = stage(x)
        return stages.head(x)

    with _ScoringMode(model), torch.inference_mode():
        return cpu_pass.rows_per_pass(key, where, forward, sample, max_rows, row_bytes, group).rows


def _split_cpu_pass(rows: int, batch_n: int, chunk: int) -> tuple[int, int]:
    """(images per batch, candidates per chunk) for passes of at most `rows` rows, or one candidate's batch when
    that is fewer. Candidates are cut first (a smaller chunk also wastes less past an early stop), the image batch
    only when one candidate's batch alone is too many rows."""
    if batch_n > rows:
        return rows, 1
    return batch_n, max(1, min(chunk, rows // batch_n))
