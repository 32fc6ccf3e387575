"""Triton implicit-GEMM conv2d + eval-mode BN (per-channel scale/shift) + residual + masked activation, in one kernel.

The GEMM: rows M = output pixels (image, oh, ow) of all G*N images, columns = C_out, reduction K = (kh, kw, C_in).
Every K step gathers an input tile straight from x (zero for the padding halo; no im2col buffer) and a weight tile,
and accumulates in fp32 with tl.dot. The epilogue applies scale/shift, adds the residual, and applies the masked
activation of image n with mask n // N (the mask's leading dim is the hypothesis group), then stores once.

Memory layout: NHWC (torch.channels_last) for x and the weight. The K loop walks (kh, kw) outside and C_in inside,
so with channels_last each A row (one pixel) and each B column (one output channel) is a contiguous run of C_in
values: the gathers coalesce and vectorize for any stride or padding, and the halo test is one per pixel per (kh, kw)
rather than one per element. The output tile [pixels, C_out] is stored with C_out contiguous when the output is
channels_last. The launcher converts a contiguous-NCHW x or weight to channels_last (one copy; pass channels_last to
avoid it); the op allocates the output in x's own memory format, so a channels_last network stays channels_last with
no copies. The kernel takes every tensor by strides, so it is correct for any layout. The mask [G, C_out, OH, OW] and
the residual are read by strides too: a mask group is only C_out*OH*OW bytes, read by all N images of its group, so
it is served from L2 whatever its layout.

C_in < 16 (the stem's 3 channels) uses a packed K: K runs over (kh, kw, C_in) together so a 3x3x3 stem is one K tile
of 32 rather than 9 tiles of 16 that are mostly padding. tl.dot needs every dim >= 16 on the GPU; every config's
blocks are.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting
from .launch import as_uint8, on_device

PACKED_K_BELOW = 16  # C_in below this packs (kh, kw, C_in) into one K axis


def configs(pointwise: bool) -> list:
    """Launch configs to autotune over (Hopper-sized tiles); one small config under the interpreter."""
    if triton_interpreting():
        # The interpreter crashes autotuning more than one config, and tiny tiles keep it fast.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    shapes = [(128, 64, 32, 4), (128, 128, 64, 3), (128, 128, 64, 4), (128, 64, 64, 4), (64, 128, 64, 4),
              (64, 128, 64, 5), (128, 128, 32, 4), (64, 64, 64, 4)]
    # 4 warps: implicit GEMM with kh*kw > 1 and 8 warps gives wrong results (triton#1254); 1x1 (a plain GEMM) may.
    found = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=4, num_stages=s)
             for m, n, k, s in shapes]
    if pointwise:
        found.append(triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3))
    return found


def autotuning() -> bool:
    """FASTMASK_TRITON_AUTOTUNE=0 skips tuning (first config only): no tuning pause on each new shape."""
    return os.environ.get("FASTMASK_TRITON_AUTOTUNE", "1") != "0"


_TUNING_KEY = ["M", "C_IN", "C_OUT", "H", "W", "KH", "KW", "STRIDE", "PAD", "HAS_RES", "HAS_MASK"]


@triton.jit
def _conv_bn_act_kernel(
        x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, mask_ptr, coeffs_ptr, out_ptr,
        M, C_IN, H, W, C_OUT, OH, OW, per_group,
        sxn, sxc, sxh, sxw, swo, swi, swh, sww, srn, src, srh, srw, smg, smc, smh, smw, son, soc, soh, sow,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        HAS_RES: tl.constexpr, HAS_MASK: tl.constexpr, HAS_COEFFS: tl.constexpr, PACKED_K: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(C_OUT, BLOCK_N)
    # Column blocks fastest: programs that run together share one input tile (read once from HBM).
    pid_m = pid // n_blocks
    pid_n = pid % n_blocks

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < C_OUT
    image = rows // (OH * OW)
    pixel = rows % (OH * OW)
    oh = pixel // OW
    ow = pixel % OW
    ih0 = oh * STRIDE - PAD
    iw0 = ow * STRIDE - PAD
    image64 = image.to(tl.int64)
    x_rows = x_ptr + image64 * sxn + ih0 * sxh + iw0 * sxw  # may point into the halo; loads there are masked
    ks = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PACKED_K:
        for k0 in range(0, KH * KW * C_IN, BLOCK_K):
            k = k0 + ks
            k_ok = k < KH * KW * C_IN
            ci = k % C_IN
            tap = k // C_IN
            r = tap // KW
            s = tap % KW
            ih = ih0[:, None] + r[None, :]
            iw = iw0[:, None] + s[None, :]
            a_ok = (row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            a = tl.load(x_rows[:, None] + (r * sxh + s * sxw + ci * sxc)[None, :], mask=a_ok, other=0.0)
            b = tl.load(w_ptr + cols[None, :] * swo + (ci * swi + r * swh + s * sww)[:, None],
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        c_blocks = tl.cdiv(C_IN, BLOCK_K)
        # One flat loop over (kh, kw, C_in block) so the software pipeline spans the whole reduction.
        for step in range(0, KH * KW * c_blocks):
            tap = step // c_blocks
            ci = (step - tap * c_blocks) * BLOCK_K + ks
            r = tap // KW
            s = tap - r * KW
            ih = ih0 + r
            iw = iw0 + s
            pixel_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            k_ok = ci < C_IN
            a = tl.load(x_rows[:, None] + (r * sxh + s * sxw) + ci[None, :] * sxc,
                        mask=pixel_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + cols[None, :] * swo + ci[:, None] * swi + (r * swh + s * sww),
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
    y = acc * scale[None, :] + shift[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_RES:
        res = tl.load(res_ptr + (image64 * srn + oh * srh + ow * srw)[:, None] + cols[None, :] * src,
                      mask=out_ok, other=0.0)
        y += res.to(tl.float32)
    if HAS_MASK:
        group64 = (image // per_group).to(tl.int64)
        keep = tl.load(mask_ptr + (group64 * smg + oh * smh + ow * smw)[:, None] + cols[None, :] * smc,
                       mask=out_ok, other=0) != 0
        if HAS_COEFFS:
            c0 = tl.load(coeffs_ptr + cols * 3 + 0, mask=col_ok, other=0.0)[None, :]
            c1 = tl.load(coeffs_ptr + cols * 3 + 1, mask=col_ok, other=0.0)[None, :]
            c2 = tl.load(coeffs_ptr + cols * 3 + 2, mask=col_ok, other=0.0)[None, :]
            replaced = c0 + c1 * y + c2 * y * y
        else:
            replaced = y
        y = tl.where(keep, tl.where(y < 0.0, 0.0, y), replaced)
    tl.store(out_ptr + (image64 * son + oh * soh + ow * sow)[:, None] + cols[None, :] * soc,
             y.to(out_ptr.dtype.element_ty), mask=out_ok)


# Two tuners over one kernel: 1x1 convs (plain GEMMs) may use 8 warps, larger kernels may not (triton#1254).
_tuned = {pointwise: triton.autotune(configs=configs(pointwise), key=_TUNING_KEY)(_conv_bn_act_kernel)
          for pointwise in (False, True)}
# The tuner's winners by problem: later launches go straight to the kernel, skipping the tuner's per-call key
# building (tens of microseconds of Python for this many arguments).
_best: dict[tuple, triton.Config] = {}


def _precision(x: torch.Tensor) -> str:
    """fp32 dots: exact under the interpreter; on the GPU follow torch's own conv setting (tf32 by default)."""
    if x.dtype != torch.float32 or triton_interpreting() or x.device.type != "cuda":
        return "ieee"
    return "tf32" if cudnn_conv_allows_tf32() else "ieee"


def cudnn_conv_allows_tf32() -> bool:
    """torch's fp32 conv setting, set either way: the legacy flag, or fp32_precision (torch >= 2.9), after which
    reading the legacy flag raises."""
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return torch.backends.cudnn.conv.fp32_precision == "tf32"


def _rows_bucket(rows: int) -> int:
    """Problems are remembered by rows rounded up to a power of two: every config is correct at any row count and the
    best one barely moves within a factor of 2, while scoring's chunk sizes (so rows) vary from call to call and
    retuning each costs seconds."""
    return triton.next_power_of_2(rows)


def _strides(t: Optional[torch.Tensor]) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                mask: Optional[torch.Tensor], residual: Optional[torch.Tensor], coeffs: Optional[torch.Tensor],
                stride: int, padding: int, out: torch.Tensor, config: Optional[triton.Config] = None) -> torch.Tensor:
    """Writes the fused op into out and returns it; config pins one launch config (else autotuned, see autotuning()).

    Inputs are checked by fastmask/ops/conv_bn_act.py: x [G*N, C_in, H, W], weight [C_out, C_in, kh, kw],
    scale/shift [C_out], mask [G, C_out, OH, OW] or None (no activation), residual shaped like out or None, coeffs
    [C_out, 3] or None; out [G*N, C_out, OH, OW] in x's dtype, any strides (the op allocates it in x's memory format).
    """
    batch, c_in, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    oh, ow = out.shape[2], out.shape[3]
    if out.numel() == 0:
        return out
    x = x.contiguous(memory_format=torch.channels_last)
    weight = weight.to(x.dtype).contiguous(memory_format=torch.channels_last)
    scale = scale.float().contiguous()
    shift = shift.float().contiguous()
    if mask is not None:
        mask = as_uint8(mask)
    if coeffs is not None:
        coeffs = coeffs.float().contiguous()
    rows = batch * oh * ow
    per_group = batch // mask.shape[0] if mask is not None else 1
    problem = (_rows_bucket(rows), c_in, c_out, height, width, kh, kw, stride, padding, residual is not None,
               mask is not None, coeffs is not None, x.dtype, out.dtype, _precision(x), x.device.index)
    if config is None:
        config = _best.get(problem) if autotuning() else configs(kh * kw == 1)[0]
    if config is None:
        kernel, launch_options = _tuned[kh * kw == 1], {}
    else:
        kernel = _conv_bn_act_kernel
        launch_options = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]),)

    with on_device(x):
        kernel[grid](
            x, weight, scale, shift, residual if residual is not None else x, mask if mask is not None else x,
            coeffs if coeffs is not None else scale, out,
            rows, c_in, height, width, c_out, oh, ow, per_group,
            *x.stride(), *weight.stride(), *_strides(residual), *_strides(mask), *out.stride(),
            KH=kh, KW=kw, STRIDE=stride, PAD=padding, HAS_RES=residual is not None, HAS_MASK=mask is not None,
            HAS_COEFFS=coeffs is not None and mask is not None, PACKED_K=c_in < PACKED_K_BELOW,
            PRECISION=_precision(x), **launch_options)
    if config is None and getattr(kernel, "best_config", None) is not None:
        _best[problem] = kernel.best_config
    return out
