"""The Hydra-facing LLM pruner (``pruner=magnitude|wanda|sparsegpt|owl|mosaic|inferno_task``, and the structured
``pruner=nirvana|flap|wanda_sp|llm_pruner|shortgpt``: :meth:`LLMPruner.run_structured`).

One class for every method: ``method`` selects ``methods.get_method``, every other option
either says where the calibration comes from (``calibration``, ``nsamples``, ``seqlen``, ``seed``,
``generate``) or goes to the method (``sparsity``, ``pattern``, ``group``, ``score``, ``base``, ...).
``run(ctx)``: record the dense point, draw the calibration, prune through the one sequential runner
(``runner.prune_model``), write the per-layer sparsity report, record the pruned point, and with
``save=true`` export the model to ``model/`` in the run directory.

Calibration sources (``pruner.calibration``): ``task`` (the task's own unlabeled inputs, optionally
extended by ``generate`` tokens the model samples itself), ``wikitext2``, ``shakespeare`` (the calibration parts
of files of ``paths.data_dir``, see ``inferno.tasks.lm.CORPORA``), ``random`` (uniform token ids, needs no data) or
the path of any text file. No source ever reads text the task evaluates: :meth:`LLMPruner.check` refuses an
overlapping combination from the config, before the model is loaded, and ``calibration.json`` in the run directory
lists the corpus positions every calibration sample read.

``calibration_unit``: ``window`` (``nsamples`` windows of ``seqlen`` tokens at random offsets) or ``example``
(``nsamples`` whole task inputs, one sample per example, as the INFERNO thesis calibrates; needs
``calibration=task`` on a multiple-choice task). ``sequential``: ``true`` feeds each block the pruned blocks'
outputs (Wanda, SparseGPT), ``false`` takes every statistic from one pass over the dense model (the thesis'
reference code).
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from inferno.cost import SparseLatency, TrainingCost, measure_sparse_latency
from inferno.errors import ConfigError, check_int
from inferno.models.hf import torch_device
from inferno.models.stream import is_streamed
from inferno.pruning.llm.methods import get_method
from inferno.pruning.llm.runner import each_block, find_linears, get_blocks, get_weight, prune_model
from inferno.pruning.llm.structured import STRUCTURED, attn_mlp_params, kl_divergence
from inferno.tasks.lm import CORPORA, Calibration

CALIBRATIONS = ("task", "random", *CORPORA)
UNITS = ("window", "example")
# methods that prune block by block with shapes kept, so model.stream=true can read and write one block at a time
STREAMABLE = ("magnitude", "wanda", "sparsegpt", "owl", "inferno_task", "mosaic")


# ----------------------------------------------------------------------------------- sparsity
def prunable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear inside the decoder blocks (what the runner prunes)."""
    out = {}
    for i, block in enumerate(get_blocks(model)):
        for name, mod in find_linears(block).items():
            out[f"{i}.{name}"] = mod
    return out


def linear_counts(model: nn.Module) -> tuple[int, int]:
    """(non-zero, total) weights of the prunable linears, read one block at a time through the model's block
    source (a streamed model is never whole in memory)."""
    nonzero = total = 0
    for block in each_block(model):
        for mod in find_linears(block).values():
            w = get_weight(mod)
            nonzero += int(torch.count_nonzero(w))
            total += w.numel()
    return nonzero, total


def zero_fraction(model: nn.Module) -> float:
    """Fraction of zeros over all prunable linears (the achieved sparsity)."""
    nonzero, total = linear_counts(model)
    return (total - nonzero) / max(1, total)


# ----------------------------------------------------------------------------------- pruner
class LLMPruner:
    """One calibration-pruning run of one method (see module docstring)."""

    def __init__(
        self,
        method: str,
        sparsity: float | None = 0.5,
        pattern: str = "unstructured",
        calibration: str = "shakespeare",
        nsamples: int = 32,
        seqlen: int = 256,
        seed: int = 0,
        generate: int = 0,
        batch_size: int = 8,
        device: str = "cpu",
        data_dir: str | None = None,
        save: bool = False,
        record_dense: bool = True,
        progress: bool = False,
        calibration_unit: str = "window",
        sequential: bool = True,
        stream: bool = False,
        **options,
    ):
        options = {k: v for k, v in options.items() if v is not None}
        if not isinstance(stream, bool):
            raise ConfigError(f"model.stream: {stream!r} must be true or false")
        if stream and method not in STREAMABLE:
            why = ("its structural stage removes heads and neurons across the model" if method == "mosaic_composite"
                   else "it removes heads, neurons or blocks and decides across the whole model")
            raise ConfigError(f"model.stream: {method} cannot stream ({why}); allowed: {', '.join(STREAMABLE)}")
        self.structured = method in STRUCTURED
        self.kl_seeds = self.kl_nsamples = None
        self.decode_tokens = check_int("pruner.decode_tokens", options.pop("decode_tokens", 0), 0)
        if self.structured:  # physically smaller models: no N:M pattern; optional KL choice of calibration seed
            if str(pattern) != "structured":
                raise ConfigError(f"pruner.pattern: {method} removes whole heads and neurons and takes "
                                  f"pattern=structured, got {pattern!r}")
            self.kl_seeds = check_kl_seeds(options.pop("kl_seeds", None), int(seed))
            self.kl_nsamples = check_int("pruner.kl_nsamples", options.pop("kl_nsamples", 8), 1)
            self.method = get_method(method, sparsity=sparsity, **options)
        else:
            self.method = get_method(method, sparsity=sparsity, pattern=str(pattern), **options)
        self.name = method
        for key, v in (("nsamples", nsamples), ("seqlen", seqlen), ("batch_size", batch_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"pruner.{key} must be a positive integer, got {v!r}")
        if not isinstance(generate, int) or generate < 0:
            raise ConfigError(f"pruner.generate must be an integer >= 0 (new tokens per sample), got {generate!r}")
        calibration = str(calibration)
        if calibration not in CALIBRATIONS and not Path(calibration).is_file():
            raise ConfigError(
                f"pruner.calibration must be one of {list(CALIBRATIONS)} or a text file, got {calibration!r}"
            )
        if calibration_unit not in UNITS:
            raise ConfigError(f"pruner.calibration_unit must be one of {list(UNITS)}, got {calibration_unit!r}")
        if calibration_unit == "example" and calibration != "task":
            raise ConfigError(f"pruner.calibration_unit=example draws whole task inputs and needs "
                              f"pruner.calibration=task, got pruner.calibration={calibration!r}")
        if not isinstance(sequential, bool):
            raise ConfigError(f"pruner.sequential must be true or false, got {sequential!r}")
        self.unit, self.sequential = calibration_unit, sequential
        self.calibration, self.nsamples, self.seqlen, self.seed = calibration, nsamples, seqlen, int(seed)
        self.generate, self.batch_size, self.device = generate, batch_size, torch_device(device)
        self.data_dir, self.save, self.record_dense, self.progress = data_dir, bool(save), bool(record_dense), progress
        self.options = options

    @property
    def variant(self) -> str:
        m = self.method
        if self.structured:
            return m.variant
        if self.name == "inferno_task":
            return m.score
        if self.name == "owl":
            return m.base.name
        if self.name in ("mosaic", "mosaic_composite"):
            return m.variant
        return m.group

    # ------------------------------------------------------------------ calibration
    def check(self, task) -> None:
        """Refuse, from the config alone (before the model is loaded), calibration that the task cannot give
        or that would read text the task evaluates."""
        if not self.method.needs_calibration or self.calibration == "random":
            return
        if self.calibration == "task":
            if not hasattr(task, "task_calibration_error"):
                raise ConfigError(f"pruner.calibration=task: task {type(task).__name__} has no unlabeled calibration inputs")
            err = task.task_calibration_error(self.unit)
        else:
            err = task.source_error(self.calibration, self.data_dir)
        if err:
            raise ConfigError(err)

    def draw(self, net: nn.Module, task, seed: int | None = None, nsamples: int | None = None) -> Calibration | None:
        """The calibration samples and the corpus positions they read, or None for methods that need no data
        (``seed`` / ``nsamples``: other than the configured ones, e.g. for the KL choice of calibration seed)."""
        if not self.method.needs_calibration:
            return None
        seed = self.seed if seed is None else int(seed)
        nsamples = self.nsamples if nsamples is None else nsamples
        self.check(task)
        limit = getattr(net.config, "max_position_embeddings", None)
        if limit and self.unit == "window" and self.seqlen + self.generate > limit:
            raise ConfigError(
                f"pruner.seqlen: {self.seqlen} + pruner.generate {self.generate} exceeds the model's context of {limit} tokens"
            )
        if self.calibration == "task":
            calib = task.task_calibration(nsamples, self.seqlen, seed, unit=self.unit)
        elif self.calibration == "random":
            g = torch.Generator().manual_seed(seed)
            calib = Calibration(torch.randint(0, net.config.vocab_size, (nsamples, self.seqlen), generator=g))
        else:
            calib = task.source_calibration(self.calibration, nsamples, self.seqlen, seed, self.data_dir)
        if self.unit == "example" and limit:  # whole prompts: keep the last tokens that leave room to generate
            keep = max(1, limit - self.generate)
            calib.ids = [x[:, -keep:] for x in calib.ids]
        if self.generate:
            calib.ids = self.continue_with_model(net, calib.ids)
        return calib

    def held_out(self, net: nn.Module, task, used: list) -> Calibration:
        """``kl_nsamples`` windows of the calibration source that overlap none of the ``used`` calibration windows
        (drawn with seed 10**6; for ``random``, fresh random tokens): the KL choice never scores a seed on text it
        calibrated on."""
        if self.calibration == "random":
            return self.draw(net, task, seed=10**6, nsamples=self.kl_nsamples)
        pool = self.draw(net, task, seed=10**6, nsamples=8 * self.kl_nsamples)
        keep = [j for j, w in enumerate(pool.windows) if not any(w.overlaps(u) for u in used)][: self.kl_nsamples]
        if len(keep) < self.kl_nsamples:
            raise ConfigError(f"pruner.kl_nsamples: only {len(keep)} windows of pruner.calibration={self.calibration} "
                              f"overlap no calibration window; lower pruner.kl_nsamples or pruner.nsamples")
        ids = [pool.ids[j] for j in keep]
        return Calibration(torch.stack(ids) if torch.is_tensor(pool.ids) else ids, [pool.windows[j] for j in keep])

    @torch.no_grad()
    def continue_with_model(self, net: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Extend every calibration sample by ``generate`` tokens the model samples itself (top-k 50);
        the runner then counts every token's activations, prompt and continuation alike."""
        device = next(net.parameters()).device
        torch.manual_seed(self.seed)
        outs = []
        chunks = ids.split(self.batch_size) if torch.is_tensor(ids) else ids  # a list: one example at a time
        for chunk in tqdm(chunks, desc=f"{self.name}: generate {self.generate} tokens", disable=not self.progress,
                          leave=False):
            out = net.generate(
                input_ids=chunk.to(device), attention_mask=torch.ones_like(chunk).to(device),
                max_new_tokens=self.generate, min_new_tokens=self.generate, do_sample=True, top_k=50,
                pad_token_id=getattr(net.config, "pad_token_id", None) or 0,
            )
            outs.append(out.cpu())
        return torch.cat(outs) if torch.is_tensor(ids) else outs

    # ------------------------------------------------------------------ run
    def extra(self, ctx, calib_tokens: int) -> dict:
        out = {
            "variant": self.variant, "pattern": self.method.pattern, "target_sparsity": round(self.method.sparsity, 6),
            "calibration": self.calibration if self.method.needs_calibration else "none",
            "calib_tokens": calib_tokens, "nsamples": self.nsamples, "seqlen": self.seqlen,
            "generate": self.generate, "calib_seed": self.seed, "calibration_unit": self.unit,
            "sequential": self.sequential,
        }
        for key in ("max_row_sparsity", "row_limit"):  # INFERNO's row options, when set
            if getattr(self.method, key, None) is not None:
                out[key] = getattr(self.method, key)
        if "outliers" in ctx.cfg.model:
            out["outliers"] = bool(ctx.cfg.model.outliers)
        if is_streamed(ctx.net):  # blocks read from disk in every forward: latency_ms includes the reads
            out["stream"] = True
        return out

    def run(self, ctx) -> None:
        if self.structured:
            return self.run_structured(ctx)
        net, task = ctx.net, ctx.task
        net.eval()
        streamed = is_streamed(net)
        # a streamed model's blocks are not in memory after a forward: density is given, not measured by the cost model
        prunable = () if streamed else None
        if hasattr(self.method, "check"):  # mosaic_composite: the model family must support structured surgery
            self.method.check(net)
        if self.record_dense:  # density = 1 - the zero fraction of the prunable linears (what the runner prunes)
            zeros = zero_fraction(net)
            ctx.record("dense", 0, net, TrainingCost(), extra=self.extra(ctx, 0) | {"variant": "", "pattern": "",
                       "target_sparsity": 0.0, "calibration": "none"}, sparsity=zeros, density=1 - zeros,
                       prunable=prunable)
        t0 = time.time()
        drawn = self.draw(net, task)
        calib = None if drawn is None else drawn.ids
        calib_s = time.time() - t0
        if drawn is not None:  # what calibration read: corpus positions, to audit against the evaluated text
            (ctx.run_dir / "calibration.json").write_text(json.dumps(
                {"source": self.calibration, "unit": self.unit, "seed": self.seed,
                 "windows": [[w.corpus, w.start, w.end] for w in drawn.windows]}))
        t0 = time.time()
        before = sum(get_weight(m).numel() for m in prunable_linears(net).values())
        stages = self.method.stages(net) if hasattr(self.method, "stages") else [self.method]
        report = {}
        # streamed: every block is written to the output folder as it is pruned (model/ with save=true, else a
        # folder removed at the end of the run), which the model then reads from
        out = ctx.run_dir / ("model" if self.save else "model-stream")
        with net.block_source.writing(out, self.progress) if streamed else contextlib.nullcontext():
            for stage in stages:  # mosaic_composite: whole units first (physically), then per-projection masks
                report = prune_model(net, stage, calib, device=self.device, batch_size=self.batch_size,
                                     progress=self.progress, sequential=self.sequential)
        prune_s = time.time() - t0
        # the fraction of the block linears' weights gone, removed or zeroed (= the zero fraction when shapes stay)
        achieved = 1 - linear_counts(net)[0] / before
        calib_tokens = 0 if calib is None else int(calib.numel() if torch.is_tensor(calib) else sum(x.numel() for x in calib))
        layers = {"method": self.name, "variant": self.variant, "pattern": self.method.pattern,
                  "target_sparsity": self.method.sparsity, "achieved_sparsity": achieved, "layers": report}
        if getattr(self.method, "outlier_ratios", None):
            layers["owl_outlier_ratios"] = self.method.outlier_ratios
            layers["owl_layer_sparsity"] = self.method.base.per_layer
        if hasattr(self.method, "report"):  # Mosaic: the POD and the per-projection allocation
            layers |= self.method.report()
        (ctx.run_dir / "sparsity.json").write_text(json.dumps(layers, indent=2))
        extra = self.extra(ctx, calib_tokens) | {"calib_s": round(calib_s, 3), "prune_s": round(prune_s, 3),
                                                 "min_layer_sparsity": round(min(report.values(), default=0), 6),
                                                 "max_layer_sparsity": round(max(report.values(), default=0), 6)}
        if hasattr(self.method, "structured_target"):  # mosaic_composite: the two parts
            extra |= {"structured_fraction": self.method.fraction, "unstructured_sparsity": round(self.method.sparsity, 6),
                      "target_sparsity": round(self.method.target, 6)}
        if ":" in str(self.method.pattern):  # N:M: also time the 2:4 sparse kernels where they run
            hw = ctx.cfg.hardware
            sp = (SparseLatency(None, None, "model.stream=true: the model is never whole in memory") if streamed
                  else measure_sparse_latency(net, ctx.example(), prunable_linears(net).values(),
                                              repeats=hw.latency_repeats))
            if sp.ms is None:
                ctx.log(f"{self.name}: latency_ms_sparse not measured: {sp.note}")
            extra |= {"latency_ms_sparse": None if sp.ms is None else round(sp.ms, 4),
                      "latency_ms_sparse_dense": None if sp.dense_ms is None else round(sp.dense_ms, 4),
                      "latency_sparse_note": sp.note}
        ctx.record(self.name, 1, net, TrainingCost(), extra=extra, sparsity=achieved, density=1 - achieved,
                   prunable=prunable)
        if self.save:
            from inferno.models.hf import save_pruned

            tok = getattr(task, "tokenizer", None)
            tok = tok if hasattr(tok, "save_pretrained") else None
            structure = getattr(getattr(self.method, "structured", None), "structure", None)
            save_pruned(net, tok, ctx.run_dir / "model", report, structure=structure)
        elif streamed:
            shutil.rmtree(out, ignore_errors=True)  # pruned blocks were only needed for the pruned point

    # ------------------------------------------------------------------ structured methods
    def decode_extra(self, ctx, net: nn.Module) -> dict:
        """Tokens/s of greedy decoding of ``decode_tokens`` tokens after the cost model's prompt (0: not measured)."""
        if not self.decode_tokens:
            return {}
        from inferno.cost import decode_tokens_per_s

        ids = ctx.example()["input_ids"].to(next(net.parameters()).device)
        return {"decode_tok_s": round(decode_tokens_per_s(net, ids, new_tokens=self.decode_tokens), 3)}

    def calibrate(self, ctx, net: nn.Module, method, calib: Calibration) -> None:
        prune_model(net, method, calib.ids, device=self.device, batch_size=self.batch_size, progress=self.progress,
                    sequential=self.sequential)

    def kl_draws(self, net: nn.Module, task) -> tuple[dict[int, Calibration], Calibration]:
        """Every ``kl_seeds`` calibration draw and the held-out windows the KL is measured on (drawn before any
        pruning, so a source too small for them stops the run first)."""
        draws = {s: self.draw(net, task, seed=s) for s in self.kl_seeds}
        return draws, self.held_out(net, task, [w for d in draws.values() for w in d.windows])

    def select_by_kl(self, ctx, net: nn.Module, draws: dict[int, Calibration], held: Calibration) -> tuple[Calibration, dict]:
        """Prune a copy of ``net`` with each seed's calibration and return the draw whose pruned model has the lowest
        KL(P_dense || Q_pruned) on the held-out windows (NIRVANA's calibration selection, automated)."""
        kls = {}
        for s, calib in draws.items():
            candidate = copy.deepcopy(net)
            method = get_method(self.name, sparsity=self.method.sparsity, **self.options)
            self.calibrate(ctx, candidate, method, calib)
            kls[s] = kl_divergence(net, candidate, held.ids, self.batch_size)
            ctx.log(f"{self.name}: calibration seed {s}: KL(dense || pruned) = {kls[s]:.6f} on {len(held.windows)} held-out windows")
            del candidate
        best = min(kls, key=lambda s: (kls[s], s))
        return draws[best], {"kl_seeds": list(kls), "kl": kls, "kl_seed": best,
                             "kl_windows": [[w.corpus, w.start, w.end] for w in held.windows]}

    def run_structured(self, ctx) -> None:
        """Dense point; calibration (the KL choice of seed when ``kl_seeds`` is set); structured pruning that
        physically removes heads / neurons / blocks; the pruned point (sparsity = fraction of the attention + MLP
        parameters removed, cost measured on the smaller model); ``structure.json``; the export with ``save``."""
        net, task = ctx.net, ctx.task
        net.eval()
        self.method.check(net)  # family and options this model cannot take: refused before any measurement
        draws = self.kl_draws(net, task) if self.kl_seeds else None
        drawn = self.draw(net, task) if draws is None else None
        base = attn_mlp_params(net)
        extra = {"variant": self.variant, "pattern": "structured", "target_sparsity": round(self.method.sparsity, 6),
                 "calibration": self.calibration, "nsamples": self.nsamples, "seqlen": self.seqlen,
                 "calib_seed": self.seed, "apply": self.method.apply}
        if self.record_dense:
            ctx.record("dense", 0, net, TrainingCost(), extra=extra | self.decode_extra(ctx, net) | {
                "variant": "", "pattern": "", "target_sparsity": 0.0, "calibration": "none"}, sparsity=0.0, density=1.0)
        t0, kl = time.time(), {}
        if draws is not None:
            drawn, kl = self.select_by_kl(ctx, net, *draws)
        (ctx.run_dir / "calibration.json").write_text(json.dumps(
            {"source": self.calibration, "unit": self.unit, "seed": kl.get("kl_seed", self.seed),
             "windows": [[w.corpus, w.start, w.end] for w in drawn.windows]} | kl))
        self.calibrate(ctx, net, self.method, drawn)
        prune_s = time.time() - t0
        left = attn_mlp_params(net)
        structure = {"method": self.name, "variant": self.variant, "target_sparsity": self.method.sparsity,
                     "achieved_sparsity": 1 - left / base, "attn_mlp_params": [base, left],
                     "layers": {str(i): v for i, v in sorted(self.method.structure.items())}} | self.method.summary()
        for key in ("allocation", "ratio", "forced", "bi"):
            if getattr(self.method, key, None) is not None:
                structure[key] = getattr(self.method, key)
        structure |= {k: v for k, v in kl.items() if k != "kl_windows"}
        (ctx.run_dir / "structure.json").write_text(json.dumps(structure, indent=2, default=str))
        d = self.method.summary()["decisions"]
        extra |= {"calib_seed": kl.get("kl_seed", self.seed), "prune_s": round(prune_s, 3),
                  "kv_groups_removed": sum(len(v["kv_heads"]) for v in d.values()),
                  "neurons_removed": sum(len(v["neurons"]) for v in d.values()),
                  "blocks_removed": len(self.method.drop)}
        if kl:
            extra["kl"] = kl["kl"][kl["kl_seed"]]
        ctx.record(self.name, 1, net, TrainingCost(), extra=extra | self.decode_extra(ctx, net),
                   sparsity=1 - left / base, density=1.0)
        if self.save:
            from inferno.models.hf import save_pruned

            tok = getattr(task, "tokenizer", None)
            tok = tok if hasattr(tok, "save_pretrained") else None
            save_pruned(net, tok, ctx.run_dir / "model", {}, structure=self.method.structure,
                        extra={k: v for k, v in structure.items() if k != "layers"})


def check_kl_seeds(seeds, seed: int = 0) -> list[int] | None:
    """``pruner.kl_seeds``: null (no selection), a count n (the calibration seeds seed*n .. seed*n + n-1, so runs with
    ``seed`` 0, 1, 2 choose among disjoint seeds) or a list of calibration seeds."""
    if seeds is None:
        return None
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        check_int("pruner.kl_seeds", seeds, 1, hint=" (a count) or a list of seeds")
        return list(range(seed * seeds, seed * seeds + seeds))
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"pruner.kl_seeds: {seeds!r} must be null, a count >= 1 or a list of distinct integer seeds")
    return seeds
