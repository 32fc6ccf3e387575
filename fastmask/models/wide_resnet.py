"""Wide-ResNet-22-8 in SNL's convention: pre-activation blocks (BN -> ReLU -> conv, twice), no ReLU after the
final BN. 18 sites; 1,359,872 ReLUs at width 128 (16 x 8) and 32x32 input.

`width` is the first group's channel count (16 * widen factor); groups have width, 2*width, 4*width channels and
the stem has width // 8 (16 at the default), so narrow models for CPU runs keep the shape of the real one.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..nn import MaskedReLU
from .folding import FoldedAct, FoldedBlock, FoldedConv

DEPTH = 22
BLOCKS_PER_GROUP = (DEPTH - 4) // 6


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, in_size: int, polynomial: bool = False):
        super().__init__()
        out_size = (in_size + stride - 1) // stride
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = MaskedReLU((in_planes, in_size, in_size), polynomial)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = MaskedReLU((planes, out_size, out_size), polynomial)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None  # identity on the block input when shapes match
        if stride != 1 or in_planes != planes:  # projection of the activated input, as in the WRN paper's code
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        self.out_size = out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        skip = x if self.shortcut is None else self.shortcut(activated)
        return out + skip

    def fold(self) -> FoldedBlock:
        """This block for the fused path (eval-mode BN; fold again after the weights or statistics change).
        bn2 follows conv1; conv2 and the projection have no BN and no activation after them."""
        shortcut = FoldedConv.of(self.shortcut) if self.shortcut is not None else None
        return FoldedBlock(conv1=FoldedConv.of(self.conv1, self.bn2, self.relu2), conv2=FoldedConv.of(self.conv2),
                           shortcut=shortcut, pre=FoldedAct.of(self.bn1, self.relu1))


class WideResNet22(nn.Module):
    def __init__(self, num_classes: int, image_size: int, width: int = 128, in_channels: int = 3,
                 polynomial: bool = False):
        super().__init__()
        stem = max(1, width // 8)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)
        groups, in_planes, size = [], stem, image_size
        for group, stride in enumerate((1, 2, 2)):
            planes = width * 2 ** group
            blocks = []
            for index in range(BLOCKS_PER_GROUP):
                block = PreActBlock(in_planes, planes, stride if index == 0 else 1, size, polynomial)
                blocks.append(block)
                in_planes, size = planes, block.out_size
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    @property
    def blocks(self) -> list[PreActBlock]:
        return [b for group in (self.block1, self.block2, self.block3) for b in group]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(self.bn(x), 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(x)
        for block in self.blocks:
            out = block(out)
        return self.head(out)
