"""masked_act benches, each against a named baseline, with ratios in benchmark.extra_info and a printed table.

CPU: the extension's C++ kernel vs `torch.where(mask, torch.relu(x), x)` on [128, 64, 32, 32] fp32 (target >= 1.5x).
CUDA (skipped without a GPU): the extension's CUDA kernel, the Triton kernel (if importable) and torch.where on
[256, 64, 64, 64] fp32 and bf16, as GB/s and % of a 3.0 TB/s HBM copy ceiling (H100 target: >= 80%).
Run: python -m pytest bench/test_masked_act_bench.py -q --benchmark-json=bench/results/masked_act.json
"""
from __future__ import annotations

import importlib

import pytest
import torch

from fastmask.ops import backends

CPU_SHAPE = (128, 64, 32, 32)
CUDA_SHAPE = (256, 64, 64, 64)
HBM_PEAK_GBPS = 3000.0  # H100 SXM device-to-device copy ceiling, the practical peak for a streaming kernel


@pytest.fixture(scope="module")
def compiled_ops():
    if backends.extension() is None:
        pytest.skip("fastmask._C is not built")
    return torch.ops.fastmask_C


def triton_masked_act():
    try:
        return importlib.import_module("fastmask.ops.triton.masked_act")
    except ImportError:
        return None


def test_cpu_forward_vs_torch_where(benchmark, bench_table, cpu_medians, compiled_ops):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(CPU_SHAPE, generator=gen)
    mask = torch.rand((1, *CPU_SHAPE[1:]), generator=gen) > 0.5
    candidates = {
        "torch.where(mask, relu(x), x)": lambda: torch.where(mask, torch.relu(x), x),
        "fastmask_C.masked_act_fwd (C++)": lambda: compiled_ops.masked_act_fwd(x, mask, None),
    }
    baseline = next(iter(candidates))
    expected = candidates[baseline]()
    for fn in candidates.values():
        assert torch.equal(fn(), expected)
    medians = cpu_medians(candidates)
    benchmark(candidates["fastmask_C.masked_act_fwd (C++)"])
    title = f"masked_act forward, CPU ({torch.get_num_threads()} threads), {list(CPU_SHAPE)} fp32"
    for name, seconds in medians.items():
        bench_table(title, impl=name, ms=seconds * 1e3, speedup_vs_torch_where=medians[baseline] / seconds)
    ratio = medians[baseline] / medians["fastmask_C.masked_act_fwd (C++)"]
    benchmark.extra_info.update(baseline=baseline, baseline_ms=medians[baseline] * 1e3,
                                ext_ms=medians["fastmask_C.masked_act_fwd (C++)"] * 1e3, ratio=ratio,
                                threads=torch.get_num_threads(), target_ratio=1.5)


def test_cpu_backward_vs_torch_where(benchmark, bench_table, cpu_medians, compiled_ops):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(CPU_SHAPE, generator=gen)
    grad = torch.randn(CPU_SHAPE, generator=gen)
    mask = torch.rand((1, *CPU_SHAPE[1:]), generator=gen) > 0.5
    candidates = {
        "torch.where(mask, grad * (x > 0), grad)": lambda: torch.where(mask, grad * (x > 0), grad),
        "fastmask_C.masked_act_bwd (C++)": lambda: compiled_ops.masked_act_bwd(grad, x, mask, None)[0],
    }
    baseline = next(iter(candidates))
    for fn in candidates.values():
        torch.testing.assert_close(fn(), candidates[baseline]())
    medians = cpu_medians(candidates)
    benchmark(candidates["fastmask_C.masked_act_bwd (C++)"])
    title = f"masked_act backward, CPU ({torch.get_num_threads()} threads), {list(CPU_SHAPE)} fp32"
    for name, seconds in medians.items():
        bench_table(title, impl=name, ms=seconds * 1e3, speedup_vs_torch_where=medians[baseline] / seconds)
    benchmark.extra_info.update(baseline=baseline, baseline_ms=medians[baseline] * 1e3,
                                ext_ms=medians["fastmask_C.masked_act_bwd (C++)"] * 1e3,
                                ratio=medians[baseline] / medians["fastmask_C.masked_act_bwd (C++)"])


def cuda_candidates(compiled_ops, direction, x, grad, mask, coeffs):
    """name -> (callable, bytes it must move) for one direction; the first entry is the baseline."""
    element = x.element_size()
    moved = (2 if direction == "forward" else 3) * x.numel() * element + mask.numel()
    triton_module = triton_masked_act()
    if direction == "forward":
        candidates = {"torch.where(mask, relu(x), x)": lambda: torch.where(mask, torch.relu(x), x),
                      "fastmask_C (CUDA)": lambda: compiled_ops.masked_act_fwd(x, mask, coeffs)}
        if triton_module is not None:
            candidates["triton"] = lambda: triton_module.forward(x, mask, coeffs)
    else:
        candidates = {"torch.where(mask, grad * (x > 0), grad)": lambda: torch.where(mask, grad * (x > 0), grad),
                      "fastmask_C (CUDA)": lambda: compiled_ops.masked_act_bwd(grad, x, mask, coeffs)}
        if triton_module is not None:
            candidates["triton"] = lambda: triton_module.backward(grad, x, mask, coeffs)
    return candidates, moved


def first_output(result):
    return result[0] if isinstance(result, (tuple, list)) else result


@pytest.mark.cuda
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_coeffs", [False, True], ids=["identity", "poly"])
def test_cuda_bandwidth(benchmark, bench_table, cuda_ms, compiled_ops, direction, dtype, with_coeffs):
    if not backends.extension().built_with_cuda():
        pytest.fail("fastmask._C was built without CUDA on a machine with a GPU: rebuild with nvcc on PATH")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(CUDA_SHAPE, generator=gen, device="cuda").to(dtype)
    grad = torch.randn(CUDA_SHAPE, generator=gen, device="cuda").to(dtype)
    mask = torch.rand((1, *CUDA_SHAPE[1:]), generator=gen, device="cuda") > 0.5
    coeffs = torch.randn(CUDA_SHAPE[1], 3, generator=gen, device="cuda") if with_coeffs else None
    candidates, moved = cuda_candidates(compiled_ops, direction, x, grad, mask, coeffs)
    if with_coeffs:  # torch.where has no polynomial; the PyTorch reference is the baseline there
        from fastmask.ops import reference
        baseline_fn = (lambda: reference.masked_act(x, mask, coeffs)) if direction == "forward" else (
            lambda: reference.masked_act_backward(grad, x, mask, coeffs))
        candidates = {"fastmask reference (PyTorch)": baseline_fn,
                      **{k: v for k, v in candidates.items() if not k.startswith("torch.where")}}
    baseline = next(iter(candidates))
    expected = first_output(candidates[baseline]())
    for fn in candidates.values():  # every contender computes the same thing before it is timed
        torch.testing.assert_close(first_output(fn()), expected, atol=1e-2, rtol=1e-2)
    times = {name: cuda_ms(fn) for name, fn in candidates.items()}
    ext = "fastmask_C (CUDA)"
    # The copy this card really reaches (x.clone(): read + write), in case it is not an SXM H100 with ~3 TB/s.
    copy_gbps = 2 * x.numel() * x.element_size() / cuda_ms(lambda: x.clone()) / 1e6

    def ext_synced():
        candidates[ext]()
        torch.cuda.synchronize()

    benchmark.pedantic(ext_synced, rounds=20, warmup_rounds=3)
    title = (f"masked_act {direction} {'poly' if with_coeffs else 'identity'}, CUDA, {list(CUDA_SHAPE)} "
             f"{str(dtype).removeprefix('torch.')}")
    for name, ms in times.items():
        gbps = moved / ms / 1e6
        bench_table(title, impl=name, ms=ms, GBps=gbps, pct_of_3TBps=100 * gbps / HBM_PEAK_GBPS,
                    pct_of_measured_copy=100 * gbps / copy_gbps, speedup_vs_baseline=times[baseline] / ms)
    ext_gbps = moved / times[ext] / 1e6
    benchmark.extra_info.update(baseline=baseline, times_ms=times, bytes_moved=moved, ext_GBps=ext_gbps,
                                ext_pct_of_peak=100 * ext_gbps / HBM_PEAK_GBPS, peak_GBps=HBM_PEAK_GBPS,
                                copy_GBps=copy_gbps, ext_pct_of_copy=100 * ext_gbps / copy_gbps,
                                device=torch.cuda.get_device_name())
