"""What to score: importance of each weight of a linear layer (higher = keep), and per-row budgets.

* ``magnitude``: ``|W_ij|``.
* ``wanda``: ``|W_ij| * ||X_j||_2`` where ``||X_j||_2`` is the L2 norm of input feature j over every
  calibration token seen by the layer (accumulated by :class:`InputNorms`).
* ``skewness_row_sparsity``: INFERNO's non-uniform per-row sparsity (see its docstring).

Scores are always (out, in) float32 matrices, whatever the module stores (GPT-2's Conv1D is (in, out);
the calibration adapter transposes before calling here).
"""

from __future__ import annotations

import torch

from inferno.errors import ConfigError


class InputNorms:
    """Accumulates the squared L2 norm of every input feature over all tokens seen.

    ``add(x)`` takes inputs of shape (..., in_features); ``norms`` returns ``||X_j||_2`` (shape (in,)).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        # one fused fp32 reduction per chunk (no squared copy of the activations), accumulated in float64
        self.sq += torch.linalg.vector_norm(x.float(), dim=0).double().pow(2).to(self.sq.device)
        self.tokens += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        return self.sq.sqrt().float()


def magnitude(weight: torch.Tensor, stats=None) -> torch.Tensor:
    """|W| -- needs no calibration statistics."""
    return weight.detach().float().abs()


def wanda(weight: torch.Tensor, stats: InputNorms) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs")."""
    norms = stats.norms.to(weight.device)
    return weight.detach().float().abs() * norms.view(1, -1)


SCORES = {"magnitude": magnitude, "wanda": wanda}


def get_score(name: str):
    if name not in SCORES:
        raise ConfigError(f"unknown score {name!r}; allowed: {sorted(SCORES)}")
    return SCORES[name]


def row_skewness(scores: torch.Tensor) -> torch.Tensor:
    """Pearson's second skewness coefficient of each row: 3 (mean - median) / std (0 where std = 0)."""
    s = scores.detach().double()
    n = s.shape[1]
    srt = s.sort(dim=1).values
    median = (srt[:, (n - 1) // 2] + srt[:, n // 2]) / 2
    mean = s.mean(dim=1)
    std = s.std(dim=1, unbiased=False)
    sk = 3 * (mean - median) / std.clamp_min(1e-300)
    return torch.where(std > 0, sk, torch.zeros_like(sk))


def skewness_row_sparsity(scores: torch.Tensor, sparsity: float, floor: float = 0.05, iters: int = 100,
                          cap: float = 1.0) -> torch.Tensor:
    """INFERNO per-row sparsity: rows whose scores have a heavy right tail keep more weights.

    For each output row r of the score matrix:

        sk_r  = 3 (mean_r - median_r) / std_r        (Pearson skewness)
        sk'_r = 1 - sk_r
        q_r   = clamp(1 - s + (sk'_r - s) / 2 - alpha, floor, cap)

    ``q_r`` is the fraction of row r that is pruned (its lowest-scored ``q_r * in`` weights). A
    strongly right-skewed row (a few very salient weights) has a small ``sk'_r`` and so a smaller
    ``q_r``: it is pruned less. ``alpha`` is one scalar per matrix found by bisection so that
    ``mean_r q_r == s``; the mask step (``masks.keep_mask`` with a per-row vector) then turns the
    fractions into integer counts whose layer total is exactly ``round(s * numel)``.

    ``floor`` is lowered to ``s`` when ``s < floor`` (otherwise the mean could not reach ``s``). ``cap`` bounds
    every row (1.0: a row may be emptied; ``InfernoTask`` passes ``pruner.max_row_sparsity``, by default the
    fraction that leaves one weight per row); it must be at least ``s``.
    Returns a float64 tensor of shape (out,).
    """
    if cap < sparsity:
        raise ValueError(f"cap {cap} is below the target sparsity {sparsity}: the mean could not reach it")
    out = scores.shape[0]
    if sparsity <= 0:
        return torch.zeros(out, dtype=torch.float64)
    lo_clamp = min(floor, sparsity)
    base = 1 - sparsity + ((1 - row_skewness(scores)) - sparsity) / 2

    def q(alpha: float) -> torch.Tensor:
        return (base - alpha).clamp(lo_clamp, cap)

    # mean q is non-increasing in alpha: cap at a_lo (every row at the cap), lo_clamp at a_hi.
    a_lo, a_hi = float(base.min()) - cap, float(base.max()) - lo_clamp
    for _ in range(iters):
        mid = (a_lo + a_hi) / 2
        if float(q(mid).mean()) > sparsity:
            a_lo = mid
        else:
            a_hi = mid
    return q((a_lo + a_hi) / 2)
