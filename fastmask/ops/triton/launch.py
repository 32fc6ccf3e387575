"""What every launcher needs: the device a launch runs on, and masks as bytes."""
from __future__ import annotations

import contextlib

import torch


def on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device, not the tensor's: make them the same for the launch."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def as_uint8(mask: torch.Tensor) -> torch.Tensor:
    """Masks arrive as bool or uint8; kernels read bytes and treat non-zero as keep (as mask.bool() does)."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask
