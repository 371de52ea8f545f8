"""``pruner=grid``: the INFERNO thesis' baseline, a grid of fully trained architectures.

Every MicroCNN(B, D, W) with B <= the start model's stages, D <= its depth and W <= its width (or the
``stages``/``depths``/``widths`` given), C unchanged, whose cost fits the budget is trained once from
scratch with the start model's recipe (``train``, ``epochs`` default ``train.dense_epochs``). Each
configuration is a point (columns ``B``, ``D``, ``W``, ``under_budget``; ``train_samples`` cumulative in the
grid's training order, seeded-shuffled by default so that "cost until a match" is not biased by size);
the run's results hold the thesis' view: the mean accuracy under the budget and the Pareto front.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict

from inferno.cost import TrainingCost, count_macs, count_params
from inferno.errors import ConfigError, check_choice
from inferno.search.loop import Budget, SearchLoop, spec_summary
from inferno.tracking import pareto_front
from inferno.training import check_epochs

ORDERS = ("shuffled", "macs")


class Grid(SearchLoop):
    method = "grid"

    def __init__(self, epochs: float | None = None, stages: list[int] | None = None, depths: list[int] | None = None,
                 widths: list[int] | None = None, order: str = "shuffled", **kw):
        super().__init__(**kw)
        check_epochs("pruner.epochs", epochs, allow_none=True)
        check_choice("pruner.order", order, ORDERS)
        for key, v in (("stages", stages), ("depths", depths), ("widths", widths)):
            if v is not None and (not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v)):
                raise ConfigError(f"pruner.{key}: {v!r} must be null or a non-empty list of integers >= 1")
        self.budget.check(self.method, measured=False)
        self.epochs, self.stages, self.depths, self.widths, self.order = epochs, stages, depths, widths, order

    def space(self, ctx) -> list[tuple[int, int, int]]:
        m = ctx.cfg.model
        if not all(k in m for k in ("stages", "depth", "width", "base_channels")) or not isinstance(m.depth, int):
            raise ConfigError(f"pruner: grid enumerates MicroCNN(B, D, W) with one depth for every stage; model "
                              f"{m.name} is not one (use model=microcnn with an integer model.depth)")
        return list(itertools.product(self.stages or range(1, m.stages + 1), self.depths or range(1, m.depth + 1),
                                      self.widths or range(1, m.width + 1)))

    def build(self, ctx, b: int, d: int, w: int):
        m = ctx.cfg.model
        return type(ctx.net)(stages=b, depth=d, width=w, base_channels=m.base_channels,
                             se_reduction=m.get("se_reduction", 16), **ctx.net.config)

    def start(self, ctx):
        dense, cost = ctx.dense()
        p = ctx.dense_point
        limits = self.budget.limits({"macs": p.macs, "params": p.params, "latency_ms": p.latency_ms})
        x = ctx.example()
        fitting = []  # (MACs, [B, D, W]) of every configuration under the budget
        for b, d, w in self.space(ctx):
            net = self.build(ctx, b, d, w)
            figures = {"macs": count_macs(net, x), "params": count_params(net)}
            if Budget.fits(figures, limits):
                fitting.append((figures["macs"], [b, d, w]))
        if not fitting:
            raise ConfigError(f"pruner.budget: no MicroCNN(B, D, W) of the grid fits {limits}")
        if self.order == "macs":
            fitting.sort(key=lambda t: t[0])  # stable: equal MACs keep the enumeration order
        configs = [c for _, c in fitting]
        if self.order == "shuffled":
            random.Random(int(ctx.cfg.seed) * 7919 + 17).shuffle(configs)
        state = {"dense_cost": vars(cost), "cost": vars(TrainingCost()), "limits": limits, "configs": configs,
                 "points": [asdict(p)]}
        return state, {"dense": dense}  # kept so that a resumed run replays the start model's point

    def done(self, ctx, state, nets):
        return state["step"] >= len(state["configs"])

    def step(self, ctx, state, nets):
        b, d, w = state["configs"][state["step"]]
        self.seed(ctx, "grid", b, d, w)  # initialisation depends only on the configuration
        net = self.build(ctx, b, d, w)
        cost = TrainingCost(**state["cost"])
        epochs = self.epochs if self.epochs is not None else ctx.cfg.train.dense_epochs
        self.train_and_record(ctx, {**state, "dense_cost": vars(TrainingCost())}, net, epochs, cost, ("grid", b, d, w),
                              state["step"] + 1, {"phase": "config", "B": b, "D": d, "W": w, "under_budget": True,
                                                  "arch": spec_summary(net)})
        state["cost"] = vars(cost)

    def finish(self, ctx, state, nets):
        rows = [r for r in state["points"] if r["method"] == self.method]
        values = [r["value"] for r in rows]
        front = pareto_front(rows, "macs")
        best_val = max(range(len(rows)), key=lambda i: rows[i]["extra"]["val_value"])
        ctx.results[self.label] = {
            "train_samples": state["cost"]["samples"], "train_macs": state["cost"]["macs"], "configs": len(rows),
            "mean_value": sum(values) / len(values), "best_val_value": rows[best_val]["value"],
            "best_val_arch": rows[best_val]["extra"]["arch"], "limits": state["limits"],
            "pareto": [{k: r["extra"][k] for k in ("B", "D", "W")} | {"macs": r["macs"], "value": r["value"]}
                       for r in front],
        }
        ctx.log(f"grid: {len(rows)} configurations under {state['limits']}: mean {self.metric(ctx)} "
                f"{ctx.results[self.label]['mean_value']:.4f}, Pareto front of {len(front)}")

    def objective(self, ctx) -> float | None:
        """What a sweeper optimises: the test quality of the configuration with the best validation quality."""
        return (ctx.results.get(self.label) or {}).get("best_val_value")

    @staticmethod
    def metric(ctx) -> str:
        return ctx.cfg.task.metric
