"""torch.ops.fastmask.masked_act: schema, input checks, fake impl, autograd, and dispatch to a backend.

The op is a torch.library custom op whose body picks the implementation per device (see backends.py): the
compiled extension's kernels (torch.ops.fastmask_C.*, registered from csrc/ with TORCH_LIBRARY_IMPL), the Triton
kernels, or the PyTorch reference. Keeping dispatch in one Python body lets FASTMASK_BACKEND force any of them and
lets the package run when the extension was not built.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import FastmaskError
from . import backends, reference
from .dtypes import MASK_DTYPES, X_DTYPES


def check_inputs(x: torch.Tensor, mask: torch.Tensor, coeffs: Optional[torch.Tensor]) -> None:
    if x.dtype not in X_DTYPES:
        raise FastmaskError(f"masked_act: x must be fp32/fp16/bf16/fp64, got {x.dtype}")
    if mask.dtype not in MASK_DTYPES:
        raise FastmaskError(f"masked_act: mask must be bool or uint8, got {mask.dtype}")
    if x.dim() not in (2, 4):
        raise FastmaskError(f"masked_act: x must be [G*N, C, H, W] or [G*N, D], got shape {tuple(x.shape)}")
    if mask.dim() != x.dim() or tuple(mask.shape[1:]) != tuple(x.shape[1:]):
        raise FastmaskError(f"masked_act: mask shape {tuple(mask.shape)} does not match x {tuple(x.shape)}: "
                            f"expected [G, {', '.join(map(str, x.shape[1:]))}]")
    groups = mask.shape[0]
    if groups == 0 or x.shape[0] % groups:
        raise FastmaskError(f"masked_act: batch {x.shape[0]} is not a multiple of the {groups} mask groups")
    if mask.device != x.device:
        raise FastmaskError(f"masked_act: mask on {mask.device}, x on {x.device}")
    if coeffs is not None:
        if tuple(coeffs.shape) != (x.shape[1], 3):
            raise FastmaskError(f"masked_act: coeffs must be [{x.shape[1]}, 3], got {tuple(coeffs.shape)}")
        if coeffs.device != x.device:
            raise FastmaskError(f"masked_act: coeffs on {coeffs.device}, x on {x.device}")


def _forward_impl(x, mask, coeffs):
    backend = backends.select(x.device.type)
    if backend == backends.EXT:
        return torch.ops.fastmask_C.masked_act_fwd(x, mask, coeffs)
    if backend == backends.TRITON:
        from .triton import masked_act as triton_masked_act
        return triton_masked_act.forward(x, mask, coeffs)
    return reference.masked_act(x, mask, coeffs)


def _backward_impl(grad, x, mask, coeffs):
    backend = backends.select(x.device.type)
    if backend == backends.EXT:
        return tuple(torch.ops.fastmask_C.masked_act_bwd(grad, x, mask, coeffs))
    if backend == backends.TRITON:
        from .triton import masked_act as triton_masked_act
        return triton_masked_act.backward(grad, x, mask, coeffs)
    return reference.masked_act_backward(grad, x, mask, coeffs)


@torch.library.custom_op("fastmask::masked_act", mutates_args=())
def masked_act_op(x: torch.Tensor, mask: torch.Tensor, coeffs: Optional[torch.Tensor]) -> torch.Tensor:
    return _forward_impl(x, mask, coeffs)


@masked_act_op.register_fake
def _(x, mask, coeffs):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastmask::masked_act_backward", mutates_args=())
def masked_act_backward_op(grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                           coeffs: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dcoeffs = _backward_impl(grad, x, mask, coeffs)
    return dx, dcoeffs


@masked_act_backward_op.register_fake
def _(grad, x, mask, coeffs):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if coeffs is None:
        return dx, x.new_empty(0, dtype=torch.float32)
    return dx, torch.empty_like(coeffs)


def _setup_context(ctx, inputs, output):
    x, mask, coeffs = inputs
    ctx.save_for_backward(x, mask, coeffs)
    ctx.has_coeffs = coeffs is not None


def _backward(ctx, grad):
    x, mask, coeffs = ctx.saved_tensors
    dx, dcoeffs = masked_act_backward_op(grad.contiguous(), x, mask, coeffs if ctx.has_coeffs else None)
    return dx, None, (dcoeffs if ctx.has_coeffs else None)


masked_act_op.register_autograd(_backward, setup_context=_setup_context)


def masked_relu(x: torch.Tensor, mask: torch.Tensor, coeffs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ReLU where mask is 1, the replacement (identity, or c0 + c1*x + c2*x^2 per channel) where it is 0.

    mask may be [C, H, W] (one mask for the whole batch) or [G, C, H, W]: image n then uses mask n // (batch / G).
    """
    if mask.dim() == x.dim() - 1:
        mask = mask.unsqueeze(0)
    check_inputs(x, mask, coeffs)
    return masked_act_op(x, mask, coeffs)  # every backend handles an empty batch; going through keeps autograd
