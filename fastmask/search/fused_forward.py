"""Block forwards through fastmask.ops.conv_bn_act: each conv + folded BN (+ residual) + masked activation as one
fused call, hypothesis-grouped by the masks' leading dim.

Used by scoring on CUDA. A block describes itself through fold() (fastmask.models.folding.FoldedBlock); every masked
site applies its active mask (its hypotheses when set, else its own mask for every group) and its polynomial
coefficients when it has them. Blocks without fold() run their own module forward. Converted models have no blocks
of their own: fastmask.search.fused_graph rewrites their graph.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from ..models.folding import FoldedBlock, FoldedConv
from ..ops.dtypes import compute_dtype
from ..ops.masked_act import masked_relu

_import_error: list[str] = []


def _conv_bn_act() -> Optional[Callable]:
    try:
        from ..ops.conv_bn_act import conv_bn_act
    except ImportError as err:  # the fused op is not in this build
        if not _import_error:
            _import_error.append(str(err))
        return None
    return conv_bn_act


def conv_bn_act_or_raise() -> Callable:
    conv_bn_act = _conv_bn_act()
    if conv_bn_act is None:
        raise RuntimeError(f"fastmask.ops.conv_bn_act is unavailable: {unavailable_reason()}")
    return conv_bn_act


def available() -> bool:
    """Whether fastmask.ops.conv_bn_act can be imported here."""
    return _conv_bn_act() is not None


def unavailable_reason() -> str:
    return _import_error[0] if _import_error else "available"


class FusedBlocks:
    """Per-block fused forwards with BN folded once (the weights do not change while candidates are scored)."""

    def __init__(self, blocks: list[nn.Module]):
        self.conv_bn_act = conv_bn_act_or_raise()
        self.blocks = blocks
        self.folded: list[Optional[FoldedBlock]] = [block.fold() if callable(getattr(block, "fold", None)) else None
                                                    for block in blocks]

    def block_forward(self, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        folded = self.folded[index]
        if folded is None:
            return self.blocks[index]
        return lambda x: self._run(folded, x)

    def _run(self, block: FoldedBlock, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        pre = block.pre
        activated = scale_shift_masked_relu(x, pre.scale, pre.shift, pre.site) if pre is not None else x
        hidden = self._conv(block.conv1, activated)
        skip = self._conv(block.shortcut, activated) if block.shortcut is not None else x
        return self._conv(block.conv2, hidden, residual=skip)

    def _conv(self, step: FoldedConv, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        site = step.site
        mask, coeffs = (site.active_mask(), site.coeffs) if site is not None else (None, None)
        return self.conv_bn_act(x, step.weight, step.scale, step.shift, mask=mask, residual=residual, coeffs=coeffs,
                                stride=step.stride, padding=step.padding)


def scale_shift_masked_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, site) -> torch.Tensor:
    """Pre-activation BN (as scale/shift) + masked ReLU in one elementwise pass that keeps x's channels_last layout
    (the masked_act op would return NCHW, and the next fused conv would copy it back). Arithmetic in the op's dtype."""
    dtype = compute_dtype(x.dtype)
    y = x.to(dtype) * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1)
    mask = site.active_mask()
    if site.coeffs is not None:  # the polynomial replacement: the op has it
        return masked_relu(y.to(x.dtype), mask, site.coeffs)
    groups = mask.shape[0]
    grouped = y.view(groups, y.shape[0] // groups, *y.shape[1:])
    out = torch.where(mask.bool().unsqueeze(1), torch.relu(grouped), grouped)
    return out.reshape(y.shape).to(x.dtype)
