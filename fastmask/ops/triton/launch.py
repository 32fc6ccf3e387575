"""What every launcher needs: interpreter detection, the device a launch runs on, power-of-two block sizes."""
from __future__ import annotations

import contextlib
import os

import torch


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on the CPU through numpy (CI's way of testing them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device, not the tensor's: make them the same for the launch."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def as_uint8(mask: torch.Tensor) -> torch.Tensor:
    """Masks arrive as bool or uint8; kernels read bytes and treat non-zero as keep (as mask.bool() does)."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask
