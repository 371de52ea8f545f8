"""How to cut: turn a score matrix into a boolean keep-mask.

Every LLM method scores a weight matrix (out x in, higher = more important) and hands the scores here.
Three knobs decide which weights survive:

* ``sparsity`` -- fraction of weights set to zero, in [0, 1). A float (uniform) or a 1-D tensor with
  one fraction per output row (non-uniform rows, e.g. the INFERNO skewness allocation).
* ``pattern`` -- ``"unstructured"`` or ``"N:M"`` (NVIDIA semantics: keep N of every M consecutive
  input weights of a row, so ``"2:4"`` is 50 % zeros). With N:M the sparsity is 1 - N/M.
* ``group`` -- where scores are compared: ``"row"`` (each output row separately, Wanda's choice) or
  ``"layer"`` (the whole matrix, the classic magnitude baseline).

Counts are exact, not thresholds: a row of ``n`` weights at sparsity ``s`` loses exactly
``round(s * n)`` weights (round half up), a layer of ``numel`` weights exactly ``round(s * numel)``;
ties are broken by position, so the achieved sparsity never drifts with repeated values. For a per-row
vector the layer total ``round(sum_r s_r * n)`` is split over rows by largest remainder, so the layer
sparsity equals the mean of the vector to within one weight.
"""

from __future__ import annotations

import math
import re

import torch

from inferno.errors import ConfigError

GROUPS = ("row", "layer")
PATTERN_HELP = "'unstructured' or 'N:M' with integers 0 < N < M (e.g. '2:4', '4:8')"


def round_half_up(x: float) -> int:
    """Nearest integer, halves up (Python's round() rounds halves to even)."""
    return math.floor(x + 0.5 + 1e-9)


def check_sparsity(sparsity: float, name: str = "pruner.sparsity") -> float:
    """Validate a scalar sparsity: a number in [0, 1)."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ConfigError(f"{name} must be in [0, 1), got {sparsity!r}")
    return s


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M) = (kept, group size). Raises on anything else."""
    if pattern is None or str(pattern).strip().lower() == "unstructured":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if m is None:
        raise ConfigError(f"pruner.pattern must be {PATTERN_HELP}, got {pattern!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ConfigError(f"pruner.pattern must be {PATTERN_HELP}, got {pattern!r}")
    return n, mm


def check_group(group: str) -> str:
    if group not in GROUPS:
        raise ConfigError(f"pruner.group must be one of {list(GROUPS)}, got {group!r}")
    return group


def check_nm_fits(nm: tuple[int, int], in_features: int, layer: str | None) -> None:
    """N:M needs M to divide the number of input columns."""
    n, m = nm
    if in_features % m:
        where = f"layer {layer!r}" if layer else "this layer"
        raise ConfigError(
            f"pruner.pattern '{n}:{m}' needs in_features divisible by {m}, but {where} has in_features={in_features}"
        )


def apportion(fractions: torch.Tensor, n: int, total: int | None = None, cap: int | None = None) -> torch.Tensor:
    """Integer counts per row, each in [0, cap] (cap defaults to n), from per-row fractions of ``n``, summing
    to ``total``.

    ``total`` defaults to ``round(sum(fractions) * n)``. Largest-remainder method: floor everything,
    then give the missing units to the rows with the largest remainders (or take surplus units from
    the rows with the smallest remainders); a row at ``cap`` never gets another unit.
    """
    cap = n if cap is None else max(0, min(int(cap), n))
    f = (fractions.detach().double().clamp(0.0, 1.0) * n).clamp(max=cap)
    if total is None:
        total = round_half_up(float(f.sum()))
    total = max(0, min(int(total), cap * f.numel()))
    counts = f.floor().long()
    rem = f - counts
    diff = total - int(counts.sum())
    if diff > 0:
        rem = torch.where(counts < cap, rem, torch.full_like(rem, -1.0))
        counts[torch.argsort(rem, descending=True, stable=True)[:diff]] += 1
    elif diff < 0:
        rem = torch.where(counts > 0, rem, torch.full_like(rem, 2.0))
        counts[torch.argsort(rem, stable=True)[:-diff]] -= 1
    return counts


def lowest_mask(scores: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """True at the ``k`` lowest scores (of the whole tensor, or of each slice along ``dim``), ties broken by
    position (lower index first) -- the set a stable ascending sort would put first, found in linear time:
    the k-th smallest value by selection, every score below it, and the first equal ones up to k."""
    flat = dim is None
    x = scores.reshape(1, -1) if flat else scores.movedim(dim, -1)
    n = x.shape[-1]
    if k <= 0:
        out = torch.zeros_like(x, dtype=torch.bool)
    elif k >= n:
        out = torch.ones_like(x, dtype=torch.bool)
    else:
        kth = torch.kthvalue(x, k, dim=-1, keepdim=True).values
        below = x < kth
        equal = x == kth
        need = k - below.sum(dim=-1, keepdim=True)
        if bool((equal.sum(dim=-1, keepdim=True) == need).all()):  # no tie to break (the usual float case)
            out = below | equal
        else:
            out = below | (equal & (equal.cumsum(dim=-1) <= need))
    return out.reshape(scores.shape) if flat else out.movedim(-1, dim)


def mask_from_row_counts(scores: torch.Tensor, prune_counts: torch.Tensor) -> torch.Tensor:
    """Keep-mask that removes, in row r, the ``prune_counts[r]`` lowest-scored entries."""
    counts = prune_counts.to(scores.device).view(-1)
    if counts.numel() and bool((counts == counts[0]).all()):  # one count for every row: selection, no sort
        return ~lowest_mask(scores, int(counts[0]), dim=1)
    order = torch.argsort(scores, dim=1, stable=True)  # ascending: lowest scores first
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks >= counts.view(-1, 1)


def mask_from_layer_count(scores: torch.Tensor, prune_count: int) -> torch.Tensor:
    """Keep-mask that removes the ``prune_count`` lowest-scored entries of the whole matrix."""
    return ~lowest_mask(scores, int(prune_count))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest-scored of every M consecutive input columns, in each row."""
    out, cols = scores.shape
    groups = scores.reshape(out, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(out, cols)


def keep_mask(
    scores: torch.Tensor,
    sparsity: float | torch.Tensor,
    pattern: str = "unstructured",
    group: str = "row",
    layer: str | None = None,
) -> torch.Tensor:
    """Boolean keep-mask (True = weight survives) for a score matrix of shape (out, in).

    ``sparsity`` is a float in [0, 1) or a tensor of per-row fractions (shape (out,), each in
    [0, 1]); ``layer`` names the matrix in error messages. See the module docstring for the rules.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D (out, in) matrix, got shape {tuple(scores.shape)}")
    check_group(group)
    nm = parse_pattern(pattern)
    scores = scores.detach().float()
    out, cols = scores.shape
    if nm is not None:
        check_nm_fits(nm, cols, layer)
        return nm_mask(scores, *nm)
    if torch.is_tensor(sparsity) and sparsity.dim() > 0:
        if sparsity.shape != (out,):
            raise ValueError(f"per-row sparsity must have shape ({out},), got {tuple(sparsity.shape)}")
        if bool(((sparsity < 0) | (sparsity > 1)).any()):
            raise ValueError("per-row sparsity values must lie in [0, 1]")
        return mask_from_row_counts(scores, apportion(sparsity, cols))
    s = check_sparsity(sparsity)
    if group == "layer":
        return mask_from_layer_count(scores, round_half_up(s * scores.numel()))
    counts = torch.full((out,), round_half_up(s * cols), dtype=torch.long)
    return mask_from_row_counts(scores, counts)


def achieved_sparsity(weight: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return float((weight == 0).sum()) / max(1, weight.numel())
