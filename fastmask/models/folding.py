"""A residual block folded for fused inference: each conv with the eval-mode BN after it as a per-channel scale and
shift, and the masked site that follows it.

Every block of fastmask.models is one shape of computation:

    a   = pre(x) when the block has a pre-activation, else x
    out = conv2(conv1(a), residual=shortcut(a) when the block has a projection, else x)

where each conv step is conv -> * scale + shift (-> + residual) -> the site's masked activation (none when the
step has no site). A block's fold() fills this in; the fused scoring path runs it without knowing the block's class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..nn import MaskedReLU
from ..ops.reference import fold_batchnorm


@dataclass(frozen=True)
class FoldedConv:
    """conv (no bias) -> * scale + shift -> masked activation of `site` (None: no activation)."""

    weight: torch.Tensor  # channels_last, the fused kernel's layout, converted once rather than on every call
    scale: torch.Tensor  # [C_out] fp32
    shift: torch.Tensor  # [C_out] fp32
    stride: int
    padding: int
    site: Optional[MaskedReLU]

    @classmethod
    def of(cls, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None,
           site: Optional[MaskedReLU] = None) -> "FoldedConv":
        """A conv step; without a BN after the conv the scale is 1 and the shift 0."""
        if bn is not None:
            scale, shift = fold_batchnorm(bn)
        else:
            scale = torch.ones(conv.out_channels, device=conv.weight.device)
            shift = torch.zeros_like(scale)
        weight = conv.weight.detach().contiguous(memory_format=torch.channels_last)
        return cls(weight, scale, shift, conv.stride[0], conv.padding[0], site)


@dataclass(frozen=True)
class FoldedAct:
    """A pre-activation with no conv before it: * scale + shift (eval-mode BN) -> the site's masked activation."""

    scale: torch.Tensor
    shift: torch.Tensor
    site: MaskedReLU

    @classmethod
    def of(cls, bn: nn.BatchNorm2d, site: MaskedReLU) -> "FoldedAct":
        return cls(*fold_batchnorm(bn), site)


@dataclass(frozen=True)
class FoldedBlock:
    conv1: FoldedConv
    conv2: FoldedConv  # the residual is added after its scale/shift, before its activation
    shortcut: Optional[FoldedConv] = None  # projection of the (pre-activated) input; None: the raw input is added
    pre: Optional[FoldedAct] = None
