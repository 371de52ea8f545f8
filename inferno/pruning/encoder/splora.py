"""``pruner=splora``: Structured Pruning Adapters (Hedegaard et al.) against fine-pruning, at equal density.

Both start from the same pretrained encoder and use the same scores, shapes and schedule (``encoder_structured``'s:
``round(s * heads)`` heads and ``round(s * neurons)`` FFN neurons per layer, Taylor or Wanda-sp):

* ``splora`` -- every linear of the encoder layers becomes a SPLoRA linear (``adapters.SPLoRALinear``: frozen base
  weight, trainable low-rank adapter of rank ``rank`` and bias); embeddings, LayerNorms and base weights stay
  frozen; the adapters, the biases and the classification head are trained for ``dense_epochs`` on the task
  (``adapter_lr``), scored (on a folded copy: the scores see the weight the model computes with, W + BA), pruned --
  a removed head / neuron leaves the base rows / columns *and* the adapter's matching rows / columns, through the
  shared surgery -- then trained ``finetune_epochs`` more and folded (W + BA) into plain linears for the point;
* ``fine_pruning`` (the baseline) -- the same with every parameter trained at the run's ``train.lr``: the dense model
  is ``ctx.dense()`` (the ``dense`` point), pruned, fully fine-tuned ``finetune_epochs``.

Points: ``splora`` at sparsity 0 (the adapted dense model) and at every ``sparsities`` value; ``fine_pruning`` at
every value (its dense is the ``dense`` point). Extra column ``trained_params``: the parameters training changed,
i.e. what must be stored per task -- for ``splora`` r|in| + r|out| + |out| per adapted linear (at the pruned sizes)
plus the head; for ``fine_pruning`` every parameter of the pruned model.
"""

from __future__ import annotations

import copy

from torch import nn

from inferno.cost import TrainingCost
from inferno.errors import ConfigError, check_bool
from inferno.pruning.encoder.adapters import SPLoRALinear, adapter_parameter_count, add_adapters, fold_adapters
from inferno.pruning.encoder.structured import EncoderStructuredPruner, uniform_decisions
from inferno.pruning.llm import surgery
from inferno.pruning.llm.structured import attn_mlp_params
from inferno.training import check_epochs


def head_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.head.parameters()) + sum(
        p.numel() for n, p in net.named_parameters(recurse=False) if n == "index_embedding")


class SPLoRAPruner(EncoderStructuredPruner):
    """See the module docstring."""

    def __init__(self, rank: int = 16, init_range: float | None = None, adapter_lr: float = 1e-3,
                 dense_epochs: float = 3, baseline: bool = True, method: str = "splora", **kw):
        super().__init__(method=method, **kw)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"pruner.rank: {rank!r} must be an integer >= 1")
        if isinstance(adapter_lr, bool) or not isinstance(adapter_lr, (int, float)) or not adapter_lr > 0:
            raise ConfigError(f"pruner.adapter_lr: {adapter_lr!r} must be > 0")
        if self.distill:
            raise ConfigError("pruner.distill: splora does not distil (set pruner.distill=false)")
        self.rank, self.init_range, self.adapter_lr = rank, init_range, float(adapter_lr)
        self.dense_epochs = check_epochs("pruner.dense_epochs", dense_epochs)
        self.baseline = check_bool("pruner.baseline", baseline)

    # ------------------------------------------------------------------ SPLoRA
    def adapt(self, net: nn.Module) -> nn.Module:
        """Adapters on every linear of the encoder layers; only adapters, their biases and the head train."""
        kw = {} if self.init_range is None else {"init_range": self.init_range}
        add_adapters(net.bert.encoder, self.rank, **kw)
        for p in net.parameters():
            p.requires_grad_(False)
        for m in net.modules():
            if isinstance(m, SPLoRALinear):
                for p in (m.adapter_a, m.adapter_b, m.bias):
                    p.requires_grad_(True)
        for p in net.head.parameters():
            p.requires_grad_(True)
        if hasattr(net, "index_embedding"):
            net.index_embedding.requires_grad_(True)
        return net

    def trained_params(self, adapted: nn.Module) -> int:
        return adapter_parameter_count(adapted) + head_params(adapted)

    def score_folded(self, ctx, net: nn.Module, sparsity: float, cost: TrainingCost) -> dict:
        """Decisions from a folded copy of the adapted model (scores see W + BA)."""
        folded = copy.deepcopy(net)
        fold_adapters(folded)
        for p in folded.parameters():
            p.requires_grad_(True)
        return uniform_decisions(folded, self.saliency(ctx, folded, cost), self.score, sparsity)

    def record(self, ctx, method: str, net: nn.Module, cost: TrainingCost, s: float, base: int, trained: int,
               removed: dict) -> None:
        extra = {**removed, "score": self.score, "target_sparsity": s, "trained_params": trained}
        if method == "splora":
            extra["rank"] = self.rank
        point = ctx.record(method, len(ctx.tracker.points), net, cost, extra=extra,
                           sparsity=1 - attn_mlp_params(net) / base)
        ctx.log(f"{method} s={s}: {ctx.cfg.task.metric} {point.value:.4f}, trained params {trained:,}")

    def run(self, ctx) -> None:
        pretrained = ctx.net
        base = attn_mlp_params(pretrained)
        recipe = ctx.train.replace(lr=self.adapter_lr)
        adapted, cost0 = self.adapt(copy.deepcopy(pretrained)), TrainingCost()
        ctx.finetune(adapted, self.dense_epochs, cost0, train=recipe)
        folded = copy.deepcopy(adapted)
        fold_adapters(folded)
        self.record(ctx, "splora", folded, cost0, 0.0, base, self.trained_params(adapted), {})
        for s in ctx.progress(self.sparsities, desc="splora sparsities"):
            net, cost = copy.deepcopy(adapted), cost0.copy()
            decisions = self.score_folded(ctx, net, s, cost)
            surgery.apply(net, decisions, "remove")  # base rows/columns and the adapter's together
            removed = {"heads_removed": sum(len(d.heads) for d in decisions.values()),
                       "neurons_removed": sum(len(d.neurons) for d in decisions.values())}
            if self.finetune_epochs:
                ctx.finetune(net, self.finetune_epochs, cost, train=recipe)
            trained = self.trained_params(net)
            fold_adapters(net)
            self.record(ctx, "splora", net, cost, s, base, trained, removed)
        if not self.baseline:
            return
        dense, dense_cost = ctx.dense()  # fine-pruning: every parameter trained (the run's train recipe)
        for s in ctx.progress(self.sparsities, desc="fine_pruning sparsities"):
            child, cost = copy.deepcopy(dense), dense_cost.copy()
            removed = self.prune(ctx, child, s, cost)
            self.finetune(ctx, child, dense, cost)
            self.record(ctx, "fine_pruning", child, cost, s, base, sum(p.numel() for p in child.parameters()), removed)
