"""ResNet-20 for small images (He et al. 2016, CIFAR variant): 3 stages x 3 basic blocks, 16/32/64 channels.

Shortcuts that change shape use a 1x1 projection (option B) so the graph is prunable channel-wise.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU()
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
            if stride != 1 or in_ch != out_ch
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class ResNet20(nn.Module):
    family = "resnet20"
    moves = ("drop_stage", "drop_block", "narrow")

    def __init__(self, depth: int | list[int] = 3, base_channels: int = 16, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        depths = [depth] * 3 if isinstance(depth, int) else list(depth)
        if not depths or min(depths) < 1:
            raise ValueError(f"model: ResNet20 needs at least one stage of depth >= 1; got depth={depth}")
        self.arch = {"stages": len(depths), "depth": depths, "base_channels": base_channels}
        c = base_channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        stages, in_ch = [], c
        for i, d in enumerate(depths):
            out_ch = c * 2**i
            blocks = [BasicBlock(in_ch, out_ch, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(out_ch, out_ch) for _ in range(d - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(torch.flatten(self.pool(x), 1))
