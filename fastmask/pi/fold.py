"""Eval-mode BatchNorm as a per-channel affine map, and folded into the conv or linear layer beside it: a PI runtime
then pays nothing for BN (a public scale is free, a secret one would cost a multiplication per element)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..ops.reference import fold_batchnorm


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with bn(x) == scale[c] * x + shift[c] in eval mode, in float64 so folding adds no error."""
    return fold_batchnorm(bn, torch.float64)


def conv_bn(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the conv followed by bn, as one conv; bias is zeros for a bias-free conv without bn."""
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    if bn is not None:
        scale, shift = bn_affine(bn)
        weight = weight * scale.view(-1, 1, 1, 1)
        bias = bias * scale + shift
    return weight.float(), bias.float()


def bn_linear(bn: nn.BatchNorm2d, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of linear(avgpool(bn(x))) as linear(avgpool(x)): the pool is per channel, so bn commutes."""
    scale, shift = bn_affine(bn)
    weight = linear.weight.detach().double()
    bias = linear.bias.detach().double() if linear.bias is not None else torch.zeros(weight.shape[0],
                                                                                     dtype=torch.float64)
    return (weight * scale.view(1, -1)).float(), (bias + weight @ shift).float()
