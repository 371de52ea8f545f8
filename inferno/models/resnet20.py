"""ResNet-20 for small images (He et al. 2016, CIFAR variant): 3 stages x 3 basic blocks, 16/32/64 channels.

Shortcuts that change shape use a 1x1 projection (option B) so the graph is prunable channel-wise.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, mid: int | None = None):
        super().__init__()
        mid = mid or out_ch
        self.conv1 = nn.Conv2d(in_ch, mid, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU()
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
            if stride != 1 or in_ch != out_ch
            else nn.Identity()
        )

    def spec(self) -> dict:
        return {"mid": self.conv1.out_channels, "out": self.conv2.out_channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20; ``spec`` (``{"stem": c, "stages": [[{"mid", "out"}, ...], ...]}``) gives explicit widths."""

    family = "resnet20"
    moves = ("drop_stage", "drop_block", "narrow")

    def __init__(self, depth: int | list[int] = 3, base_channels: int = 16, in_channels: int = 3, num_classes: int = 10,
                 spec: dict | None = None):
        super().__init__()
        if spec is None:
            depths = [depth] * 3 if isinstance(depth, int) else list(depth)
            if not depths or min(depths) < 1:
                raise ValueError(f"model: ResNet20 needs at least one stage of depth >= 1; got depth={depth}")
            c = base_channels
            spec = {"stem": c, "stages": [[{"mid": c * 2**i, "out": c * 2**i}] * d for i, d in enumerate(depths)]}
        self.config = {"in_channels": in_channels, "num_classes": num_classes}
        c = spec["stem"]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        stages, in_ch = [], c
        for i, stage_spec in enumerate(spec["stages"]):
            blocks = []
            for j, b in enumerate(stage_spec):
                blocks.append(BasicBlock(in_ch, b["out"], stride=2 if (i > 0 and j == 0) else 1, mid=b["mid"]))
                in_ch = b["out"]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_ch, num_classes)

    def spec(self) -> dict:
        return {"stem": self.stem[0].out_channels, "stages": [[b.spec() for b in st] for st in self.stages]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(torch.flatten(self.pool(x), 1))
