"""Bench: fused fastmask.ops.conv_bn_act (Triton) vs its baselines, on ResNet18 CIFAR layers at N = 256.

Baselines, named in every row:
- eager: cuDNN conv2d, then BN (eval) as one addcmul with the folded scale/shift, + residual, then the masked
  activation torch.where(mask, relu(y), y): the plain-PyTorch way, one kernel per step.
- compile: torch.compile of that same eager function (Inductor fuses the pointwise tail; the conv stays cuDNN).
All three run on channels_last tensors (the layout cuDNN and the kernel are fastest in) in fp16 and bf16.
Targets (bf16, H100): fused >= 1.2x eager and >= 1.0x compile.

Two timings, both medians recorded in extra_info: "launch" is triton.testing.do_bench (back-to-back calls from Python,
so host overhead counts when it exceeds the GPU time) and "graph" is triton.testing.do_bench_cudagraph (the same calls
replayed from a CUDA graph: GPU time alone). pytest-benchmark also times the fused call (synchronized). At the end a
table (times, TFLOP/s, ratios) is printed and saved to bench/results/conv_bn_act.{json,md} ($FASTMASK_BENCH_RESULTS
when set: bench/gpu.sh points it at the device's $OUT).
GPU only: skips cleanly without CUDA. Run: python -m pytest bench/test_conv_bn_act_bench.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the conv_bn_act bench needs a CUDA device")
triton_testing = pytest.importorskip("triton.testing")

from fastmask.ops import conv_bn_act  # noqa: E402

BATCH = 256
RESULTS = Path(os.environ.get("FASTMASK_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
# (name, c_in, c_out, input size, kernel, stride, padding, masked, residual): conv1 (masked) and conv2 (masked, +
# residual) of each ResNet18 stage, the stride-2 transitions, and their 1x1 shortcuts (conv + BN only).
LAYERS = [
    ("stem 3->64 32x32", 3, 64, 32, 3, 1, 1, True, False),
    ("64->64 32x32 +res", 64, 64, 32, 3, 1, 1, True, True),
    ("64->128 s2 32->16", 64, 128, 32, 3, 2, 1, True, False),
    ("64->128 1x1 s2", 64, 128, 32, 1, 2, 0, False, False),
    ("128->128 16x16 +res", 128, 128, 16, 3, 1, 1, True, True),
    ("128->256 s2 16->8", 128, 256, 16, 3, 2, 1, True, False),
    ("256->256 8x8 +res", 256, 256, 8, 3, 1, 1, True, True),
    ("256->512 s2 8->4", 256, 512, 8, 3, 2, 1, True, False),
    ("512->512 4x4 +res", 512, 512, 4, 3, 1, 1, True, True),
]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_rows: list[dict] = []


def eager_conv_bn_act(x, weight, scale, shift, mask, residual, stride: int, padding: int):
    y = F.conv2d(x, weight, stride=stride, padding=padding)
    y = torch.addcmul(shift.view(1, -1, 1, 1), y, scale.view(1, -1, 1, 1))
    if residual is not None:
        y = y + residual
    if mask is not None:
        y = torch.where(mask, torch.relu(y), y)
    return y


# One compiled graph per (layer, dtype): raise dynamo's recompile limit (default 8) so none falls back to eager.
for _limit in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _limit):
        setattr(torch._dynamo.config, _limit, 64)
_compiled = torch.compile(eager_conv_bn_act, dynamic=False)


def _inputs(c_in, c_out, size, ksize, stride, padding, masked, residual, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    out_size = (size + 2 * padding - ksize) // stride + 1

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    cl = torch.channels_last
    x = randn(BATCH, c_in, size, size).to(dtype).contiguous(memory_format=cl)
    weight = (randn(c_out, c_in, ksize, ksize) / (c_in * ksize * ksize) ** 0.5).to(dtype).contiguous(memory_format=cl)
    scale, shift = randn(c_out).abs() + 0.5, randn(c_out) * 0.1
    mask = (torch.rand(1, c_out, out_size, out_size, device="cuda", generator=gen) < 0.5) if masked else None
    res = randn(BATCH, c_out, out_size, out_size).to(dtype).contiguous(memory_format=cl) if residual else None
    flops = 2 * BATCH * out_size * out_size * c_out * c_in * ksize * ksize
    return dict(x=x, weight=weight, scale=scale, shift=shift, mask=mask, residual=res, stride=stride,
                padding=padding), flops


def _median_ms(fn) -> float:
    return float(triton_testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _graph_median_ms(fn) -> float:
    return float(triton_testing.do_bench_cudagraph(fn, rep=30, return_mode="median"))


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    if not _rows:
        return
    header = (f"| layer (N={BATCH}) | dtype | graph ms fused / eager / compile | fused TFLOP/s | graph x eager | "
              f"graph x compile | launch ms fused / eager / compile | launch x eager | launch x compile |\n"
              f"| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: |\n")
    lines = [f"| {r['layer']} | {r['dtype']} | {r['graph_fused_ms']:.4f} / {r['graph_eager_ms']:.4f} / "
             f"{r['graph_compile_ms']:.4f} | {r['fused_tflops']:.1f} | {r['graph_speedup_vs_eager']:.2f} | "
             f"{r['graph_speedup_vs_compile']:.2f} | {r['fused_ms']:.4f} / {r['eager_ms']:.4f} / "
             f"{r['compile_ms']:.4f} | "
             f"{r['speedup_vs_eager']:.2f} | {r['speedup_vs_compile']:.2f} |" for r in _rows]
    device = torch.cuda.get_device_name()
    table = f"conv_bn_act on {device}: ratios are baseline time / fused time (> 1 means fused is faster)\n\n" \
            + header + "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "conv_bn_act.md").write_text(table)
    (RESULTS / "conv_bn_act.json").write_text(json.dumps({"device": device, "batch": BATCH, "rows": _rows}, indent=1))
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + table)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layer", LAYERS, ids=[layer[0].replace(" ", "_") for layer in LAYERS])
def test_conv_bn_act_vs_eager_and_compile(benchmark, layer, dtype_name):
    name, *shape = layer
    args, flops = _inputs(*shape, DTYPES[dtype_name])
    eager_args = dict(args, scale=args["scale"].to(args["x"].dtype), shift=args["shift"].to(args["x"].dtype))

    with torch.inference_mode():
        fused = conv_bn_act(**args)
        expected = eager_conv_bn_act(**eager_args)
        torch.testing.assert_close(fused, expected, atol=5e-2, rtol=5e-2)  # same op before we time it
        _compiled(**eager_args)  # compile outside the timing

        fused_ms = _median_ms(lambda: conv_bn_act(**args))
        eager_ms = _median_ms(lambda: eager_conv_bn_act(**eager_args))
        compile_ms = _median_ms(lambda: _compiled(**eager_args))
        graph_fused_ms = _graph_median_ms(lambda: conv_bn_act(**args))
        graph_eager_ms = _graph_median_ms(lambda: eager_conv_bn_act(**eager_args))
        graph_compile_ms = _graph_median_ms(lambda: _compiled(**eager_args))

        def fused_synced():
            conv_bn_act(**args)
            torch.cuda.synchronize()

        benchmark.pedantic(fused_synced, rounds=20, iterations=1, warmup_rounds=3)

    row = {"layer": name, "dtype": dtype_name, "baselines": "eager cuDNN+addcmul+where; torch.compile of it",
           "fused_ms": fused_ms, "eager_ms": eager_ms, "compile_ms": compile_ms,
           "graph_fused_ms": graph_fused_ms, "graph_eager_ms": graph_eager_ms, "graph_compile_ms": graph_compile_ms,
           "fused_tflops": flops / graph_fused_ms / 1e9, "eager_tflops": flops / graph_eager_ms / 1e9,
           "speedup_vs_eager": eager_ms / fused_ms, "speedup_vs_compile": compile_ms / fused_ms,
           "graph_speedup_vs_eager": graph_eager_ms / graph_fused_ms,
           "graph_speedup_vs_compile": graph_compile_ms / graph_fused_ms}
    benchmark.extra_info.update(row)
    _rows.append(row)
