"""Private inference with a masked model: ONNX export in which only kept ReLUs reach a Relu node, and a two-party run
that measures what the cut ReLUs save (bytes, rounds or send actions, time): under CrypTen (run_two_party; party 0
deals the triples) or SecretFlow SPU (run_spu; Cheetah without a dealer, or SEMI2K with one).

Install the extras with `pip install -e .[pi]` (onnx, onnxruntime, CrypTen); SPU gets an environment of its own with
`python -m fastmask.pi.spu_env --install`. Imports are lazy, so `fastmask.pi` loads without them; the functions that
need them raise FastmaskError saying what to install.
"""
from __future__ import annotations

__all__ = ["build_onnx", "export_model", "run_spu", "run_two_party"]


def __getattr__(name: str):
    if name in ("build_onnx", "export_model"):
        from . import export

        return getattr(export, name)
    if name == "run_two_party":
        from .two_party import run_two_party

        return run_two_party
    if name == "run_spu":
        from .spu_runtime import run_spu

        return run_spu
    raise AttributeError(f"module 'fastmask.pi' has no attribute {name!r}")
