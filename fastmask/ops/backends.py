"""Which implementation runs each op: the compiled extension, Triton, or the PyTorch reference.

Order on CUDA tensors: extension (CUDA kernels) -> Triton -> reference. On CPU: extension (C++ kernels) -> reference;
Triton runs on the CPU only when forced and TRITON_INTERPRET=1 (that is how CI checks the kernels).
FASTMASK_BACKEND=ext|triton|torch forces one ("cuda" and "cpp" are accepted as names for the extension).
"""
from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache

from ..errors import FastmaskError

EXT, TRITON, TORCH = "ext", "triton", "torch"
_ALIASES = {"ext": EXT, "cuda": EXT, "cpp": EXT, "c++": EXT, "triton": TRITON, "torch": TORCH, "reference": TORCH}


@lru_cache(maxsize=None)
def extension():
    """The compiled fastmask._C module, or None (with the reason in extension_status())."""
    try:
        return importlib.import_module("fastmask._C")
    except ImportError as err:  # not built (FASTMASK_BUILD_EXT=0, no compiler) or built for another torch
        _ext_error.append(str(err))
        return None


_ext_error: list[str] = []


def extension_status() -> str:
    ext = extension()
    if ext is None:
        why = _ext_error[0] if _ext_error else "disabled"
        return f"not loaded ({why}); using the PyTorch reference on CPU"
    return f"loaded from {ext.__file__} (CUDA kernels: {'yes' if ext.built_with_cuda() else 'no'})"


def extension_supports(device_type: str) -> bool:
    ext = extension()
    if ext is None:
        return False
    return device_type == "cpu" or (device_type == "cuda" and ext.built_with_cuda())


@lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on the CPU through numpy (CI's way of testing them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_supports(device_type: str) -> bool:
    if not triton_available():
        return False
    return device_type == "cuda" or (device_type == "cpu" and triton_interpreting())


def forced() -> str | None:
    name = os.environ.get("FASTMASK_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in _ALIASES:
        raise FastmaskError(f"FASTMASK_BACKEND={name!r} is not one of ext, cuda, cpp, triton, torch")
    return _ALIASES[name]


def select(device_type: str, has_ext_kernel: bool = True, has_triton_kernel: bool = True) -> str:
    """The backend for one op on one device type. A forced backend that cannot run here falls back, with a warning."""
    choices = []
    if has_ext_kernel and extension_supports(device_type):
        choices.append(EXT)
    if has_triton_kernel and triton_supports(device_type) and (device_type == "cuda" or forced() == TRITON):
        choices.append(TRITON)
    choices.append(TORCH)
    want = forced()
    if want is not None:
        if want in choices:
            return want
        warnings.warn(f"FASTMASK_BACKEND={want} cannot run on {device_type} here; using {choices[0]}", stacklevel=3)
    return choices[0]
