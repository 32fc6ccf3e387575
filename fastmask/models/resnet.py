"""ResNet18 in SNL's convention: conv3x3 stride-1 stem + BN with NO stem ReLU; a MaskedReLU after bn1 and after
each residual add of every BasicBlock. 16 sites; 491,520 ReLUs at width 64 and 32x32 input."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..nn import MaskedReLU
from .folding import FoldedBlock, FoldedConv


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, in_size: int, polynomial: bool = False):
        super().__init__()
        out_size = (in_size + stride - 1) // stride
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = MaskedReLU((planes, out_size, out_size), polynomial)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))
        # after the residual add: its input is the (unnormalized) residual stream, so it keeps the identity
        self.relu2 = MaskedReLU((planes, out_size, out_size), polynomial, normalized_input=False)
        self.out_size = out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))

    def fold(self) -> FoldedBlock:
        """This block for the fused path (eval-mode BN; fold again after the weights or statistics change)."""
        shortcut = FoldedConv.of(self.shortcut[0], self.shortcut[1]) if len(self.shortcut) else None
        return FoldedBlock(conv1=FoldedConv.of(self.conv1, self.bn1, self.relu1),
                           conv2=FoldedConv.of(self.conv2, self.bn2, self.relu2), shortcut=shortcut)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int, image_size: int, width: int = 64, in_channels: int = 3,
                 polynomial: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes, size = [], width, image_size
        for stage, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2 ** stage
            blocks = []
            for block_stride in (stride, 1):
                block = BasicBlock(in_planes, planes, block_stride, size, polynomial)
                blocks.append(block)
                in_planes, size = planes, block.out_size
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(in_planes, num_classes)

    @property
    def blocks(self) -> list[BasicBlock]:
        return [b for layer in (self.layer1, self.layer2, self.layer3, self.layer4) for b in layer]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(x)
        for block in self.blocks:
            out = block(out)
        return self.head(out)
