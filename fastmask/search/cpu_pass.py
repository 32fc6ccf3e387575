"""Rows per stacked scoring pass on the CPU, chosen by timing a few pass sizes, not by the cache size the OS reports.

A stacked pass runs candidates x images as one batch. On the CPU the time per image grows once a pass's live
activations outgrow the cache the process really has: a width-16 resnet18 ran 2.1x slower per image at 2,048 rows
than at 128 on a 2-core AMD EPYC. The size the OS reports is no guide to that cache: a 2-core VM may report its
host's whole L3 (480 MiB on an Intel Xeon), and passes sized to it lost to a plain loop of 128-image forwards (0.64x).
So the stacked part of the model is timed on the scoring images at a ladder of pass sizes, from a plain loop's
batch up while larger is faster, else down, and the fastest per image wins; the reported cache size only adds a rung.
This runs once per process and model shape (and where the stacked part starts, the threads, the largest pass the
call allows), within MEASURE_SECONDS or one size's timing; the choice is kept for the run, and measured() lists it
for the run's report. The choice changes the time, not the scores: image batches are cut into near-equal parts
(scoring._batches), at least MIN_ROWS / 2 images where the pass size cuts them, and torch's CPU kernels give every
image the same result at any such batch (tests check it).
"""
from __future__ import annotations

import functools
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Optional

import torch

from ..distributed import Group

# The smallest pass tried. Below it Python's per-layer overhead dominates, and conv kernels may take another path for
# a batch of a few images (on an AMD EPYC, batches under 12 rounded differently from larger ones).
MIN_ROWS = 32
MAX_ROWS = 4096  # the largest pass tried: far past any CPU's cache at the widths and image sizes fastmask scores
START_ROWS = 128  # the first size timed: the plain loop's batch, which beat larger passes on the CPUs measured
MEASURE_SECONDS = 2.0  # a size is not tried when its predicted cost would take the measurement past this
TIMED_RUNS = 2  # per size, after one untimed run (first-use allocations, kernel set-up): the best of these
# Sizes within this of the fastest count as equally fast, and the smallest of them is chosen: a smaller pass keeps
# more headroom in the cache and scores fewer candidates past an early stop.
EQUAL_WITHIN = 1.03
clock = time.perf_counter  # wall seconds (a name of its own, so a test can stand in for it)


@dataclass(frozen=True)
class PassSize:
    rows: int  # the chosen rows (images x candidates) per stacked pass
    seconds_per_image: dict[int, float]  # each size tried -> its best seconds per image; empty when nothing was timed
    measure_seconds: float  # wall time the measurement took
    reported_cache_rows: Optional[int]  # rows the OS's last-level cache size would have allowed (the old rule)
    where: dict = field(default_factory=dict)  # what was timed: model, image shape, first stacked stage, threads

    def as_dict(self) -> dict:
        return {**self.where, "rows": self.rows, "measure_seconds": round(self.measure_seconds, 4),
                "reported_cache_rows": self.reported_cache_rows,
                "ms_per_image_by_rows": {str(rows): round(1e3 * s, 4) for rows, s in self.seconds_per_image.items()}}


_chosen: dict[Hashable, PassSize] = {}


def rows_per_pass(key: Hashable, where: dict, forward: Callable[[torch.Tensor], object],
                  sample: Callable[[], torch.Tensor], max_rows: int, row_bytes: int,
                  group: Optional[Group] = None) -> PassSize:
    """The pass size for `key` (everything the timing depends on), measured on first use in this process.

    forward(x) runs the stacked part on a batch of x's rows; sample() gives real inputs of it (the scoring images
    after the shared stages), which are repeated up to each size; max_rows is the largest pass the call can use.
    With a `group`, rank 0's choice is taken by every process on every call, so all cut the same chunks and batches
    (score_hypotheses' contract), even when some of them measured this key before and others not."""
    chosen = _chosen.get(key)
    if chosen is None:
        cache = last_level_cache_bytes()
        cache_rows = None if cache is None else max(1, cache // max(1, row_bytes))
        chosen = measure(forward, sample, max_rows, cache_rows, where)
    if group is not None:
        chosen = group.broadcast(chosen)
    _chosen[key] = chosen
    return chosen


def ladder(max_rows: int, cache_rows: Optional[int]) -> list[int]:
    """Sizes to time, ascending: powers of two from MIN_ROWS, the largest pass the call allows, and the rows the
    reported cache would allow (clamped into that range)."""
    top = max(1, min(max_rows, MAX_ROWS))
    if top <= MIN_ROWS:
        return [top]
    sizes = {top, *(MIN_ROWS * 2 ** i for i in range(int(math.log2(top / MIN_ROWS)) + 1))}
    if cache_rows is not None:
        sizes.add(min(max(cache_rows, MIN_ROWS), top))
    return sorted(size for size in sizes if size <= top)


def measure(forward: Callable[[torch.Tensor], object], sample: Callable[[], torch.Tensor], max_rows: int,
            cache_rows: Optional[int], where: Optional[dict] = None) -> PassSize:
    """Times the ladder from START_ROWS up while each size is faster than all before it, and when the first step up
    is not, down instead; a size whose predicted cost would take the measurement past MEASURE_SECONDS ends that
    direction. Chooses the smallest size within EQUAL_WITHIN of the fastest."""
    sizes = ladder(max_rows, cache_rows)
    where = dict(where or {})
    if len(sizes) == 1:  # one choice: nothing to time
        return PassSize(sizes[0], {}, 0.0, cache_rows, where)
    started = clock()
    inputs = sample()
    seconds: dict[int, float] = {}
    last: list[int] = []

    def faster(index: int) -> bool:
        """Times sizes[index] when the time left allows; whether it beat every size timed before."""
        rows = sizes[index]
        if last and (clock() - started) + (1 + TIMED_RUNS) * rows * seconds[last[-1]] > MEASURE_SECONDS:
            return False
        best_before = min(seconds.values(), default=math.inf)
        seconds[rows] = seconds_per_image(forward, _repeat_rows(inputs, rows))
        last.append(rows)
        return seconds[rows] < best_before

    start = max((i for i, rows in enumerate(sizes) if rows <= START_ROWS), default=0)
    faster(start)
    index = start + 1
    while index < len(sizes) and faster(index):
        index += 1
    if index == start + 1:  # no larger size was faster: smaller ones
        index = start - 1
        while index >= 0 and faster(index):
            index -= 1
    fastest = min(seconds.values())
    rows = min(size for size, s in seconds.items() if s <= EQUAL_WITHIN * fastest)
    return PassSize(rows, dict(sorted(seconds.items())), clock() - started, cache_rows, where)


def seconds_per_image(forward: Callable[[torch.Tensor], object], batch: torch.Tensor) -> float:
    """Best of TIMED_RUNS runs of forward(batch), after one untimed run, per row of the batch."""
    forward(batch)
    best = math.inf
    for _ in range(TIMED_RUNS):
        start = clock()
        forward(batch)
        best = min(best, clock() - start)
    return best / batch.shape[0]


def _repeat_rows(inputs: torch.Tensor, rows: int) -> torch.Tensor:
    if inputs.shape[0] >= rows:
        return inputs[:rows]
    return torch.cat([inputs] * math.ceil(rows / inputs.shape[0]))[:rows]  # cat keeps a channels_last layout


def measured() -> list[dict]:
    """Every pass size chosen in this process so far, for the run's report."""
    return [chosen.as_dict() for chosen in _chosen.values()]


def forget() -> None:
    """Drops every choice made in this process: the next call measures again."""
    _chosen.clear()


@functools.cache
def last_level_cache_bytes() -> Optional[int]:
    """Size of the largest data cache this machine's OS reports for cpu0 (read once per process); None where the OS
    does not tell. Linux: sysfs; macOS: sysctl. A VM may report its host's cache: a hint, never a pass size."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() != "Instruction":
                sizes.append(_parse_size((index / "size").read_text()))
        except (OSError, ValueError):
            continue
    if not sizes and sys.platform == "darwin":
        for name in ("hw.l3cachesize", "hw.perflevel0.l2cachesize", "hw.l2cachesize"):
            try:
                out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout
                sizes.append(int(out.strip()))
            except (OSError, ValueError, subprocess.SubprocessError):
                continue
    sizes = [size for size in sizes if size > 0]
    return max(sizes) if sizes else None


def _parse_size(text: str) -> int:
    """'48K', '2048K', '32M' (sysfs's cache sizes) -> bytes."""
    match = re.fullmatch(r"(\d+)\s*([KMG]?)B?", text.strip(), flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"not a cache size: {text!r}")
    return int(match.group(1)) * 1024 ** " KMG".index(match.group(2).upper() or " ")
