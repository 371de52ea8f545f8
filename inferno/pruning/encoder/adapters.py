"""Structured Pruning Adapters: the low-rank SPLoRA linear (Hedegaard et al., "Structured Pruning Adapters").

What the method is
------------------
A pretrained ``nn.Linear`` (weight W, shape (out, in)) keeps W frozen; the task is learned by a rank-r adapter
``B @ A`` (A: (r, in), B: (out, r)) plus a trainable bias b, so the layer computes ``x (W + B A)^T + b``. What has to
be stored per task is A, B and b: ``r*in + r*out + out`` numbers instead of ``in*out + out``. Structured pruning
removes whole output channels (rows of W, entries of b) or input channels (columns of W). Because ``B A``'s row i is
``B[i] @ A`` and its column j is ``B @ A[:, j]``, an output channel is removed from the adapter by dropping B's row
and an input channel by dropping A's column: the pruned adapter stays a rank-r adapter of the pruned layer, so the
per-task cost shrinks with the layer and the adapter can still be folded into W after training.

Interface
---------
``SPLoRALinear.from_linear(linear, rank, init_range=1e-4)``
    the adapted copy of an ``nn.Linear`` (same dtype and device; the linear itself is not modified). Attributes:
    ``weight`` -- the base weight, an ``nn.Parameter`` with ``requires_grad=False``, shape (out, in), so code that
    reads ``module.weight`` (scores, the surgery's ``get_weight``) sees it exactly as on an ``nn.Linear``;
    ``bias`` -- trainable, (out,), zeros where the linear had none; ``adapter_a`` (rank, in) and ``adapter_b``
    (out, rank), trainable; ``in_features``, ``out_features``, ``rank``.
``forward``
    training mode: the low-rank path ``linear(x, W, b) + linear(linear(x, A), B)`` (no (out, in) gradient-carrying
    product is built); eval mode: the fused weight ``linear(x, W + B A, b)``. Both compute the same function.
``fold() -> nn.Linear``
    a plain linear with weight ``W + B A`` and the bias (same dtype/device, ``requires_grad=True``).
``shrink_(keep_out, keep_in)``
    keep only the given output rows (W rows, bias entries, ``adapter_b`` rows) and/or input columns (W columns,
    ``adapter_a`` columns), in place: the Parameters are replaced (``requires_grad`` kept), the sizes updated;
    optimizers must be rebuilt. The project's surgery (``pruning.llm.surgery._shrink``) calls it.
``zero_(idx, dim)``
    the masking counterpart (``surgery.mask_block``): ``dim="out"`` zeroes W rows, bias entries and ``adapter_b``
    rows; ``dim="in"`` zeroes W columns and ``adapter_a`` columns. The layer then computes exactly what the shrunk
    layer computes (zeros in the masked outputs; masked inputs ignored). Like any mask on an ``nn.Linear`` it is a
    one-time zeroing: further training may move the zeroed adapter entries again.
``trainable_count() -> int``
    ``rank*in + rank*out + out`` at the current sizes.
``add_adapters(root, rank, init_range=1e-4) -> [names]``
    replace every ``nn.Linear`` below ``root`` (recursively; ``root`` itself is not replaced) by its SPLoRA linear;
    returns the replaced names (as in ``root.named_modules()``). A linear registered under several names becomes one
    shared SPLoRA linear. Linears owned by an ``nn.MultiheadAttention`` are left alone (its forward reads
    ``out_proj.weight`` directly and would ignore the adapter).
``fold_adapters(root) -> int``
    replace every SPLoRA linear below ``root`` by ``fold()``; returns how many were folded (``TypeError`` if
    ``root`` itself is one: call ``root.fold()``).
``adapter_parameter_count(root) -> int``
    the sum of ``trainable_count()`` over the SPLoRA linears in ``root`` (each counted once).

Validation: ``rank`` must be an ``int`` >= 1 (``ValueError("pruner.rank: ... must be an integer >= 1")``);
``init_range`` a finite number >= 0 (``ValueError`` naming ``pruner.init_range``).

Defaults and their source
-------------------------
The defaults are those of the authors' package (``structured-pruning-adapters`` 0.7.1 on PyPI, module
``sp_adapters``): rank 16 and ``init_range = 1e-4``; the input-side factor A is initialised like an ``nn.Linear``
weight (Kaiming-uniform with ``a = sqrt(5)``, i.e. U(-1/sqrt(in), 1/sqrt(in))) and the output-side factor B
uniformly in ``[-init_range, init_range]``, so the adapted layer starts within a tiny perturbation of the base
linear (``|B A| <= r * init_range / sqrt(in)`` per entry). One difference: ``init_range = 0`` here means B = 0 (the
start is exactly the base linear), where the package falls back to Kaiming-uniform for B.

Differences from the public code
--------------------------------
* Removing or masking a channel always covers the adapter: ``shrink_`` and ``zero_`` take W, b and the adapter's
  matching rows / columns together, and the surgery dispatches to them. A channel masked only in the base weight
  (zeroing W's rows but not B's) stays alive through ``B A`` -- its output is ``B[i] A x + b[i]``, not zero -- and the
  "pruned" model then depends on weights that removal would delete (``tests/test_splora.py`` shows this). The
  package's own torch-pruning handlers do drop the adapter rows / columns on removal; this module makes the same
  hold for the project's masking path, without depending on torch-pruning's dependency graph.
* A linear without bias gets a trainable zero bias (the package keeps ``bias=None``), so output-channel
  compensation is possible and every adapted layer stores ``r*in + r*out + out`` numbers.
* The adapted copy keeps the linear's dtype and device (the package builds the adapter on the default ones), the
  factors are plain (rank, in) / (out, rank) Parameters, and the rank is an integer only (the package also accepts
  a fraction of the output size).
* The forward never changes ``requires_grad`` of the base weight; freezing it is ``from_linear``'s job.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_RANK = 16
DEFAULT_INIT_RANGE = 1e-4

__all__ = ["DEFAULT_INIT_RANGE", "DEFAULT_RANK", "SPLoRALinear", "adapter_parameter_count", "add_adapters",
           "check_init_range", "check_rank", "fold_adapters"]


def check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"pruner.rank: {rank!r} must be an integer >= 1")
    return int(rank)


def check_init_range(init_range) -> float:
    if (isinstance(init_range, bool) or not isinstance(init_range, numbers.Real)
            or not math.isfinite(init_range) or init_range < 0):
        raise ValueError(f"pruner.init_range: {init_range!r} must be a finite number >= 0")
    return float(init_range)


def _indices(idx, size: int, what: str, device) -> torch.Tensor:
    """A 1-D long tensor of distinct indices in [0, size) on ``device``; ValueError otherwise."""
    t = torch.as_tensor(idx)
    if t.dim() != 1 or (t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)):
        raise ValueError(f"SPLoRALinear: {what} must be a 1-D tensor of integer indices, got shape "
                         f"{tuple(t.shape)} and dtype {t.dtype}")
    t = t.long()
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= size:
            raise ValueError(f"SPLoRALinear: {what} has indices outside [0, {size}): min {lo}, max {hi}")
        if t.unique().numel() != t.numel():
            raise ValueError(f"SPLoRALinear: {what} has duplicated indices")
    return t.to(device)


class SPLoRALinear(nn.Module):
    """A frozen linear with a trainable rank-``rank`` adapter and bias; see the module docstring."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, adapter_a: torch.Tensor, adapter_b: torch.Tensor):
        super().__init__()
        out_f, in_f = weight.shape
        rank = adapter_a.shape[0]
        if bias.shape != (out_f,) or adapter_a.shape != (rank, in_f) or adapter_b.shape != (out_f, rank):
            raise ValueError(f"SPLoRALinear: inconsistent shapes weight {tuple(weight.shape)}, bias "
                             f"{tuple(bias.shape)}, adapter_a {tuple(adapter_a.shape)}, adapter_b "
                             f"{tuple(adapter_b.shape)}")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias)
        self.adapter_a = nn.Parameter(adapter_a)
        self.adapter_b = nn.Parameter(adapter_b)
        self.in_features, self.out_features, self.rank = in_f, out_f, rank

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int = DEFAULT_RANK,
                    init_range: float = DEFAULT_INIT_RANGE) -> SPLoRALinear:
        """The adapted copy of ``linear`` (its weight and bias are copied; ``linear`` is not modified)."""
        rank, init_range = check_rank(rank), check_init_range(init_range)
        w = linear.weight.detach().clone()
        out_f, in_f = w.shape
        kw = {"dtype": w.dtype, "device": w.device}
        b = linear.bias.detach().clone() if linear.bias is not None else torch.zeros(out_f, **kw)
        a = torch.empty(rank, in_f, **kw)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear's weight: U(-1/sqrt(in), 1/sqrt(in))
        bb = torch.empty(out_f, rank, **kw)
        if init_range > 0:
            nn.init.uniform_(bb, -init_range, init_range)
        else:
            bb.zero_()
        return cls(w, b, a, bb)

    def delta(self) -> torch.Tensor:
        """The adapter's weight update ``B @ A`` (out, in)."""
        return self.adapter_b @ self.adapter_a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.adapter_a), self.adapter_b)
        return F.linear(x, self.weight + self.delta(), self.bias)

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """A plain ``nn.Linear`` with weight ``W + B A`` and this bias (same dtype/device, trainable)."""
        lin = nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, bias=True,
                                 device=self.weight.device, dtype=self.weight.dtype)  # weights set below
        lin.weight = nn.Parameter((self.weight + self.delta()).contiguous())
        lin.bias = nn.Parameter(self.bias.detach().clone())
        return lin

    @staticmethod
    def _replace(p: nn.Parameter, t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.contiguous(), requires_grad=p.requires_grad)

    @torch.no_grad()
    def shrink_(self, keep_out: torch.Tensor | None = None, keep_in: torch.Tensor | None = None) -> None:
        """Keep only these output rows / input columns of the base weight AND the adapter, in place."""
        dev = self.weight.device
        keep_out = None if keep_out is None else _indices(keep_out, self.out_features, "keep_out", dev)
        keep_in = None if keep_in is None else _indices(keep_in, self.in_features, "keep_in", dev)
        w = self.weight.data
        if keep_out is not None:
            w = w.index_select(0, keep_out)
            self.bias = self._replace(self.bias, self.bias.data.index_select(0, keep_out))
            self.adapter_b = self._replace(self.adapter_b, self.adapter_b.data.index_select(0, keep_out))
        if keep_in is not None:
            w = w.index_select(1, keep_in)
            self.adapter_a = self._replace(self.adapter_a, self.adapter_a.data.index_select(1, keep_in))
        self.weight = self._replace(self.weight, w)
        self.out_features, self.in_features = w.shape

    @torch.no_grad()
    def zero_(self, idx: torch.Tensor, dim: str) -> None:
        """Mask: ``"out"`` zeroes W rows, bias entries and adapter_b rows; ``"in"`` W columns and adapter_a columns."""
        if dim == "out":
            i = _indices(idx, self.out_features, "idx", self.weight.device)
            self.weight.data[i, :] = 0
            self.bias.data[i] = 0
            self.adapter_b.data[i, :] = 0
        elif dim == "in":
            i = _indices(idx, self.in_features, "idx", self.weight.device)
            self.weight.data[:, i] = 0
            self.adapter_a.data[:, i] = 0
        else:
            raise ValueError(f"SPLoRALinear.zero_: dim must be 'out' or 'in', got {dim!r}")

    def trainable_count(self) -> int:
        """Numbers stored per task: ``rank*in + rank*out + out``."""
        return self.rank * self.in_features + self.rank * self.out_features + self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _replace_children(root: nn.Module, match, make, prefix: str = "", memo: dict | None = None,
                      names: list | None = None) -> list[str]:
    """Replace every descendant ``m`` with ``match(parent, m)`` true by ``make(m)`` (shared modules once)."""
    memo = {} if memo is None else memo
    names = [] if names is None else names
    for name, child in list(root._modules.items()):  # not named_children(): it hides a module's second name
        if child is None:
            continue
        full = f"{prefix}.{name}" if prefix else name
        if match(root, child):
            if id(child) not in memo:
                memo[id(child)] = make(child)
            setattr(root, name, memo[id(child)])
            names.append(full)
        else:
            _replace_children(child, match, make, full, memo, names)
    return names


def add_adapters(root: nn.Module, rank: int = DEFAULT_RANK, init_range: float = DEFAULT_INIT_RANGE) -> list[str]:
    """Replace every ``nn.Linear`` below ``root`` by a SPLoRA linear; returns the replaced names."""
    rank, init_range = check_rank(rank), check_init_range(init_range)

    def match(parent: nn.Module, m: nn.Module) -> bool:
        return isinstance(m, nn.Linear) and not isinstance(parent, nn.MultiheadAttention)

    return _replace_children(root, match, lambda m: SPLoRALinear.from_linear(m, rank, init_range))


def fold_adapters(root: nn.Module) -> int:
    """Replace every SPLoRA linear below ``root`` by its folded ``nn.Linear``; returns how many."""
    if isinstance(root, SPLoRALinear):
        raise TypeError("fold_adapters: root is itself a SPLoRALinear; use root.fold()")
    memo: dict = {}
    _replace_children(root, lambda _, m: isinstance(m, SPLoRALinear), lambda m: m.fold(), memo=memo)
    return len(memo)


def adapter_parameter_count(root: nn.Module) -> int:
    """Sum of ``trainable_count()`` over the SPLoRA linears in ``root`` (each module once)."""
    return sum(m.trainable_count() for m in root.modules() if isinstance(m, SPLoRALinear))
