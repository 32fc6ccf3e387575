"""Bench: sharded candidate scoring (score_hypotheses with a process group) with 1 process and with several.

Baseline: the same scoring in one process (rank 0 alone, the others waiting). Sharded, each process scores its chunks
of the K candidates and the results are gathered (fastmask.distributed). Rounds alternate the two in the same
processes, so machine load hits both alike; each time is between two barriers, the median over rounds after a
warm-up. Both must agree on every candidate's correct count (checked here).

- CPU: 1 and 2 processes (gloo), one torch thread each; resnet18 width 16, 256 images, K = 16. Target: 2 processes
  score at least 1.3x the candidates per second of one (skips on a machine with fewer than 2 cores).
- CUDA (skips with fewer than 2 GPUs): 1 and all GPUs (nccl); resnet18 width 64, 1,024 images, K = 50.

Run: python -m pytest bench/test_distributed_bench.py -q --benchmark-json=bench/results/distributed.json
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from test_scoring_bench import make_case

from fastmask import distributed
from fastmask.search.scoring import score_hypotheses

TABLE = "sharded scoring: candidates per second with N processes vs 1 process (same candidates, same images)"


def _timed(fn, device: torch.device, group) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    group.barrier()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    group.barrier()
    return time.perf_counter() - start


def scoring_worker(group, device: str, width: int, images: int, k: int, rounds: int) -> dict:
    """Alternates, in the same processes: rank 0 alone (the others wait at a barrier), then the whole group."""
    device = torch.device(device if device == "cpu" else f"cuda:{group.local_rank}")
    model, candidates, x, y = make_case(width, images, k, device)
    alone = score_hypotheses(model, candidates, x, y)  # warm-up (cuDNN, allocator) and the agreement check
    together = score_hypotheses(model, candidates, x, y, group=group)
    seconds = {"alone": [], "together": []}
    for _ in range(rounds):
        seconds["alone"].append(_timed(lambda: group.is_main and score_hypotheses(model, candidates, x, y),
                                       device, group))
        seconds["together"].append(_timed(lambda: score_hypotheses(model, candidates, x, y, group=group),
                                          device, group))
    return {name: statistics.median(values) for name, values in seconds.items()} | {
        "mismatch": int((alone.correct - together.correct).abs().max())}


def run_case(benchmark, bench_table, device: str, processes: int, width: int, images: int, k: int,
             rounds: int) -> dict:
    backend = "nccl" if device == "cuda" else "gloo"
    result = distributed.run_local(scoring_worker, processes, device, width, images, k, rounds, backend=backend)[0]
    allowed = 0 if device == "cpu" else images // 100  # TF32 near-ties on CUDA
    assert result["mismatch"] <= allowed, f"{processes} processes disagree with one by {result['mismatch']} images"
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "width": width,
            "images": images, "K": k, "processes": processes, "threads_per_process": 1,
            "1_process_s": result["alone"], f"{processes}_processes_s": result["together"],
            "1_process_candidates_per_s": k / result["alone"],
            f"{processes}_processes_candidates_per_s": k / result["together"],
            "speedup": result["alone"] / result["together"]}
    for n, key in ((1, "alone"), (processes, "together")):
        bench_table(TABLE, processes=n if n > 1 else "1 (baseline)", device=info["device"], width=width,
                    images=images, K=k, seconds=result[key], cand_per_s=k / result[key],
                    ratio=result["alone"] / result[key])
    benchmark.extra_info.update(info)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the timings above are the processes' own
    return info


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores")
def test_sharded_scoring_cpu(benchmark, bench_table):
    info = run_case(benchmark, bench_table, "cpu", 2, width=16, images=256, k=16, rounds=5)
    assert info["speedup"] >= 1.3, "2 processes must score clearly faster than one"


@pytest.mark.cuda
def test_sharded_scoring_cuda(benchmark, bench_table):
    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip("needs 2 or more GPUs")
    run_case(benchmark, bench_table, "cuda", gpus, width=64, images=1024, k=50, rounds=5)
