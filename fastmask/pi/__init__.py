"""Private inference with a masked model: ONNX export in which only kept ReLUs reach a Relu node, and a two-party
CrypTen run that measures what the cut ReLUs save (bytes, rounds, time).

Install the extras with `pip install -e .[pi]` (onnx, onnxruntime, CrypTen). Imports are lazy, so `fastmask.pi` loads
without them; the functions that need them raise FastmaskError saying what to install.
"""
from __future__ import annotations

__all__ = ["build_onnx", "export_model", "run_two_party"]


def __getattr__(name: str):
    if name in ("build_onnx", "export_model"):
        from . import export

        return getattr(export, name)
    if name == "run_two_party":
        from .two_party import run_two_party

        return run_two_party
    raise AttributeError(f"module 'fastmask.pi' has no attribute {name!r}")
