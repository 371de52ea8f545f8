"""SparseGPT for one linear layer (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can
Be Accurately Pruned in One-Shot"), following the structure of the reference ``fasterprune``.

With inputs X (in x tokens) the layer-wise objective is ||W X - W' X||^2, whose Hessian w.r.t. a row
is H = 2 X X^T / n. Columns are processed left to right in blocks of ``blocksize``: in each block a
mask is chosen by the OBS saliency w^2 / [H^-1]_jj^2 (adaptive mask selection), then each column is
pruned and the error (w - q) / [H^-1]_jj is spread over the not-yet-processed columns through the
upper Cholesky factor of H^-1, first inside the block and then, in one matmul, onto the rest.
"""

from __future__ import annotations

import torch

from inferno.pruning.llm.masks import (
    check_group,
    check_nm_fits,
    check_sparsity,
    mask_from_layer_count,
    mask_from_row_counts,
    parse_pattern,
    round_half_up,
)


class Hessian:
    """Accumulates H = 2 X X^T / n over every calibration token fed to a linear (float32)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0
        self._inverse = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        n = self.tokens + x.shape[0]
        # H <- H * old/n + (2/n) x^T x, in one GEMM that accumulates into H (no scaled copy of x, no temporary)
        self.H.addmm_(x.T, x, beta=self.tokens / n, alpha=2.0 / n)
        self.tokens = n
        self._inverse = None

    def inverse(self, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(dead inputs, upper Cholesky factor of the dampened H^-1), computed once per collector: linears
        that read the same input (q/k/v, gate/up) share the collector and so the factorisation."""
        if self._inverse is None or self._inverse[0] != percdamp:
            self._inverse = (percdamp, *dampened_inverse(self.H, percdamp))
        return self._inverse[1], self._inverse[2]


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean(diag H); damping grows x10 on failure."""
    damp = percdamp * torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(6):
        try:
            L = torch.linalg.cholesky(H + damp * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except torch.linalg.LinAlgError:
            damp = damp * 10 if damp > 0 else torch.tensor(1e-6, device=H.device)
    raise RuntimeError("SparseGPT: the Hessian is not positive definite even with strong dampening")


def dampened_inverse(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dead inputs, upper Cholesky factor of the dampened inverse) of a Hessian; inputs that never fire
    (zero diagonal) get a unit diagonal -- their weights are zeroed, they do not matter."""
    H = H.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    return dead, _inverse_cholesky(H, percdamp)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    pattern: str = "unstructured",
    group: str = "layer",
    blocksize: int = 128,
    percdamp: float = 0.01,
    layer: str | None = None,
    inverse: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Return the pruned and compensated copy of ``weight`` (out, in); ``H`` is (in, in).
    ``inverse``: ``dampened_inverse(H, percdamp)`` when the caller has it already (shared by q/k/v).

    Unstructured: in each column block, ``group="layer"`` compares saliencies across the whole
    block (the reference behaviour), ``group="row"`` within each row. Block budgets are cumulative
    roundings, so the matrix (or each row) loses exactly ``round(s * numel)`` (``round(s * in)``)
    weights. ``"N:M"`` keeps, for every M consecutive columns of a row, the N with highest saliency.
    """
    check_group(group)
    nm = parse_pattern(pattern)
    s = check_sparsity(sparsity)
    W = weight.detach().clone().float()
    rows, cols = W.shape
    if nm is not None:
        check_nm_fits(nm, cols, layer)
        m = nm[1]
        blocksize = max(m, blocksize // m * m)
    dead, Hinv = inverse if inverse is not None else dampened_inverse(H, percdamp)
    dead, Hinv = dead.to(W.device), Hinv.to(W.device)
    W[:, dead] = 0

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        # the block transposed (columns as contiguous rows): each step reads one row and updates the rows after it
        W1 = W[:, i1:i2].T.contiguous()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)

        if nm is None:
            saliency = (W1**2 / d.view(-1, 1) ** 2).T
            if group == "layer":
                n_prune = round_half_up(s * rows * i2) - round_half_up(s * rows * i1)
                prune1 = ~mask_from_layer_count(saliency, n_prune)
            else:
                n_prune = round_half_up(s * i2) - round_half_up(s * i1)
                prune1 = ~mask_from_row_counts(saliency, torch.full((rows,), n_prune, dtype=torch.long))
            prune1 = prune1.T.contiguous()
            scale = prune1.to(W1.dtype) / d.view(-1, 1)  # err_i = w_i * [pruned] / [H^-1]_ii
        else:
            prune1 = torch.zeros_like(W1, dtype=torch.bool)
            scale = torch.zeros_like(W1)

        for i in range(count):
            if nm is not None and i % nm[1] == 0:  # N:M: choose among the M columns as they are now
                n, m = nm
                saliency = W1[i : i + m] ** 2 / d[i : i + m].view(-1, 1) ** 2
                drop = torch.topk(saliency, m - n, dim=0, largest=False).indices
                prune1[i : i + m].scatter_(0, drop, True)
                torch.div(prune1[i : i + m].to(W1.dtype), d[i : i + m].view(-1, 1), out=scale[i : i + m])
            err = torch.mul(W1[i], scale[i], out=Err1[i])  # (w - q) / d with q = w where kept, 0 where pruned
            W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)  # spread the error over the later columns

        W[:, i1:i2] = W1.masked_fill_(prune1, 0).T
        W[:, i2:].addmm_(Err1.T, Hinv[i1:i2, i2:], alpha=-1)

    return W.to(weight.dtype)
