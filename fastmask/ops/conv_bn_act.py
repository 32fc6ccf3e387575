"""torch.ops.fastmask.conv_bn_act: conv2d + eval-mode BN (scale/shift) + residual + masked activation, fused.

Used by hypothesis scoring: x holds G*N images, the mask's leading dim G picks the hypothesis (image n uses mask
n // N), and only the activations are repeated per hypothesis, never the weights or masks. The body dispatches with
fastmask.ops.backends: the Triton kernel on CUDA (or on the CPU when FASTMASK_BACKEND=triton and TRITON_INTERPRET=1),
else the PyTorch reference. There is no compiled-extension kernel for this op. Plain eager calls of conv_bn_act()
run the same body without the dispatcher round trip (host time matters at these layer sizes); torch.compile, fake
tensors and opcheck go through the registered op.

Inference only: it has no autograd formula, and calling it under grad mode with inputs that require grad raises a
FastmaskError (train through the unfused modules instead).

The output is in x's memory format (channels_last in, channels_last out; anything else gives contiguous NCHW), from
every backend and from the fake impl alike, so torch.compile and opcheck see the strides the kernel really writes.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import FastmaskError
from . import backends, reference
from .dtypes import MASK_DTYPES, X_DTYPES


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def output_shape(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> tuple[int, int, int, int]:
    return (x.shape[0], weight.shape[0], output_size(x.shape[2], weight.shape[2], stride, padding),
            output_size(x.shape[3], weight.shape[3], stride, padding))


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is laid out that way (and not also plain contiguous), else contiguous NCHW."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _empty_output(x, weight, stride, padding):
    return torch.empty(output_shape(x, weight, stride, padding), device=x.device, dtype=x.dtype,
                       memory_format=memory_format_of(x))


def check_inputs(x, weight, scale, shift, mask, residual, coeffs, stride, padding) -> None:
    if x.dtype not in X_DTYPES:
        raise FastmaskError(f"conv_bn_act: x must be fp32/fp16/bf16/fp64, got {x.dtype}")
    if x.dim() != 4 or weight.dim() != 4:
        raise FastmaskError(f"conv_bn_act: x must be [N, C, H, W] and weight [C_out, C_in, kh, kw], got "
                            f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise FastmaskError(f"conv_bn_act: weight expects {weight.shape[1]} input channels, x has {x.shape[1]}")
    if stride < 1 or padding < 0:
        raise FastmaskError(f"conv_bn_act: stride must be >= 1 and padding >= 0, got {stride} and {padding}")
    shape = output_shape(x, weight, stride, padding)
    if shape[2] < 1 or shape[3] < 1:
        raise FastmaskError(f"conv_bn_act: a {tuple(weight.shape[2:])} kernel with padding {padding} does not fit a "
                            f"{tuple(x.shape[2:])} input; use a larger input or more padding")
    c_out = weight.shape[0]
    for name, vector in (("scale", scale), ("shift", shift)):
        if tuple(vector.shape) != (c_out,):
            raise FastmaskError(f"conv_bn_act: {name} must be [{c_out}] (one per output channel), "
                                f"got {tuple(vector.shape)}")
    if mask is not None:
        if mask.dtype not in MASK_DTYPES:
            raise FastmaskError(f"conv_bn_act: mask must be bool or uint8, got {mask.dtype}")
        if mask.dim() != 4 or tuple(mask.shape[1:]) != shape[1:]:
            raise FastmaskError(f"conv_bn_act: mask must be [G, {shape[1]}, {shape[2]}, {shape[3]}] (the output's "
                                f"channels and size), got {tuple(mask.shape)}")
        if mask.shape[0] == 0 or x.shape[0] % mask.shape[0]:
            raise FastmaskError(f"conv_bn_act: batch {x.shape[0]} is not a multiple of the {mask.shape[0]} mask groups")
    if residual is not None and tuple(residual.shape) != shape:
        raise FastmaskError(f"conv_bn_act: residual must be shaped like the output {shape}, "
                            f"got {tuple(residual.shape)}")
    if coeffs is not None:
        if mask is None:
            raise FastmaskError("conv_bn_act: coeffs need a mask (they replace the ReLUs the mask removes)")
        if tuple(coeffs.shape) != (c_out, 3):
            raise FastmaskError(f"conv_bn_act: coeffs must be [{c_out}, 3], got {tuple(coeffs.shape)}")
    for name, tensor in (("weight", weight), ("scale", scale), ("shift", shift), ("mask", mask),
                         ("residual", residual), ("coeffs", coeffs)):
        if tensor is not None and tensor.device != x.device:
            raise FastmaskError(f"conv_bn_act: {name} on {tensor.device}, x on {x.device}; move them together")


def _compute(x, weight, scale, shift, mask, residual, coeffs, stride: int, padding: int) -> torch.Tensor:
    backend = backends.select(x.device.type, has_ext_kernel=False)
    if backend == backends.TRITON and x.dtype != torch.float64:
        from .triton import conv_bn_act as triton_conv_bn_act
        out = _empty_output(x, weight, stride, padding)
        return triton_conv_bn_act.conv_bn_act(x, weight, scale, shift, mask, residual, coeffs, stride, padding, out)
    y = reference.conv_bn_act(x, weight, scale, shift, mask, residual, coeffs, stride=stride, padding=padding)
    return y.contiguous(memory_format=memory_format_of(x))


@torch.library.custom_op("fastmask::conv_bn_act", mutates_args=())
def conv_bn_act_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                   mask: Optional[torch.Tensor], residual: Optional[torch.Tensor], coeffs: Optional[torch.Tensor],
                   stride: int, padding: int) -> torch.Tensor:
    return _compute(x, weight, scale, shift, mask, residual, coeffs, stride, padding)


@conv_bn_act_op.register_fake
def _(x, weight, scale, shift, mask, residual, coeffs, stride, padding):
    return _empty_output(x, weight, stride, padding)


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                mask: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                coeffs: Optional[torch.Tensor] = None, stride: int = 1, padding: int = 1) -> torch.Tensor:
    """conv2d(x, weight) * scale + shift (+ residual), then the masked activation; eval mode, inference only.

    x [G*N, C_in, H, W]; weight [C_out, C_in, kh, kw] (no bias); scale/shift [C_out] (fastmask.ops.reference.
    fold_batchnorm gives them); mask [G, C_out, OH, OW] or [C_out, OH, OW], bool/uint8, image n uses mask n // N, None
    means no activation (a shortcut conv + BN); residual shaped like the output; coeffs [C_out, 3] replace removed
    ReLUs with c0 + c1*y + c2*y^2 instead of the identity. Computes in fp32 (fp64 for fp64 x, on the reference), returns
    x's dtype in x's memory format
    (pass channels_last tensors on the GPU: that is the kernel's layout).
    """
    if mask is not None and mask.dim() == 3:
        mask = mask.unsqueeze(0)
    check_inputs(x, weight, scale, shift, mask, residual, coeffs, stride, padding)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, scale, shift, residual, coeffs)):
        raise FastmaskError("conv_bn_act is inference only (no backward): call it under torch.no_grad() or "
                            "torch.inference_mode(), or detach its inputs")
    if type(x) is torch.Tensor and not torch.compiler.is_compiling():
        # Plain eager call: run the body directly. The dispatcher round trip through the custom op costs about as
        # much host time as the kernel's GPU time on small layers; tracing, fake and subclass tensors take the op.
        return _compute(x, weight, scale, shift, mask, residual, coeffs, stride, padding)
    return conv_bn_act_op(x, weight, scale, shift, mask, residual, coeffs, stride, padding)
