"""Block forwards through fastmask.ops.conv_bn_act: eval-mode BN folded into per-channel scale/shift, and each
conv + BN (+ residual) + masked activation run as one fused call, hypothesis-grouped by the masks' leading dim.

Used by scoring on CUDA. Every masked site passes its `hypotheses` ([K, *shape]) when set, else its own mask as
[1, *shape] (one mask for every group). Blocks of other types run their own module forward.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from ..models.resnet import BasicBlock
from ..models.wide_resnet import PreActBlock
from ..nn import MaskedReLU
from ..ops.masked_act import masked_relu
from ..ops.reference import fold_batchnorm

_import_error: list[str] = []


def _conv_bn_act() -> Optional[Callable]:
    try:
        from ..ops.conv_bn_act import conv_bn_act
    except ImportError as err:  # the fused op is not in this build
        if not _import_error:
            _import_error.append(str(err))
        return None
    return conv_bn_act


def available() -> bool:
    """Whether fastmask.ops.conv_bn_act can be imported here."""
    return _conv_bn_act() is not None


def unavailable_reason() -> str:
    return _import_error[0] if _import_error else "available"


def _site_mask(site: MaskedReLU) -> torch.Tensor:
    return site.hypotheses if site.hypotheses is not None else site.mask.unsqueeze(0)


def _conv_args(conv: nn.Conv2d) -> dict:
    return {"stride": conv.stride[0], "padding": conv.padding[0]}


class FusedBlocks:
    """Per-block fused forwards with BN folded once (the weights do not change while candidates are scored)."""

    def __init__(self, blocks: list[nn.Module]):
        self.conv_bn_act = _conv_bn_act()
        if self.conv_bn_act is None:
            raise RuntimeError(f"fastmask.ops.conv_bn_act is unavailable: {unavailable_reason()}")
        self.blocks = blocks
        self.folded = [self._fold(block) for block in blocks]

    @staticmethod
    def _fold(block: nn.Module) -> dict:
        if isinstance(block, BasicBlock):
            folded = {"bn1": fold_batchnorm(block.bn1), "bn2": fold_batchnorm(block.bn2),
                      "conv1": _kernel_layout(block.conv1), "conv2": _kernel_layout(block.conv2)}
            if len(block.shortcut):
                folded["shortcut"] = fold_batchnorm(block.shortcut[1])
                folded["shortcut_conv"] = _kernel_layout(block.shortcut[0])
            return folded
        if isinstance(block, PreActBlock):
            planes = block.conv2.out_channels
            ones = torch.ones(planes, device=block.conv2.weight.device)
            folded = {"bn1": fold_batchnorm(block.bn1), "bn2": fold_batchnorm(block.bn2),
                      "identity": (ones, torch.zeros_like(ones)),
                      "conv1": _kernel_layout(block.conv1), "conv2": _kernel_layout(block.conv2)}
            if block.shortcut is not None:
                folded["shortcut_conv"] = _kernel_layout(block.shortcut)
            return folded
        return {}

    def block_forward(self, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        block, folded = self.blocks[index], self.folded[index]
        if isinstance(block, BasicBlock):
            return lambda x: self._basic(block, folded, x)
        if isinstance(block, PreActBlock):
            return lambda x: self._preact(block, folded, x)
        return block

    def _basic(self, block: BasicBlock, folded: dict, x: torch.Tensor) -> torch.Tensor:
        fuse = self.conv_bn_act
        x = x.contiguous(memory_format=torch.channels_last)
        out = fuse(x, folded["conv1"], *folded["bn1"], mask=_site_mask(block.relu1), coeffs=block.relu1.coeffs,
                   **_conv_args(block.conv1))
        if "shortcut" in folded:
            skip = fuse(x, folded["shortcut_conv"], *folded["shortcut"], mask=None, **_conv_args(block.shortcut[0]))
        else:
            skip = x
        return fuse(out, folded["conv2"], *folded["bn2"], mask=_site_mask(block.relu2), residual=skip,
                    coeffs=block.relu2.coeffs, **_conv_args(block.conv2))

    def _preact(self, block: PreActBlock, folded: dict, x: torch.Tensor) -> torch.Tensor:
        fuse = self.conv_bn_act
        x = x.contiguous(memory_format=torch.channels_last)
        activated = _scale_shift_masked_relu(x, *folded["bn1"], block.relu1)
        hidden = fuse(activated, folded["conv1"], *folded["bn2"], mask=_site_mask(block.relu2),
                      coeffs=block.relu2.coeffs, **_conv_args(block.conv1))
        if block.shortcut is None:
            skip = x
        else:
            skip = fuse(activated, folded["shortcut_conv"], *folded["identity"], mask=None,
                        **_conv_args(block.shortcut))
        return fuse(hidden, folded["conv2"], *folded["identity"], mask=None, residual=skip,
                    **_conv_args(block.conv2))


def _kernel_layout(conv: nn.Conv2d) -> torch.Tensor:
    """The conv weight in the kernel's layout (channels_last), converted once instead of on every call."""
    return conv.weight.detach().contiguous(memory_format=torch.channels_last)


def _scale_shift_masked_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                             site: MaskedReLU) -> torch.Tensor:
    """Pre-activation BN (as scale/shift) + masked ReLU in one elementwise pass that keeps x's channels_last layout
    (the masked_act op would return NCHW, and the next fused conv would copy it back). fp32 arithmetic, as the op."""
    y = x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    if site.coeffs is not None:  # the polynomial replacement: the op has it
        return masked_relu(y.to(x.dtype), _site_mask(site), site.coeffs)
    mask = _site_mask(site)
    groups = mask.shape[0]
    grouped = y.view(groups, y.shape[0] // groups, *y.shape[1:])
    out = torch.where(mask.bool().unsqueeze(1), torch.relu(grouped), grouped)
    return out.reshape(y.shape).to(x.dtype)
