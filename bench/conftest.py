"""Shared bench setup: a ratio table that every bench adds rows to and that is printed at the end of the run,
whatever pytest's output capture. GPU benches are marked `cuda` (declared in pyproject.toml) and skip cleanly
without CUDA through the root conftest.py.

Run: python -m pytest bench -q --benchmark-json=bench/results/bench.json   (bench/gpu.sh does this on the GPU machine)
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict

import pytest
import torch

_TABLES: dict[str, list[dict]] = defaultdict(list)


@pytest.fixture
def bench_table():
    """add(table_title, **columns): one row of a printed table (e.g. impl, ms, ratio vs the named baseline)."""

    def add(title: str, **row):
        _TABLES[title].append(row)

    return add


def pytest_terminal_summary(terminalreporter):
    for title, rows in _TABLES.items():
        columns = list(dict.fromkeys(key for row in rows for key in row))
        cells = [[_format(row.get(col, "")) for col in columns] for row in rows]
        widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
        terminalreporter.write_sep("-", title)
        terminalreporter.write_line("  ".join(col.ljust(w) for col, w in zip(columns, widths)))
        for r in cells:
            terminalreporter.write_line("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def interleaved_cpu_medians(functions: dict, rounds: int = 7, min_seconds: float = 0.2) -> dict[str, float]:
    """Median seconds per call of each CPU function, measured in alternating rounds so load drift hits all alike."""
    for fn in functions.values():  # warm-up: allocator, thread pool, caches
        fn()
        fn()
    samples = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            calls, start = 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds / rounds and calls >= 3:
                    break
            samples[name].append(elapsed / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


def cuda_median_ms(fn) -> float:
    """Median milliseconds of one call on the GPU: triton.testing.do_bench when Triton is there, else CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@pytest.fixture
def cpu_medians():
    """interleaved_cpu_medians as a fixture, for benches in this folder."""
    return interleaved_cpu_medians


@pytest.fixture
def cuda_ms():
    """cuda_median_ms as a fixture, for benches in this folder."""
    return cuda_median_ms
