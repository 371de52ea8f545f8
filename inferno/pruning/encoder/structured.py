"""``pruner=encoder_structured``: structured pruning of a BERT encoder's attention heads and FFN neurons for a task,
then fine-tuning (optionally distilled from the unpruned model). The removal is the project's one structured surgery
(``pruning.llm.surgery``, BERT family adapter): a head takes its query/key/value rows (with biases) and its columns
of the attention output projection; a neuron its intermediate row (with bias) and its output-projection column.

Scores (``score``):
* ``taylor`` -- first-order Taylor importance |W (.) dL/dW| summed over the weights a head / neuron owns (every
  slice of every coupled linear), L the task's cross entropy on ``score_samples`` training examples (gradients
  accumulated in eval mode, no update; those examples count in the training cost);
* ``wanda_sp`` -- Wanda-sp (An et al., FLAP's structured Wanda baseline): for the output projections' input
  columns, mean_rows |W| x ||x||_2 of that input feature over the same examples; a head scores the sum over its
  columns of the attention output projection, a neuron its column of the FFN output projection.

How much: every layer loses the same fraction: ``round(s * 12)`` of 12 heads and ``round(s * 1536)`` of 1536
neurons for sparsity s (at least one head stays), its lowest-scoring units. ``sparsity`` in the points is the
fraction of the encoder layers' attention + FFN parameters actually removed (embeddings and head are not pruned and
not counted). After pruning, the child is fine-tuned ``finetune_epochs`` with the run's recipe; ``distill=true`` adds
knowledge distillation from the unpruned model: loss = (1 - a) CE + a T^2 KL(teacher_T || student_T) (a =
``distill_alpha``, T = ``distill_temperature``), the teacher's forward MACs added to the training cost.

The start model is ``ctx.dense()`` (the encoder fine-tuned on the task, ``dense`` point, sparsity 0); one point per
sparsity. Extra columns: ``heads_removed``, ``neurons_removed``, ``score``, ``distill``, ``target_sparsity``, and for
encoder tasks ``throughput`` (sentences/s) and ``mux_n`` (added by the run context).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from inferno.cost import TrainingCost
from inferno.errors import ConfigError, check_bool, check_choice, check_int
from inferno.pruning.llm import surgery
from inferno.pruning.llm.runner import get_blocks, get_weight
from inferno.pruning.llm.structured import attn_mlp_params, lowest, unit_scores
from inferno.training import ClassificationModule, check_epochs

SCORES = ("taylor", "wanda_sp")


def check_sparsities(values, key: str = "pruner.sparsities") -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ConfigError(f"{key}: {values!r} must be a non-empty list of sparsities in (0, 1)")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise ConfigError(f"{key}: {v!r} is not a sparsity in (0, 1)")
        out.append(float(v))
    return out


# ----------------------------------------------------------------------------------- scores
def taylor_saliency(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict:
    """|W (.) dL/dW| (as (out, in)) for every coupled linear of every block; L = mean cross entropy over (x, y)."""
    modules = {s.module for b in get_blocks(model) for s in _slices(b, model.config)}
    was = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            (F.cross_entropy(model(xb), yb) * (len(yb) / len(y))).backward()
    sal = {m: (m.weight.grad * m.weight.detach()).abs().float() for m in modules}
    model.zero_grad(set_to_none=True)
    model.train(was)
    return sal


def wanda_sp_saliency(model: nn.Module, x: torch.Tensor, batch_size: int) -> dict:
    """For each block's two output projections: (1, in) = mean over rows |W| x ||input feature||_2 over (x)."""
    outs = {}
    for b in get_blocks(model):
        c = surgery.coupled(b, model.config)
        for s in (*c.heads, *c.neurons):
            if s.dim == "in":
                outs[s.module] = torch.zeros(get_weight(s.module).shape[1], dtype=torch.float64)

    mask = {}

    def hook(mod, inp, _out):
        a = inp[0].detach().double()
        m = mask["x"]
        if m.shape[0] != a.shape[0]:  # a multiplexed model: one sequence per group of N, its mask the union
            m = m.view(a.shape[0], -1, m.shape[-1]).amax(1)
        a = a * m[..., None].to(a)  # padding positions are not inputs of the task
        outs[mod] += a.reshape(-1, a.shape[-1]).pow(2).sum(0).cpu()

    handles = [m.register_forward_hook(hook) for m in outs]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                xb = x[i:i + batch_size]
                xb = xb[:, :, : int(xb[:, 1].sum(1).max())]  # what the model's forward runs (trailing padding cut)
                n = getattr(model, "mux_n", 1)
                pad = (-len(xb)) % n
                mask["x"] = torch.cat([xb[:, 1], xb[-1:, 1].expand(pad, -1)]) if pad else xb[:, 1]
                model(xb)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {m: get_weight(m).abs().float().mean(0, keepdim=True) * sq.sqrt().float().to(m.weight.device)
            for m, sq in outs.items()}


def _slices(block, config):
    c = surgery.coupled(block, config)
    return [*c.heads, *c.neurons]


def block_scores(block, config, saliency: dict, score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(head scores, neuron scores) of one block: the saliency summed over what each unit owns (``wanda_sp``:
    over the output projections' input columns only)."""
    u = surgery.block_units(block, config)
    c = surgery.coupled(block, config)
    heads = [s for s in c.heads if score == "taylor" or s.dim == "in"]
    neurons = [s for s in c.neurons if score == "taylor" or s.dim == "in"]
    return unit_scores(heads, saliency, u["kv_heads"]), unit_scores(neurons, saliency, u["neurons"])


def uniform_decisions(model: nn.Module, saliency: dict, score: str, sparsity: float) -> dict[int, surgery.BlockDecision]:
    """Every layer loses round(s * heads) heads (at least one kept) and round(s * neurons) neurons, its lowest."""
    out = {}
    for i, block in enumerate(get_blocks(model)):
        u = surgery.block_units(block, model.config)
        hs, ns = block_scores(block, model.config, saliency, score)
        k_heads = min(round(sparsity * u["kv_heads"]), u["kv_heads"] - 1)
        out[i] = surgery.BlockDecision(heads=lowest(hs, k_heads), neurons=lowest(ns, round(sparsity * u["neurons"])))
    return out


# ----------------------------------------------------------------------------------- distillation
class DistillModule(ClassificationModule):
    """Fine-tuning with knowledge distillation from a frozen ``teacher``: (1 - a) CE + a T^2 KL(teacher || student)
    at temperature T (Hinton et al.)."""

    def __init__(self, net, teacher, alpha: float, temperature: float, train=None, max_epochs: int = 1):
        super().__init__(net, train, max_epochs)
        self.teacher = [teacher.eval()]  # a list: not a submodule (not trained, not in the state dict)
        self.alpha, self.temperature = alpha, temperature

    def training_step(self, batch, _):
        x, y = batch
        logits = self(x)
        with torch.no_grad():
            teacher = self.teacher[0].to(logits.device)(x)
        t = self.temperature
        kd = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                      reduction="batchmean") * t * t
        ce = F.cross_entropy(logits, y, label_smoothing=self.train_cfg.label_smoothing)
        loss = (1 - self.alpha) * ce + self.alpha * kd
        self.samples_seen += len(y)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(y))
        return loss


# ----------------------------------------------------------------------------------- the pruner
class EncoderStructuredPruner:
    """See the module docstring. Every option is checked here, before anything trains."""

    def __init__(self, sparsities: Sequence[float] = (0.3, 0.6), score: str = "taylor", score_samples: int = 256,
                 finetune_epochs: float = 1, distill: bool = False, distill_alpha: float = 0.5,
                 distill_temperature: float = 2.0, method: str = "encoder_structured"):
        self.sparsities = check_sparsities(sparsities)
        self.score = check_choice("pruner.score", score, SCORES, "score")
        self.score_samples = check_int("pruner.score_samples", score_samples, 1)
        self.finetune_epochs = check_epochs("pruner.finetune_epochs", finetune_epochs)
        self.distill = check_bool("pruner.distill", distill)
        if isinstance(distill_alpha, bool) or not isinstance(distill_alpha, (int, float)) or not 0 <= distill_alpha <= 1:
            raise ConfigError(f"pruner.distill_alpha: {distill_alpha!r} must be in [0, 1]")
        if isinstance(distill_temperature, bool) or not isinstance(distill_temperature, (int, float)) \
                or not distill_temperature > 0:
            raise ConfigError(f"pruner.distill_temperature: {distill_temperature!r} must be > 0")
        self.alpha, self.temperature, self.method = float(distill_alpha), float(distill_temperature), method

    def check(self, task) -> None:
        if not hasattr(task, "throughput_batch"):
            raise ConfigError(f"pruner: {self.method} prunes encoders for sequence classification; task "
                              f"{type(task).__name__} is not one")

    def saliency(self, ctx, net: nn.Module, cost: TrainingCost) -> dict:
        x, y = ctx.calib_batch(self.score_samples)
        bs = int(ctx.task.batch_size)
        if self.score == "taylor":
            cost.add(len(y), ctx.macs(net))
            return taylor_saliency(net, x, y, bs)
        return wanda_sp_saliency(net, x, bs)

    def prune(self, ctx, net: nn.Module, sparsity: float, cost: TrainingCost) -> dict:
        """Score ``net`` and remove ``sparsity`` of every layer's heads and neurons in place; the sizes removed."""
        decisions = uniform_decisions(net, self.saliency(ctx, net, cost), self.score, sparsity)
        surgery.apply(net, decisions, "remove")
        return {"heads_removed": sum(len(d.heads) for d in decisions.values()),
                "neurons_removed": sum(len(d.neurons) for d in decisions.values())}

    def finetune(self, ctx, net: nn.Module, teacher: nn.Module, cost: TrainingCost) -> None:
        if not self.finetune_epochs:
            return
        if not self.distill:
            ctx.finetune(net, self.finetune_epochs, cost)
            return
        module = DistillModule(net, teacher, self.alpha, self.temperature, ctx.train, self.finetune_epochs)
        samples = ctx.trainers.fit_module(module, ctx.task, self.finetune_epochs)
        cost.add(samples, ctx.macs(net) + ctx.macs(teacher))

    def run(self, ctx) -> None:
        dense, dense_cost = ctx.dense()
        base = attn_mlp_params(dense)
        for s in ctx.progress(self.sparsities, desc=f"{self.method} sparsities"):
            child, cost = copy.deepcopy(dense), dense_cost.copy()
            removed = self.prune(ctx, child, s, cost)
            self.finetune(ctx, child, dense, cost)
            extra = {**removed, "score": self.score, "distill": self.distill, "target_sparsity": s}
            point = ctx.record(self.method, len(ctx.tracker.points), child, cost, extra=extra,
                               sparsity=1 - attn_mlp_params(child) / base)
            ctx.log(f"{self.method} s={s}: {ctx.cfg.task.metric} {point.value:.4f}, "
                    f"throughput {point.extra.get('throughput', float('nan')):.1f}/s")
