"""Structured LLM pruning that physically shrinks the model: ``pruner=nirvana|flap|wanda_sp|llm_pruner|shortgpt``.

Every method here is a block-level method of the one calibration runner (``runner.prune_model``): it decides
which KV groups (a KV head with the query heads that share it) and MLP neurons each block loses, and the one
shared surgery (``surgery``) removes them -- or zeroes the same rows and columns with ``apply="mask"``. ShortGPT
removes whole blocks (``surgery.remove_blocks``).

**Sparsity** is the fraction of the attention + MLP parameters removed: the weights (and bias entries) that KV
groups and MLP neurons own (:func:`unit_params`; embeddings, norms and the LM head are never pruned). Points also
carry the total parameter count.

Scores of a unit are always sums over the rows / columns the unit owns in its coupled linears
(:func:`unit_scores` over ``surgery.coupled``), so one q-to-KV mapping (HF's ``repeat_kv``: query head h belongs to
KV head h // g) serves every method.

* ``nirvana`` (Ai et al. 2025): S = |dF/dW * W| from one backward pass on the calibration batch, F = the mean over
  batch and vocabulary of each logit's maximum over the sequence (``saliency_reduce=seq``, the public code's
  ``logits.max(dim=1)``; ``vocab``: the max over the vocabulary, averaged over tokens, an ablation). One global
  ranking for KV groups and one for neurons; the fraction of neurons pruned is ``gamma`` times the fraction of
  KV groups pruned, and together they remove ``sparsity`` of the attention + MLP parameters. Each layer keeps at
  least one KV group (its best-scoring one; the public code keeps the highest-indexed); kept neurons per layer are
  rounded up to a multiple of ``round_to`` and are at least ``round_to``, as the public code. The KL-based choice
  of calibration seed is made by the pruner (``LLMPruner``, ``kl_seeds``).
* ``flap`` (An et al. 2024): fluctuation metric of each input channel of o_proj / down_proj (variance of the
  channel over the calibration tokens x squared norm of the weight column) from one pass over the dense model,
  standardised per layer; a head's score is the mean over its channels; one global threshold over heads and
  neurons weighted by the parameters each removes; the removed channels' mean contribution is added to the
  output bias (a bias is added where the model has none).
* ``wanda_sp`` (Wanda adapted to structure, as FLAP's baseline): head score = sum over the head's channels of
  mean_i |W_o[i, j]| * ||X_j||_2, neuron score = mean_i |W_down[i, j]| * ||X_j||_2; the same ratio in every
  layer, layer after layer on the pruned model's activations.
* ``llm_pruner`` (Ma et al. 2023): first-order Taylor |W * dL/dW| with the LM loss, summed over each coupled
  group, the same ratio in every pruned layer, n - int(n (1 - r)) units of each (the public code's count);
  ``skip_layers`` are left whole; ``ratio_rule=total`` (a project option) raises the others' ratio so the model
  loses ``sparsity`` of its attention + MLP parameters.
* ``shortgpt`` (Men et al. 2024): block influence BI_i = mean over tokens of 1 - cos(h_i, h_{i+1}) on the
  hidden states before the final norm (one dense pass); the blocks with the lowest BI are removed, as many as
  make up ``sparsity`` of the attention + MLP parameters (rounded to whole blocks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from inferno.errors import ConfigError, check_bool, check_choice, check_int
from inferno.pruning.llm import surgery
from inferno.pruning.llm.methods import BlockMethod
from inferno.pruning.llm.runner import calibration_chunks, get_blocks, get_weight, run_layers


# ----------------------------------------------------------------------------------- accounting
def _slice_params(s: surgery.Slice) -> int:
    """Parameters one unit owns through slice ``s`` (its weight rows/columns and, for rows, bias entries)."""
    out_f, in_f = get_weight(s.module).shape
    if s.dim == "out":
        return s.width * in_f + (s.width if s.module.bias is not None else 0)
    return s.width * out_f


def unit_params(block: nn.Module, config) -> tuple[int, int]:
    """(parameters of one KV group, parameters of one MLP neuron) in ``block``."""
    c = surgery.coupled(block, config)
    return sum(map(_slice_params, c.heads)), sum(map(_slice_params, c.neurons))


def attn_mlp_params(model: nn.Module) -> int:
    """Attention + MLP parameters that structured pruning can remove (what ``sparsity`` is a fraction of)."""
    total = 0
    for block in get_blocks(model):
        u = surgery.block_units(block, model.config)
        pg, pn = unit_params(block, model.config)
        total += u["kv_heads"] * pg + u["neurons"] * pn
    return total


def unit_scores(slices: list[surgery.Slice], saliency: dict[nn.Module, torch.Tensor], n: int) -> torch.Tensor:
    """Per unit, the sum of ``saliency`` (an (out, in) tensor per module) over the rows / columns it owns."""
    total = torch.zeros(n, dtype=torch.float64)
    for s in slices:
        sal = saliency[s.module].double()
        per_feature = sal.sum(1) if s.dim == "out" else sal.sum(0)
        total += per_feature[s.offset : s.offset + n * s.width].reshape(n, s.width).sum(1).cpu()
    return total


def block_unit_scores(block: nn.Module, config, saliency: dict[nn.Module, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(KV-group scores, neuron scores) of one block from a per-weight saliency."""
    u = surgery.block_units(block, config)
    c = surgery.coupled(block, config)
    return unit_scores(c.heads, saliency, u["kv_heads"]), unit_scores(c.neurons, saliency, u["neurons"])


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` lowest scores (ties: the lower index first), sorted."""
    return sorted(torch.argsort(scores, stable=True)[:k].tolist())


# ----------------------------------------------------------------------------------- gradients
def _weights(model: nn.Module) -> dict[nn.Module, nn.Parameter]:
    """The weight of every coupled linear of every block (what first-order saliencies score)."""
    out = {}
    for block in get_blocks(model):
        c = surgery.coupled(block, model.config)
        for s in c.heads + c.neurons:
            out[s.module] = s.module.weight
    return out


def nirvana_objective(reduce: str):
    """F(logits, ids): the mean over batch and vocabulary of each logit's max over the sequence (``seq``), or the
    mean over batch and positions of each position's max over the vocabulary (``vocab``)."""
    dim = 1 if reduce == "seq" else -1
    return lambda logits, ids: logits.float().max(dim=dim).values.mean()


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross entropy, mean over the predicted tokens."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def first_order_saliency(model: nn.Module, calib, objective, batch_size: int = 8, device="cpu") -> dict[nn.Module, torch.Tensor]:
    """|dF/dW * W| for every block linear's weight (as (out, in)), F = ``objective(logits, ids)`` over the whole
    calibration batch.

    The batch is processed in chunks of ``batch_size``; each chunk's objective is weighted by its share of the
    samples, so the accumulated gradient is the one of F on the whole batch (F is a mean over samples)."""
    weights = _weights(model)
    chunks = calibration_chunks(calib, batch_size)
    n = sum(c.shape[0] for c in chunks)
    flags = {p: p.requires_grad for p in model.parameters()}
    home = next(model.parameters()).device
    try:
        model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for ids in chunks:
                ids = ids.to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                (objective(logits, ids) * (ids.shape[0] / n)).backward()
        sal = {m: (w.grad * w.detach()).abs().float() for m, w in weights.items()}
        return {m: v.T if isinstance(m, Conv1D) else v for m, v in sal.items()}  # as (out, in), like get_weight
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
        model.to(home)


def kl_divergence(dense: nn.Module, pruned: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> float:
    """KL(P_dense || Q_pruned) of the next-token distributions, summed over the vocabulary and averaged over
    every position of ``ids``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in calibration_chunks(ids, batch_size):
            log_p = dense(input_ids=chunk.to(next(dense.parameters()).device)).logits.float().log_softmax(-1)
            log_q = pruned(input_ids=chunk.to(next(pruned.parameters()).device)).logits.float().log_softmax(-1)
            kl = F.kl_div(log_q.cpu(), log_p.cpu(), log_target=True, reduction="none").sum(-1)
            total += float(kl.sum())
            count += kl.numel()
    return total / max(1, count)


# ----------------------------------------------------------------------------------- base
class StructuredBase(BlockMethod):
    """What every structured method records: ``decisions`` = {layer: BlockDecision} (in the numbering of the
    model it pruned), ``drop`` = blocks removed whole (applied by ``finalize`` after every per-block decision)."""

    variant = ""

    def __init__(self, sparsity: float = 0.5, apply: str = "remove"):
        super().__init__(sparsity, apply)
        self.decisions: dict[int, surgery.BlockDecision] = {}
        self.drop: list[int] = []

    def finalize(self, model: nn.Module) -> None:
        """Remove (or, with ``apply="mask"``, turn into the identity) the blocks in ``self.drop``."""
        if not self.drop:
            return
        if self.apply == "remove":
            surgery.remove_blocks(model, self.drop)
        else:
            blocks = get_blocks(model)
            for i in self.drop:
                zero_block_outputs(blocks[i], model.config)

    def check(self, model: nn.Module) -> None:
        """Refuse a model family without structured support, or options this model cannot take, before any
        calibration or gradient work (one-line ConfigError)."""
        model_type = getattr(model.config, "model_type", None)
        if model_type not in surgery.FAMILIES:
            raise ConfigError(f"pruner={self.name}: structured pruning supports model families "
                              f"{sorted(surgery.FAMILIES)}, not {model_type!r}")

    def summary(self) -> dict:
        """What the method decided, for the run's structure report."""
        return {"decisions": {i: {"kv_heads": d.heads, "neurons": d.neurons} for i, d in sorted(self.decisions.items())},
                "removed_blocks": list(self.drop)}


class StructuredMethod(StructuredBase):
    """A structured method whose decisions are all made in ``prepare`` (a pass over the whole model); the runner
    then applies them without further forward passes (``global_decisions``)."""

    global_decisions = True

    def prune_block(self, block):
        return self.decisions.get(block.index)


@torch.no_grad()
def zero_block_outputs(block: nn.Module, config) -> None:
    """Zero the linears that write a block's attention and MLP outputs (o_proj / down_proj, weights and biases):
    with the residual stream the block becomes the identity -- the masked equivalent of removing it."""
    c = surgery.coupled(block, config)
    for s in c.heads + c.neurons:
        if s.dim == "in":
            s.module.weight.zero_()
            if s.module.bias is not None:
                s.module.bias.zero_()


def check_ratio_fits(layer: int, n_prune: int, n: int, what: str, key: str = "pruner.sparsity") -> None:
    if n_prune >= n:
        raise ConfigError(f"{key}: would remove all {n} {what} of layer {layer}; keep at least one (lower the sparsity)")


def uniform_decision(layer: int, head_scores: torch.Tensor, neuron_scores: torch.Tensor, ratio: float) -> surgery.BlockDecision:
    """The same ``ratio`` of KV groups and of neurons in one layer: the int(n * ratio) lowest of each."""
    n_heads, n_neurons = int(head_scores.numel() * ratio), int(neuron_scores.numel() * ratio)
    check_ratio_fits(layer, n_heads, head_scores.numel(), "KV groups")
    return surgery.BlockDecision(heads=lowest(head_scores, n_heads), neurons=lowest(neuron_scores, n_neurons))


# ----------------------------------------------------------------------------------- NIRVANA
def gamma_allocation(sparsity: float, gamma: float, attn_params: int, mlp_params: int) -> tuple[float, float]:
    """(fraction of KV groups, fraction of neurons) to prune: neurons = gamma x groups, and together they remove
    ``sparsity`` of the attention + MLP parameters: a * P_attn + gamma * a * P_mlp = s * (P_attn + P_mlp)."""
    a = sparsity * (attn_params + mlp_params) / (attn_params + gamma * mlp_params)
    return a, gamma * a


class Nirvana(StructuredMethod):
    """NIRVANA (see module docstring)."""

    name = "nirvana"

    def __init__(self, sparsity=0.5, gamma=3.0, round_to=8, saliency_reduce="seq", apply="remove"):
        super().__init__(sparsity, apply)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0 or math.isinf(gamma):
            raise ConfigError(f"pruner.gamma: {gamma!r} must be a number > 0 (fraction of neurons pruned / fraction of KV groups pruned)")
        self.gamma = float(gamma)
        self.round_to = check_int("pruner.round_to", round_to, 1)
        self.reduce = check_choice("pruner.saliency_reduce", saliency_reduce, ("seq", "vocab"))
        self.variant = self.reduce

    def prepare(self, model, state, device="cpu", calib=None, batch_size=8, **_):
        saliency = first_order_saliency(model, calib, nirvana_objective(self.reduce), batch_size, device)
        self.decide(model, saliency)

    def check(self, model: nn.Module) -> None:
        super().check(model)
        self.plan(model)

    def plan(self, model: nn.Module) -> dict:
        """The gamma allocation for this model: fractions and counts of KV groups and neurons to prune (floored;
        before the per-layer rounding of neurons). Refuses what cannot be met with >= 1 KV group per layer."""
        blocks, config = get_blocks(model), model.config
        p_attn = p_mlp = n_groups = n_neurons = 0
        for block in blocks:
            u, (pg, pn) = surgery.block_units(block, config), unit_params(block, config)
            p_attn, p_mlp = p_attn + u["kv_heads"] * pg, p_mlp + u["neurons"] * pn
            n_groups, n_neurons = n_groups + u["kv_heads"], n_neurons + u["neurons"]
        a, b = gamma_allocation(self.sparsity, self.gamma, p_attn, p_mlp)
        if b > 1 or math.floor(a * n_groups) > n_groups - len(blocks):
            raise ConfigError(f"pruner.sparsity={self.sparsity} with pruner.gamma={self.gamma} asks for {a:.1%} of the KV "
                              f"groups and {b:.1%} of the neurons, more than leaves every layer a KV group; "
                              "lower the sparsity or change gamma")
        self.allocation = {"group_fraction": a, "neuron_fraction": b, "groups": math.floor(a * n_groups),
                           "neurons": math.floor(b * n_neurons), "total_groups": n_groups, "total_neurons": n_neurons}
        return self.allocation

    def decide(self, model: nn.Module, saliency: dict[nn.Module, torch.Tensor]) -> None:
        """Global thresholds with the gamma allocation (see module docstring) from a per-weight saliency."""
        blocks, config = get_blocks(model), model.config
        scores = [block_unit_scores(block, config, saliency) for block in blocks]
        heads, neurons = [h for h, _ in scores], [n for _, n in scores]
        self.plan(model)
        drop_heads = self.global_lowest(heads, self.allocation["groups"], keep_min=1)
        drop_neurons = self.global_lowest(neurons, self.allocation["neurons"], keep_min=0)
        for i in range(len(blocks)):
            kept = neurons[i].numel() - len(drop_neurons[i])
            rounded = min(neurons[i].numel(), max(self.round_to, math.ceil(kept / self.round_to) * self.round_to))
            # rounding up keeps the highest-scoring of the neurons the global threshold dropped
            worst_first = sorted(drop_neurons[i], key=lambda j: (float(neurons[i][j]), j))
            drop_neurons[i] = sorted(worst_first[: len(drop_neurons[i]) - (rounded - kept)])
            if drop_heads[i] or drop_neurons[i]:
                self.decisions[i] = surgery.BlockDecision(heads=drop_heads[i], neurons=drop_neurons[i])

    @staticmethod
    def global_lowest(scores: list[torch.Tensor], k: int, keep_min: int) -> list[list[int]]:
        """The ``k`` lowest units over all layers (ties: lower layer, then lower index), never leaving a layer
        with fewer than ``keep_min`` units; per layer, sorted indices."""
        flat = sorted((float(s[j]), i, j) for i, s in enumerate(scores) for j in range(s.numel()))
        out, left = [[] for _ in scores], [s.numel() for s in scores]
        for _, i, j in flat:
            if k == 0:
                break
            if left[i] > keep_min:
                out[i].append(j)
                left[i] -= 1
                k -= 1
        return [sorted(o) for o in out]


# ----------------------------------------------------------------------------------- LLM-Pruner
class LLMPrunerTaylor(StructuredMethod):
    """LLM-Pruner's first-order Taylor importance, grouped and uniform per layer (see module docstring)."""

    name = "llm_pruner"
    variant = "taylor"

    def __init__(self, sparsity=0.5, skip_layers=(), ratio_rule="per_layer", apply="remove"):
        super().__init__(sparsity, apply)
        self.ratio_rule = check_choice("pruner.ratio_rule", ratio_rule, ("per_layer", "total"))
        skip = list(skip_layers or [])
        for i in skip:
            check_int("pruner.skip_layers", i, -(10**6), hint=" (layer indices; negative counts from the end)")
        self.skip_layers = skip

    def skipped(self, n_layers: int) -> set[int]:
        bad = [i for i in self.skip_layers if not -n_layers <= i < n_layers]
        if bad:
            raise ConfigError(f"pruner.skip_layers: {bad} out of range for {n_layers} layers")
        return {i % n_layers for i in self.skip_layers}

    def layer_ratio(self, model: nn.Module, skipped: set[int]) -> float:
        """The ratio of every pruned layer: ``sparsity`` itself (``ratio_rule=per_layer``, the public code), or
        (``total``, a project option) raised so the whole model loses ``sparsity`` of its attention + MLP parameters
        when the skipped layers keep everything (= ``sparsity`` when nothing is skipped)."""
        blocks = get_blocks(model)
        per = []
        for block in blocks:
            u, (pg, pn) = surgery.block_units(block, model.config), unit_params(block, model.config)
            per.append(u["kv_heads"] * pg + u["neurons"] * pn)
        pruned = sum(p for i, p in enumerate(per) if i not in skipped)
        if not pruned:
            raise ConfigError("pruner.skip_layers: every layer is skipped; nothing to prune")
        if self.ratio_rule == "per_layer":  # the public code: the ratio itself in every pruned layer
            return self.sparsity
        ratio = self.sparsity * sum(per) / pruned
        if ratio >= 1:
            raise ConfigError(f"pruner.sparsity={self.sparsity}: the {len(blocks) - len(skipped)} layers not in "
                              f"pruner.skip_layers would need a ratio of {ratio:.2f} >= 1")
        return ratio

    @staticmethod
    def count(n: int, ratio: float) -> int:
        """Units pruned of ``n`` at ``ratio``: n - int(n (1 - r)), the public code's count."""
        return n - int(n * (1 - ratio))

    def check(self, model: nn.Module) -> None:
        super().check(model)
        blocks = get_blocks(model)
        skipped = self.skipped(len(blocks))
        ratio = self.layer_ratio(model, skipped)
        for i, block in enumerate(blocks):
            if i not in skipped:
                n = surgery.block_units(block, model.config)["kv_heads"]
                check_ratio_fits(i, self.count(n, ratio), n, "KV groups")

    def prepare(self, model, state, device="cpu", calib=None, batch_size=8, **_):
        saliency = first_order_saliency(model, calib, lm_loss, batch_size, device)
        blocks = get_blocks(model)
        skipped = self.skipped(len(blocks))
        self.ratio = self.layer_ratio(model, skipped)
        for i, block in enumerate(blocks):
            if i in skipped:
                continue
            hs, ns = block_unit_scores(block, model.config, saliency)
            nh, nn_ = self.count(hs.numel(), self.ratio), self.count(ns.numel(), self.ratio)
            check_ratio_fits(i, nh, hs.numel(), "KV groups")
            self.decisions[i] = surgery.BlockDecision(heads=lowest(hs, nh), neurons=lowest(ns, nn_))


# ----------------------------------------------------------------------------------- Wanda-sp
class WandaSP(StructuredBase):
    """Wanda-sp: structured Wanda, the same ratio per layer, sequential (see module docstring)."""

    name = "wanda_sp"
    variant = "wanda"

    def prune_block(self, block):
        config, c = block.config, surgery.coupled(block.module, block.config)
        u = surgery.block_units(block.module, config)
        out_heads = next(s for s in c.heads if s.dim == "in")  # o_proj: its input columns belong to the heads
        out_neurons = next(s for s in c.neurons if s.dim == "in")  # down_proj
        saliency = {}
        for s in (out_heads, out_neurons):
            name = next(n for n, m in block.linears.items() if m is s.module)
            w = get_weight(s.module).float().abs()
            saliency[s.module] = w.mean(0, keepdim=True) * block.stats[name].norms.to(w.device)  # (1, in)
        hs = unit_scores([out_heads], saliency, u["kv_heads"])
        ns = unit_scores([out_neurons], saliency, u["neurons"])
        self.decisions[block.index] = uniform_decision(block.index, hs, ns, self.sparsity)
        return self.decisions[block.index]


# ----------------------------------------------------------------------------------- FLAP
class ChannelMoments:
    """Per input channel: token count, mean and (unbiased) variance over every calibration token seen."""

    def __init__(self, in_features: int, device="cpu"):
        self.n = 0
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sq = torch.zeros(in_features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.n += x.shape[0]
        self.sum += x.sum(0).to(self.sum.device)
        self.sq += x.pow(2).sum(0).to(self.sq.device)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(1, self.n)

    @property
    def var(self) -> torch.Tensor:
        return ((self.sq - self.n * self.mean.pow(2)) / max(1, self.n - 1)).clamp_min(0)


def fluctuation(var: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """FLAP's fluctuation metric per input channel j: Var(X_j) x ||W[:, j]||_2^2."""
    return var.double() * weight.double().pow(2).sum(0).cpu()


def standardize(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over one layer's channels (unbiased std; a constant metric standardises to 0)."""
    std = x.std()
    return (x - x.mean()) / std if std > 0 else torch.zeros_like(x)


class Flap(StructuredMethod):
    """FLAP (see module docstring). ``attn_power``: the attention channels' metric is raised to this power before
    standardising (2 in the public code, 1 as the paper writes the metric). ``compensate=False`` skips the bias
    compensation (an ablation; the paper and code compensate)."""

    name = "flap"
    variant = "wifv"

    def __init__(self, sparsity=0.5, attn_power=2, compensate=True, apply="remove"):
        super().__init__(sparsity, apply)
        self.attn_power = check_choice("pruner.attn_power", attn_power, (1, 2))
        self.compensate = check_bool("pruner.compensate", compensate)
        self.variant = "wifv" if self.compensate else "wifv_nocomp"
        self.compensation: dict[int, list[tuple[nn.Module, torch.Tensor]]] = {}

    def make_stats(self, in_features, device="cpu"):
        return ChannelMoments(in_features, device)

    def prepare(self, model, state, device="cpu", store_device="cpu", progress=True, **_):
        """One pass over the dense model: every block's metric, then one global threshold."""
        heads, neurons, params, per_block = [], [], [], {}

        def measure(b):
            c = surgery.coupled(b.module, b.config)
            u = surgery.block_units(b.module, b.config)
            pg, pn = unit_params(b.module, b.config)
            found = {}
            for kind, slices, n in (("heads", c.heads, u["kv_heads"]), ("neurons", c.neurons, u["neurons"])):
                s = next(s for s in slices if s.dim == "in")
                name = next(k for k, m in b.linears.items() if m is s.module)
                stats = b.stats[b.shared[name]]
                metric = fluctuation(stats.var, get_weight(s.module))
                if kind == "heads":
                    metric = metric.pow(self.attn_power)
                metric = standardize(metric)
                found[kind] = metric.reshape(n, -1).mean(1)  # a unit's score: the mean over its channels
                per_block.setdefault(b.index, []).append((s.module, stats.mean.clone()))
            heads.append(found["heads"])
            neurons.append(found["neurons"])
            params.append((pg, pn))
            return False  # the dense outputs feed the next block

        run_layers(model, state, range(state.next_layer, len(get_blocks(model))), measure,
                   lambda name, mod: ChannelMoments(get_weight(mod).shape[1], device), device, store_device,
                   "flap[measure]", progress, sequential=False)
        self.threshold(heads, neurons, params)
        for i in self.decisions:
            self.compensation[i] = per_block[i]

    def threshold(self, heads: list[torch.Tensor], neurons: list[torch.Tensor], params: list[tuple[int, int]]) -> None:
        """Rank every head and neuron of the model by score; keep the best until their parameters reach
        (1 - sparsity) of the total (the unit where the running sum is closest, as the reference does); every
        layer keeps at least its best KV group."""
        units = []  # (score, parameters, layer, kind, index)
        for i, (hs, ns) in enumerate(zip(heads, neurons)):
            units += [(float(hs[j]), params[i][0], i, "h", j) for j in range(hs.numel())]
            units += [(float(ns[j]), params[i][1], i, "n", j) for j in range(ns.numel())]
        units.sort(key=lambda u: -u[0])
        cum = torch.tensor([u[1] for u in units], dtype=torch.float64).cumsum(0)
        target = (1 - self.sparsity) * float(cum[-1])
        keep = int(torch.argmin((cum - target).abs()))  # units[:keep] stay (the reference: score > threshold)
        self.forced = []
        for i, hs in enumerate(heads):
            drop_h = sorted(u[4] for u in units[keep:] if u[2] == i and u[3] == "h")
            if len(drop_h) == hs.numel():  # never a zero-head layer: keep its best group
                best = int(torch.argmax(hs))
                drop_h.remove(best)
                self.forced.append(i)
            drop_n = sorted(u[4] for u in units[keep:] if u[2] == i and u[3] == "n")
            if drop_h or drop_n:
                self.decisions[i] = surgery.BlockDecision(heads=drop_h, neurons=drop_n)

    @torch.no_grad()
    def prune_block(self, block):
        """Bias compensation on the output linears, then the decision: b += W[:, removed] @ mean(X[removed])."""
        d = self.decisions.get(block.index)
        if d is None or not self.compensate:
            return d
        c = surgery.coupled(block.module, block.config)
        for (module, mean), units, slices in zip(self.compensation[block.index], (d.heads, d.neurons), (c.heads, c.neurons)):
            s = next(s for s in slices if s.dim == "in")
            cols = [s.offset + u * s.width + k for u in units for k in range(s.width)]
            if not cols:
                continue
            w = get_weight(module)
            idx = torch.as_tensor(cols, device=w.device)
            delta = w[:, idx].double() @ mean.to(w.device)[idx]
            bias = surgery.add_bias(module)
            bias.data += delta.to(bias.dtype)
        return d


# ----------------------------------------------------------------------------------- ShortGPT
def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of 1 - cos(h_in, h_out), number of tokens) of one chunk."""
    cos = F.cosine_similarity(h_in.float().reshape(-1, h_in.shape[-1]), h_out.float().reshape(-1, h_out.shape[-1]), dim=-1)
    return float((1 - cos).sum()), cos.numel()


class ShortGPT(StructuredMethod):
    """ShortGPT (see module docstring)."""

    name = "shortgpt"
    variant = "bi"
    needs_outputs = True

    def prepare(self, model, state, device="cpu", store_device="cpu", progress=True, **_):
        self.bi: dict[int, float] = {}

        def measure(b):
            total = count = 0
            for h, out in zip(b.inputs.hidden, b.outputs):
                t, n = block_influence(h, out)
                total, count = total + t, count + n
            self.bi[b.index] = total / max(1, count)
            return False

        blocks = get_blocks(model)
        run_layers(model, state, range(state.next_layer, len(blocks)), measure, None, device, store_device,
                   "shortgpt[measure]", progress, outputs=True, sequential=False)
        n = self.blocks_to_remove(model)
        order = sorted(self.bi, key=lambda i: (self.bi[i], i))
        self.drop = sorted(order[:n])

    def check(self, model: nn.Module) -> None:
        super().check(model)
        self.blocks_to_remove(model)

    def blocks_to_remove(self, model: nn.Module) -> int:
        """round(sparsity x blocks): the whole blocks that make up ``sparsity`` of the attention + MLP parameters."""
        blocks = get_blocks(model)
        n = round(self.sparsity * len(blocks) + 1e-9)
        if n >= len(blocks):
            raise ConfigError(f"pruner.sparsity={self.sparsity} would remove all {len(blocks)} blocks; keep at least one")
        return n


STRUCTURED = {"nirvana": Nirvana, "flap": Flap, "wanda_sp": WandaSP, "llm_pruner": LLMPrunerTaylor, "shortgpt": ShortGPT}
