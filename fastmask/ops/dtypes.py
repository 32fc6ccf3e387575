"""The dtypes every op accepts, and the dtype its arithmetic runs in (the same rule in every backend)."""
from __future__ import annotations

import torch

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MASK_DTYPES = (torch.bool, torch.uint8)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, else fp32: half-precision inputs are widened once and rounded once at the end."""
    return torch.float64 if dtype == torch.float64 else torch.float32
