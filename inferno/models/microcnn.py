"""MicroCNN(B, D, W): the CNN family of the INFERNO thesis (Noel 2024).

A conv stem to ``C`` channels (kernel ``stem_kernel``, stride ``stem_stride``, padding ``stem_padding``: 3 / 1 / 1 by
default, 3 / 3 / 3 in the thesis' network for 3x256x256 inputs, ``model=microcnn_thesis``), BN, ReLU and a 3x3/2
max-pool, then ``B`` stages; stage ``i`` holds ``D`` bottleneck residual blocks with ``C * W * 2**i`` output channels.
Each block is 1x1 -> 3x3 -> 1x1 with a middle width of ``out / 4``, BN after every conv, Swish activations, a
squeeze-and-excitation unit (reduction 16) and, on a stage's first block, a projection shortcut. The first block of
every stage after the first downsamples by 2. Global average pooling and a linear head close the network.
"""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(1, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(self.act(self.reduce(s))))


class Bottleneck(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, project: bool = False, se_reduction: int = 16,
                 mid: int | None = None, se: int | None = None, mid2: int | None = None):
        super().__init__()
        mid = mid or max(1, out_ch // 4)
        mid2 = mid2 or mid  # conv2's outputs: the same as conv1's unless channel surgery cut them apart
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid2, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid2)
        self.conv3 = nn.Conv2d(mid2, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcite(out_ch, se_reduction, se)
        self.act = nn.SiLU()
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
            if project or stride != 1 or in_ch != out_ch
            else nn.Identity()
        )

    def spec(self) -> dict:
        """``mid`` (conv1's outputs), ``out``, ``se``; ``mid2`` (conv2's outputs) only where it differs from ``mid``."""
        spec = {"mid": self.conv1.out_channels, "out": self.conv3.out_channels, "se": self.se.reduce.out_channels}
        if self.conv2.out_channels != self.conv1.out_channels:
            spec["mid2"] = self.conv2.out_channels
        return spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.act(self.bn2(self.conv2(y)))
        y = self.se(self.bn3(self.conv3(y)))
        return self.act(y + self.shortcut(x))


class MicroCNN(nn.Module):
    """MicroCNN(B, D, W). ``depth`` may be an int (same D in every stage) or one int per stage.

    ``spec`` (as returned by :meth:`spec`) overrides B, D, W and C with explicit channel counts for every
    block (``{"stem": C, "stages": [[{"mid", "out", "se"}, ...], ...]}``): the form pruned and sampled
    networks take, so that any of them can be rebuilt and its weights loaded."""

    family = "microcnn"
    moves = ("drop_stage", "drop_block", "narrow")

    def __init__(
        self,
        stages: int = 2,
        depth: int | list[int] = 2,
        width: int = 1,
        base_channels: int = 16,
        stem_stride: int = 1,
        in_channels: int = 1,
        num_classes: int = 10,
        se_reduction: int = 16,
        stem_kernel: int = 3,
        stem_padding: int = 1,
        spec: dict | None = None,
    ):
        super().__init__()
        for key, v, low in (("stem_kernel", stem_kernel, 1), ("stem_stride", stem_stride, 1),
                            ("stem_padding", stem_padding, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"model: MicroCNN needs an integer {key} >= {low}; got {key}={v!r}")
        if spec is None:
            for key, v in (("stages", stages), ("width", width), ("base_channels", base_channels),
                           ("se_reduction", se_reduction), ("in_channels", in_channels), ("num_classes", num_classes)):
                if isinstance(v, bool) or not isinstance(v, int):  # e.g. a string: name the key (a bad value, as below)
                    raise ValueError(f"model.{key}: {v!r} must be an integer")  # noqa: TRY004
            if isinstance(depth, bool) or not (isinstance(depth, int) or (
                    isinstance(depth, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool) for d in depth))):
                raise ValueError(f"model.depth: {depth!r} must be an integer or one integer per stage")
            depths = [depth] * stages if isinstance(depth, int) else list(depth)
            if stages < 1 or len(depths) != stages or min(depths) < 1 or width < 1 or base_channels < 1:
                raise ValueError(
                    f"model: MicroCNN needs stages >= 1, one depth >= 1 per stage and width >= 1; "
                    f"got stages={stages}, depth={depth}, width={width}"
                )
            c = base_channels
            spec = {"stem": c, "stages": [
                [{"mid": max(1, c * width * 2**i // 4), "out": c * width * 2**i,
                  "se": max(1, c * width * 2**i // se_reduction)}] * d
                for i, d in enumerate(depths)
            ]}
        # everything but the widths: networks are rebuilt as type(net)(spec=..., **net.config)
        self.config = {"stem_kernel": stem_kernel, "stem_stride": stem_stride, "stem_padding": stem_padding,
                       "in_channels": in_channels, "num_classes": num_classes}
        c = spec["stem"]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c, stem_kernel, stride=stem_stride, padding=stem_padding, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        blocks = []
        in_ch = c
        for i, stage_spec in enumerate(spec["stages"]):
            stage = []
            for j, b in enumerate(stage_spec):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(Bottleneck(in_ch, b["out"], stride=stride, project=j == 0, mid=b["mid"], se=b["se"],
                                        mid2=b.get("mid2")))
                in_ch = b["out"]
            blocks.append(nn.Sequential(*stage))
        self.stages = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_ch, num_classes)

    def spec(self) -> dict:
        """Channel counts of every layer, read off the modules (valid after any surgery)."""
        return {"stem": self.stem[0].out_channels, "stages": [[b.spec() for b in st] for st in self.stages]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(torch.flatten(self.pool(x), 1))
