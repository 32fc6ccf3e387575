"""Compile the Triton kernels for a GPU without one: what CI can check about the GPU build, and a resource report.

`compile_only(arch)` turns every Triton launch inside it into an ahead-of-time compile for sm_<arch>: the real
launchers run on CPU tensors, Triton binds and specializes their arguments exactly as it would for a launch (dtypes,
16-byte alignment, ints equal to 1 or divisible by 16), then compiles to PTX and a cubin with its bundled ptxas, and
nothing runs. The interpreter neither catches what only the GPU compiler rejects (ops or casts a target lacks) nor
shows registers, spills, shared memory, 16-byte loads and tensor-core use; this does.

    python -m fastmask.ops.triton.aot [--arch 90]     # table: kernel, variant, registers, spills, smem, instructions

Needs a process without TRITON_INTERPRET=1 (interpreted kernels have no compiler path). Uses two Triton internals
(JITFunction._pack_args and create_function_from_signature); a Triton without them raises AotUnavailable.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import triton

from ..backends import triton_interpreting


class AotUnavailable(RuntimeError):
    """This Triton cannot compile ahead of time here (interpreter on, or its internals moved)."""


@dataclass
class CompiledVariant:
    kernel: str
    variant: str
    arch: int
    ptx: str
    cubin: bytes
    shared_bytes: int
    num_warps: int

    def count(self, pattern: str) -> int:
        """How many PTX instructions match pattern (a regex over the PTX text)."""
        return len(re.findall(pattern, self.ptx))

    @property
    def tensor_core_instructions(self) -> int:
        return self.count(r"\bwgmma\.mma_async") + self.count(r"\bmma\.sync")

    @property
    def wide_global_loads(self) -> int:
        """16-byte (v4 of 32-bit, or v2 of 64-bit) global loads: what streaming kernels need for full bandwidth."""
        return self.count(r"ld\.global(\.[a-z0-9_]+)*\.v4\.(b|u|f|s)32") + self.count(
            r"ld\.global(\.[a-z0-9_]+)*\.v2\.(b|u|f|s)64")


def _binder_and_backend(fn, arch: int):
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as error:  # pragma: no cover - depends on the Triton release
        raise AotUnavailable(f"triton {triton.__version__}: {error}") from error
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    return create_function_from_signature(fn.signature, fn.params, backend), backend, target


@contextlib.contextmanager
def compile_only(arch: int, label: str = "") -> Iterator[list[CompiledVariant]]:
    """Within: Triton launches compile for sm_<arch> and append a CompiledVariant (tagged label) instead of running."""
    if triton_interpreting():
        raise AotUnavailable("TRITON_INTERPRET=1 is set: interpreted kernels cannot be compiled for a GPU")
    from triton.runtime.jit import JITFunction

    if not hasattr(JITFunction, "_pack_args"):  # pragma: no cover - depends on the Triton release
        raise AotUnavailable(f"triton {triton.__version__} has no JITFunction._pack_args")
    compiled: list[CompiledVariant] = []
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        binder, backend, target = _binder_and_backend(self, arch)
        kwargs.setdefault("debug", False)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        source = triton.compiler.ASTSource(self, signature, constexprs, attrs)
        kernel = triton.compile(source, target=target, options=options.__dict__)
        compiled.append(CompiledVariant(
            kernel=self.__name__, variant=label, arch=arch, ptx=kernel.asm["ptx"], cubin=kernel.asm["cubin"],
            shared_bytes=int(kernel.metadata.shared), num_warps=int(kernel.metadata.num_warps)))
        return None

    JITFunction.run = run
    try:
        yield compiled
    finally:
        JITFunction.run = original_run


def resource_usage(variant: CompiledVariant) -> dict:
    """Registers per thread and the local-memory and stack bytes (where spills go) of the cubin, from Triton's
    bundled cuobjdump."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(variant.cubin)
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)], check=True,
                              capture_output=True, text=True).stdout
    found = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    return {"registers": found.get("REG", -1), "stack_bytes": found.get("STACK", 0),
            "local_bytes": found.get("LOCAL", 0)}


# The variants CI compiles and the report lists: every dtype, with and without coeffs, each conv layer kind.
MASKED_ACT_SHAPES = {"conv map [4,64,32,32]": (4, 64, 32, 32), "odd [3,5,7,9]": (3, 5, 7, 9), "flat [6,100]": (6, 100)}
CONV_LAYERS = {  # (C_in, C_out, H, kernel, stride, padding, residual): ResNet18 CIFAR layer kinds at a tiny batch
    "stem 3->64 3x3": (3, 64, 32, 3, 1, 1, False),
    "3x3 64->64 +res": (64, 64, 32, 3, 1, 1, True),
    "3x3 s2 64->128": (64, 128, 32, 3, 2, 1, False),
    "1x1 s2 shortcut": (64, 128, 32, 1, 2, 0, False),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compile_masked_act(arch: int) -> list[CompiledVariant]:
    from . import masked_act

    out = []
    for dtype_name, dtype in DTYPES.items():
        for shape_name, shape in MASKED_ACT_SHAPES.items():
            for has_coeffs in (False, True):
                x = torch.randn(shape).to(dtype)
                mask = torch.rand((1,) + shape[1:]) < 0.5
                coeffs = torch.randn(shape[1], 3) if has_coeffs else None
                label = f"{dtype_name} {shape_name}{' coeffs' if has_coeffs else ''}"
                with compile_only(arch, label) as compiled:
                    masked_act.forward(x, mask, coeffs)
                    masked_act.backward(torch.randn_like(x), x, mask, coeffs)
                out += compiled
    return out


def compile_conv_bn_act(arch: int, dtypes=("fp32", "fp16", "bf16"), every_config: bool = True) -> list[CompiledVariant]:
    from . import conv_bn_act as conv

    out = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for layer, (c_in, c_out, size, k, stride, pad, has_res) in CONV_LAYERS.items():
            x = torch.randn(2, c_in, size, size).to(dtype).contiguous(memory_format=torch.channels_last)
            weight = torch.randn(c_out, c_in, k, k).to(dtype)
            o = (size + 2 * pad - k) // stride + 1
            res = torch.randn(2, c_out, o, o).to(dtype).contiguous(memory_format=torch.channels_last) if has_res \
                else None
            mask = torch.rand(1, c_out, o, o) < 0.5
            configs = conv.configs(k * k == 1) if every_config else conv.configs(k * k == 1)[:1]
            for config in configs:
                result = torch.empty(2, c_out, o, o, dtype=dtype).contiguous(memory_format=torch.channels_last)
                label = (f"{dtype_name} {layer} M{config.kwargs['BLOCK_M']} N{config.kwargs['BLOCK_N']} "
                         f"K{config.kwargs['BLOCK_K']} w{config.num_warps} s{config.num_stages}")
                with compile_only(arch, label) as compiled:
                    conv.conv_bn_act(x, weight, torch.rand(c_out), torch.randn(c_out), mask, res, None, stride, pad,
                                     result, config=config)
                out += compiled
    return out


def report(variants: list[CompiledVariant]) -> str:
    rows = [("kernel", "variant", "sm", "warps", "regs", "local/stack (spill) B", "smem B", "tensor-core ops",
             "16B loads")]
    for row in summary(variants):
        rows.append((row["kernel"].lstrip("_"), row["variant"], str(row["arch"]), str(row["num_warps"]),
                     str(row["registers"]), f"{row['local_bytes']}/{row['stack_bytes']}", str(row["shared_bytes"]),
                     str(row["tensor_core_instructions"]), str(row["wide_global_loads"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def summary(variants: list[CompiledVariant]) -> list[dict]:
    """One JSON-ready row a variant (what python_tests/test_triton_gpu_compile.py checks)."""
    return [{"kernel": v.kernel, "variant": v.variant, "arch": v.arch, "num_warps": v.num_warps,
             "shared_bytes": v.shared_bytes, "tensor_core_instructions": v.tensor_core_instructions,
             "wgmma": v.count(r"\bwgmma\.mma_async"), "wide_global_loads": v.wide_global_loads, **resource_usage(v)}
            for v in variants]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10: 80 (A100), 90 (H100)")
    parser.add_argument("--kernel", choices=("all", "masked_act", "conv_bn_act"), default="all")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16", help="conv_bn_act dtypes, comma-separated")
    parser.add_argument("--first-config", action="store_true", help="conv_bn_act: only each layer's first config")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    args = parser.parse_args(argv)
    variants = []
    if args.kernel in ("all", "masked_act"):
        variants += compile_masked_act(args.arch)
    if args.kernel in ("all", "conv_bn_act"):
        variants += compile_conv_bn_act(args.arch, tuple(args.dtypes.split(",")), not args.first_config)
    if args.json:
        print(json.dumps(summary(variants)))
        return
    print(f"triton {triton.__version__}, sm_{args.arch}, {len(variants)} kernels compiled")
    print(report(variants))


if __name__ == "__main__":
    main()
