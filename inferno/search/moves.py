"""The structural moves of the layer-wise search, and weight transfer from parent to child.

A move takes a parent network and returns a child one step smaller, already carrying the parent's
weights. The set is open: a model declares the moves it supports (``model.moves``); ``MOVES`` maps a
name to a function ``(parent, ctx-like options) -> list[Child]``.

- ``drop_stage``: drop the last stage; the head now reads the previous stage's channels.
- ``drop_block``: one block fewer in every stage that has more than one (``scope=all``, the thesis' D-1),
  or in one stage per child (``scope=stage``).
- ``narrow``: remove ``ratio`` of the channels of the stem or of one stage (``scope=stage``: one child for
  the stem and one per stage) or of every layer (``scope=all``), lowest importance first, through
  Torch-Pruning's dependency graph.

Transfer: with ``transfer=importance`` a child keeps exactly the parent's most important channels (the
surgery is done on a copy of the parent). ``transfer=leading_slice`` is the thesis' rule, kept for
ablation: the child is rebuilt with fresh weights, then every tensor of equal shape is copied and, where
shapes differ, the overlapping leading slice.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from inferno.errors import ConfigError, check_choice
from inferno.pruning.cnn.surgery import prune_channels

TRANSFERS = ("importance", "leading_slice")
SCOPES = {"narrow_scope": ("stage", "all"), "drop_block_scope": ("all", "stage")}


@dataclass
class Child:
    move: str
    net: nn.Module
    detail: dict = field(default_factory=dict)


@dataclass
class MoveOptions:
    example: torch.Tensor
    narrow_ratio: float = 0.25
    narrow_scope: str = "stage"  # stage | all
    drop_block_scope: str = "all"  # all | stage
    importance: str = "l1"
    calib_batch: tuple | None = None

    def __post_init__(self):
        check_choice("pruner.narrow_scope", self.narrow_scope, SCOPES["narrow_scope"])
        check_choice("pruner.drop_block_scope", self.drop_block_scope, SCOPES["drop_block_scope"])


def rebuild(net: nn.Module, spec: dict | None = None) -> nn.Module:
    """A fresh network of ``net``'s family with ``spec``'s widths (default: ``net``'s own)."""
    return type(net)(spec=spec or net.spec(), **net.config)


def _new_head(child: nn.Module) -> None:
    last = child.stages[-1][-1].spec()["out"]
    child.head = nn.Linear(last, child.head.out_features)


def drop_stage(parent: nn.Module, opts: MoveOptions) -> list[Child]:
    if len(parent.stages) < 2:
        return []
    child = copy.deepcopy(parent)
    del child.stages[-1]
    _new_head(child)
    return [Child("drop_stage", child, {"stages": len(child.stages)})]


def drop_block(parent: nn.Module, opts: MoveOptions) -> list[Child]:
    deep = [i for i, st in enumerate(parent.stages) if len(st) > 1]
    if not deep:
        return []
    groups = [deep] if opts.drop_block_scope == "all" else [[i] for i in deep]
    children = []
    for stages in groups:
        child = copy.deepcopy(parent)
        for i in stages:
            del child.stages[i][-1]
        detail = {"stages": stages} if opts.drop_block_scope == "stage" else {}
        children.append(Child("drop_block", child, detail))
    return children


def narrow(parent: nn.Module, opts: MoveOptions) -> list[Child]:
    scopes = [None] if opts.narrow_scope == "all" else ["stem", *range(len(parent.stages))]
    children = []
    for i in scopes:
        child = copy.deepcopy(parent)
        scope = child if i is None else child.stem if i == "stem" else child.stages[i]
        before = sum(p.numel() for p in child.parameters())
        kept = prune_channels(child, opts.example, opts.narrow_ratio, opts.importance, scope=scope, calib_batch=opts.calib_batch)
        if sum(p.numel() for p in child.parameters()) < before:
            children.append(Child("narrow", child, {"stage": "all" if i is None else i, "kept": kept}))
    return children


MOVES = {"drop_stage": drop_stage, "drop_block": drop_block, "narrow": narrow}


def check_moves(moves, model: nn.Module) -> list[str]:
    allowed = getattr(model, "moves", ())
    for m in moves:
        if m not in MOVES or m not in allowed:
            raise ConfigError(f"pruner.moves: {m!r} is not a move of {type(model).__name__}; allowed: {', '.join(allowed)}")
    return list(moves)


def children(parent: nn.Module, moves: list[str], opts: MoveOptions, transfer: str = "importance") -> list[Child]:
    """Every child one move away from ``parent``, weights transferred by ``transfer``."""
    check_choice("pruner.transfer", transfer, TRANSFERS)
    out = [c for m in moves for c in MOVES[m](parent, opts)]
    if transfer == "leading_slice":
        for c in out:
            fresh = rebuild(c.net)
            leading_slice_transfer(parent, fresh)
            c.net = fresh
    return out


@torch.no_grad()
def leading_slice_transfer(parent: nn.Module, child: nn.Module) -> None:
    """Copy every parent tensor into the child tensor of the same name: whole where shapes agree,
    the overlapping leading slice where they differ (the INFERNO thesis' rule)."""
    src = parent.state_dict()
    for name, t in child.state_dict().items():
        s = src.get(name)
        if s is None or s.dim() != t.dim():
            continue
        if s.dim() == 0:
            t.copy_(s)
            continue
        region = tuple(slice(0, min(a, b)) for a, b in zip(s.shape, t.shape))
        t[region] = s[region]
