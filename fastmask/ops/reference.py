"""Plain-PyTorch version of every fastmask op: the test oracle and the last fallback.

Conventions shared by every backend:
- x is [G*N, C, H, W] or [G*N, D]; mask is [G, C, H, W] (or [G, D]), bool or uint8; image n uses mask n // N.
- mask 1 keeps the ReLU; mask 0 applies the replacement: identity, or with coeffs [C, 3] the polynomial
  c0 + c1*x + c2*x^2 (AutoReP-style). A 2-D x is treated as [G*N, D, 1, 1], so coeffs is then [D, 3].
- Arithmetic is done in fp32 (fp64 for fp64 inputs, see dtypes.compute_dtype) and the result cast back to x's dtype,
  which is what the kernels do too.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .dtypes import compute_dtype


def _grouped(x: torch.Tensor, mask: torch.Tensor):
    """Views x as [G, N, C, ...] and mask as a bool [G, 1, C, ...] that broadcasts over N."""
    groups = mask.shape[0]
    xg = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
    return xg, mask.bool().unsqueeze(1)


def _channel_view(coeffs: torch.Tensor, x_dim: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """coeffs[:, k] in dtype, shaped to broadcast against a grouped [G, N, C, ...] tensor."""
    return coeffs[:, k].to(dtype).reshape(1, 1, -1, *([1] * (x_dim - 2)))


def masked_act(x: torch.Tensor, mask: torch.Tensor, coeffs: Optional[torch.Tensor] = None) -> torch.Tensor:
    xg, keep = _grouped(x, mask)
    dtype = compute_dtype(x.dtype)
    xf = xg.to(dtype)
    if coeffs is None:
        replaced = xf
    else:
        replaced = (_channel_view(coeffs, x.dim(), 0, dtype) + _channel_view(coeffs, x.dim(), 1, dtype) * xf
                    + _channel_view(coeffs, x.dim(), 2, dtype) * xf * xf)
    out = torch.where(keep, torch.relu(xf), replaced)
    return out.to(x.dtype).reshape(x.shape)


def masked_act_backward(grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                        coeffs: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx, dcoeffs); dcoeffs is an empty fp32 tensor when coeffs is None."""
    xg, keep = _grouped(x, mask)
    dtype = compute_dtype(x.dtype)
    xf = xg.to(dtype)
    gf = grad.reshape(xg.shape).to(dtype)
    if coeffs is None:
        slope = torch.ones_like(xf)
    else:
        slope = _channel_view(coeffs, x.dim(), 1, dtype) + 2.0 * _channel_view(coeffs, x.dim(), 2, dtype) * xf
    dx = gf * torch.where(keep, (xf > 0).to(dtype), slope)
    if coeffs is None:
        dcoeffs = torch.empty(0, device=x.device, dtype=torch.float32)
    else:
        g_replaced = torch.where(keep, torch.zeros_like(gf), gf)
        reduce_dims = [d for d in range(g_replaced.dim()) if d != 2]
        dcoeffs = torch.stack([g_replaced.sum(reduce_dims), (g_replaced * xf).sum(reduce_dims),
                               (g_replaced * xf * xf).sum(reduce_dims)], dim=1)
        dcoeffs = dcoeffs.to(coeffs.dtype)
    return dx.to(x.dtype).reshape(x.shape), dcoeffs


def soft_masked_act(x: torch.Tensor, alpha: torch.Tensor, coeffs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SNL's relaxation: alpha * relu(x) + (1 - alpha) * r(x), alpha [C, H, W] learnable (differentiable here), r
    the identity or, with coeffs [C, 3], the per-channel polynomial."""
    if coeffs is None:
        replaced = x
    else:
        view = (1, -1, *([1] * (x.dim() - 2)))
        c = coeffs.to(x.dtype)
        replaced = c[:, 0].reshape(view) + c[:, 1].reshape(view) * x + c[:, 2].reshape(view) * x * x
    return replaced + alpha * (torch.relu(x) - replaced)


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                mask: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                coeffs: Optional[torch.Tensor] = None, stride: int = 1, padding: int = 1) -> torch.Tensor:
    """conv2d (no bias) -> per-channel scale/shift (eval-mode BN) -> + residual -> masked activation.

    mask None means no activation at all (a shortcut conv + BN). Computed in fp32 (fp64 for fp64 x), returned in x's
    dtype.
    """
    dtype = compute_dtype(x.dtype)
    y = F.conv2d(x.to(dtype), weight.to(dtype), stride=stride, padding=padding)
    y = y * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.to(dtype)
    if mask is not None:
        y = masked_act(y, mask, coeffs)
    return y.to(x.dtype)


def fold_batchnorm(bn: torch.nn.BatchNorm2d, dtype: torch.dtype = torch.float32
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = x * scale + shift, computed in `dtype` (an affine-free BN has weight 1, bias 0)."""
    var, mean = bn.running_var.detach().to(dtype), bn.running_mean.detach().to(dtype)
    weight = bn.weight.detach().to(dtype) if bn.weight is not None else torch.ones_like(var)
    bias = bn.bias.detach().to(dtype) if bn.bias is not None else torch.zeros_like(var)
    scale = weight / torch.sqrt(var + bn.eps)
    return scale, bias - mean * scale
