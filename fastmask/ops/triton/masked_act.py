"""Triton kernels of the masked activation, forward and backward, hypothesis-grouped (image n uses mask n // N).

Semantics are fastmask/ops/reference.py's masked_act / masked_act_backward: mask != 0 keeps the ReLU, mask == 0 applies
the replacement (identity, or c0 + c1*x + c2*x^2 with per-channel coeffs [C, 3]); arithmetic in fp32 (fp64 for an fp64
x, the COMPUTE constexpr), results in x's dtype.

Tiling: x is viewed as rows of [C, HW] per image (HW = H*W, or 1 for a 2-D x). One program owns one image and a block
of BLOCK_C whole channels, and walks HW in chunks of BLOCK_HW. Each program's tile is contiguous in memory (so loads
coalesce and vectorize), the channel of every element is known without a division (so coeffs load once per row),
the mask group is one scalar division per program, and the backward's per-channel dcoeffs sums reduce along a tile
axis into a [G*N, C, 3] partial buffer that one torch sum finishes (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..dtypes import compute_dtype
from .launch import as_uint8, on_device

# Elements per program: large enough that the kernel streams at HBM speed, small enough to keep registers low.
TILE_ELEMENTS = 4096
MAX_BLOCK_HW = 1024
NUM_WARPS = 8
TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}  # compute_dtype's answers as kernel constexprs


@triton.jit
def _program_tile(C, HW, per_group, c_blocks, BLOCK_C: tl.constexpr):
    """This program's image, its BLOCK_C channels (and which exist), and the int64 offsets of the image in x and of
    its mask group in mask (int64: G*N*C*H*W can pass 2^31 when many hypotheses are stacked)."""
    pid = tl.program_id(0)
    image = pid // c_blocks
    chans = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    x_base = image.to(tl.int64) * C * HW
    mask_base = (image // per_group).to(tl.int64) * C * HW
    return image, chans, chans < C, x_base, mask_base


@triton.jit
def _chunk(chans, chan_ok, start, HW, BLOCK_HW: tl.constexpr):
    """Offsets within an image of the [BLOCK_C, BLOCK_HW] chunk at start, and which of them exist."""
    hw = start + tl.arange(0, BLOCK_HW)
    return chans[:, None] * HW + hw[None, :], chan_ok[:, None] & (hw < HW)[None, :]


@triton.jit
def _masked_act_fwd_kernel(x_ptr, mask_ptr, coeffs_ptr, out_ptr, C, HW, per_group, c_blocks,
                           HAS_COEFFS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_HW: tl.constexpr):
    image, chans, chan_ok, x_base, mask_base = _program_tile(C, HW, per_group, c_blocks, BLOCK_C)
    if HAS_COEFFS:
        c0 = tl.load(coeffs_ptr + chans * 3 + 0, mask=chan_ok, other=0.0)[:, None]
        c1 = tl.load(coeffs_ptr + chans * 3 + 1, mask=chan_ok, other=0.0)[:, None]
        c2 = tl.load(coeffs_ptr + chans * 3 + 2, mask=chan_ok, other=0.0)[:, None]
    for start in range(0, HW, BLOCK_HW):
        offs, ok = _chunk(chans, chan_ok, start, HW, BLOCK_HW)
        x = tl.load(x_ptr + x_base + offs, mask=ok, other=0.0).to(COMPUTE)
        keep = tl.load(mask_ptr + mask_base + offs, mask=ok, other=0) != 0
        if HAS_COEFFS:
            replaced = c0 + c1 * x + c2 * x * x
        else:
            replaced = x
        relu = tl.where(x < 0.0, 0.0, x)  # keeps NaN as NaN, like torch.relu
        y = tl.where(keep, relu, replaced)
        tl.store(out_ptr + x_base + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _masked_act_bwd_kernel(grad_ptr, x_ptr, mask_ptr, coeffs_ptr, dx_ptr, partial_ptr, C, HW, per_group, c_blocks,
                           HAS_COEFFS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_HW: tl.constexpr):
    image, chans, chan_ok, x_base, mask_base = _program_tile(C, HW, per_group, c_blocks, BLOCK_C)
    if HAS_COEFFS:
        c1 = tl.load(coeffs_ptr + chans * 3 + 1, mask=chan_ok, other=0.0)[:, None]
        c2 = tl.load(coeffs_ptr + chans * 3 + 2, mask=chan_ok, other=0.0)[:, None]
        sum_g = tl.zeros([BLOCK_C], dtype=COMPUTE)
        sum_gx = tl.zeros([BLOCK_C], dtype=COMPUTE)
        sum_gxx = tl.zeros([BLOCK_C], dtype=COMPUTE)
    for start in range(0, HW, BLOCK_HW):
        offs, ok = _chunk(chans, chan_ok, start, HW, BLOCK_HW)
        x = tl.load(x_ptr + x_base + offs, mask=ok, other=0.0).to(COMPUTE)
        g = tl.load(grad_ptr + x_base + offs, mask=ok, other=0.0).to(COMPUTE)
        keep = tl.load(mask_ptr + mask_base + offs, mask=ok, other=0) != 0
        if HAS_COEFFS:
            g_replaced = g * (c1 + 2.0 * c2 * x)
        else:
            g_replaced = g
        dx = tl.where(keep, tl.where(x > 0.0, g, 0.0), g_replaced)
        tl.store(dx_ptr + x_base + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        if HAS_COEFFS:
            # Out-of-range lanes loaded g = 0, so they add nothing.
            g_free = tl.where(keep, 0.0, g)
            sum_g += tl.sum(g_free, axis=1)
            sum_gx += tl.sum(g_free * x, axis=1)
            sum_gxx += tl.sum(g_free * x * x, axis=1)
    if HAS_COEFFS:
        row = (image.to(tl.int64) * C + chans) * 3
        tl.store(partial_ptr + row + 0, sum_g, mask=chan_ok)
        tl.store(partial_ptr + row + 1, sum_gx, mask=chan_ok)
        tl.store(partial_ptr + row + 2, sum_gxx, mask=chan_ok)


def _layout(x: torch.Tensor, mask: torch.Tensor):
    """(C, HW, images per mask group, BLOCK_C, BLOCK_HW, channel blocks) for a contiguous x."""
    channels = x.shape[1]
    plane = x.numel() // (x.shape[0] * channels)
    block_hw = min(triton.next_power_of_2(plane), MAX_BLOCK_HW)
    block_c = min(max(TILE_ELEMENTS // block_hw, 1), triton.next_power_of_2(channels))
    return channels, plane, x.shape[0] // mask.shape[0], block_c, block_hw, triton.cdiv(channels, block_c)


def forward(x: torch.Tensor, mask: torch.Tensor, coeffs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """masked_act on a [G*N, C, H, W] or [G*N, D] x with a [G, ...] bool/uint8 mask; coeffs [C, 3] or None."""
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    mask = as_uint8(mask.contiguous())
    compute = compute_dtype(x.dtype)
    coeffs = coeffs.contiguous().to(compute) if coeffs is not None else None
    channels, plane, per_group, block_c, block_hw, c_blocks = _layout(x, mask)
    grid = (x.shape[0] * c_blocks,)
    with on_device(x):
        _masked_act_fwd_kernel[grid](x, mask, coeffs if coeffs is not None else x, out, channels, plane, per_group,
                                     c_blocks, HAS_COEFFS=coeffs is not None, COMPUTE=TL_DTYPES[compute],
                                     BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=NUM_WARPS)
    return out


def backward(grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
             coeffs: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dcoeffs): dcoeffs is [C, 3] in coeffs' dtype, or an empty fp32 tensor when coeffs is None."""
    x = x.contiguous()
    grad = grad.contiguous()
    dx = torch.empty_like(x)
    has_coeffs = coeffs is not None
    if not has_coeffs:
        dcoeffs = torch.empty(0, device=x.device, dtype=torch.float32)
    if x.numel() == 0:
        if has_coeffs:
            dcoeffs = torch.zeros_like(coeffs)
        return dx, dcoeffs
    mask = as_uint8(mask.contiguous())
    compute = compute_dtype(x.dtype)
    coeffs_c = coeffs.contiguous().to(compute) if has_coeffs else x
    channels, plane, per_group, block_c, block_hw, c_blocks = _layout(x, mask)
    # Per-(image, channel) partial sums; summing them in torch keeps the result deterministic. Without coeffs the
    # kernel never touches partial (or coeffs), so x stands in for both.
    partial = torch.empty((x.shape[0], channels, 3), device=x.device, dtype=compute) if has_coeffs else x
    grid = (x.shape[0] * c_blocks,)
    with on_device(x):
        _masked_act_bwd_kernel[grid](grad, x, mask, coeffs_c, dx, partial, channels, plane, per_group, c_blocks,
                                     HAS_COEFFS=has_coeffs, COMPUTE=TL_DTYPES[compute], BLOCK_C=block_c,
                                     BLOCK_HW=block_hw, num_warps=NUM_WARPS)
    if has_coeffs:
        dcoeffs = partial.sum(0).to(coeffs.dtype)
    return dx, dcoeffs
