"""``pruner=greedy_layerwise``: the INFERNO thesis' greedy layer-wise structured pruning for a task.

From the trained start model, each step builds every child one move away, transfers the parent's weights,
fine-tunes each child briefly, evaluates it on the validation split and keeps the best (by ``select``:
``accuracy``, or ``efficiency`` = validation accuracy gained per fraction of the start model's MACs
removed). The search stops once the current model fits the budget; the winner is then fine-tuned longer
and, as a control, its architecture is also trained from scratch. Every child is a point.
"""

from __future__ import annotations

from dataclasses import asdict

from inferno.cost import TrainingCost
from inferno.errors import ConfigError
from inferno.search.loop import Budget, SearchLoop, spec_summary
from inferno.search.moves import MoveOptions, check_moves, children, rebuild

SELECTIONS = ("accuracy", "efficiency")


class GreedyLayerwise(SearchLoop):
    method = "greedy_layerwise"

    def __init__(self, moves=("drop_stage", "drop_block", "narrow"), transfer: str = "importance",
                 select: str = "accuracy", narrow_ratio: float = 0.25, narrow_scope: str = "stage",
                 drop_block_scope: str = "all", importance: str = "l1", final_epochs: int = 3,
                 scratch_control: bool = True, scratch_epochs: int | None = None, **kw):
        super().__init__(**kw)
        if select not in SELECTIONS:
            raise ConfigError(f"pruner.select: unknown rule {select!r}; allowed: {', '.join(SELECTIONS)}")
        if not self.budget.limits({k: 1.0 for k in ("macs", "params", "latency_ms")}):
            raise ConfigError("pruner.budget: set at least one of macs, params, latency_ms")
        self.moves, self.transfer, self.select = list(moves), transfer, select
        self.narrow_ratio, self.narrow_scope, self.drop_block_scope = narrow_ratio, narrow_scope, drop_block_scope
        self.importance, self.final_epochs = importance, final_epochs
        self.scratch_control, self.scratch_epochs = scratch_control, scratch_epochs

    def start(self, ctx):
        check_moves(self.moves, ctx.net)
        dense, cost = ctx.dense()
        p = ctx.dense_point
        figures = {"macs": p.macs, "params": p.params, "latency_ms": p.latency_ms}
        state = {"dense_cost": vars(cost), "cost": vars(cost.copy()), "limits": self.budget.limits(figures),
                 "start": figures, "current": {**figures, "val": p.extra["val_value"], "arch": spec_summary(dense)},
                 "points": [asdict(p)], "path": []}
        return state, {"dense": dense, "current": dense}

    def done(self, ctx, state, nets):
        return Budget.fits(state["current"], state["limits"])

    def step(self, ctx, state, nets):
        parent = nets["current"]
        opts = MoveOptions(ctx.example(), self.narrow_ratio, self.narrow_scope, self.drop_block_scope, self.importance,
                           ctx.calib_batch())
        kids = children(parent, self.moves, opts, self.transfer)
        if not kids:
            raise ConfigError(f"pruner.budget: {state['limits']} is out of reach: {spec_summary(parent)} has no smaller child")
        cost = TrainingCost(**state["cost"])
        best = None
        for k, child in enumerate(ctx.progress(kids, desc=f"greedy step {state['step'] + 1}")):
            detail = {key: v for key, v in child.detail.items() if key != "kept"}
            p = self.train_and_record(ctx, state, child.net, self.finetune_epochs, cost, (state["step"], k),
                                      state["step"] + 1, {"phase": "child", "move": child.move, "detail": detail,
                                                          "arch": spec_summary(child.net)})
            score = self.score(p, state)
            if best is None or score > best[0]:
                best = (score, k, child, p)
        _, k, child, p = best
        state["cost"] = vars(cost)
        state["current"] = {"macs": p.macs, "params": p.params, "latency_ms": p.latency_ms, "val": p.extra["val_value"],
                            "arch": spec_summary(child.net)}
        state["path"].append({"step": state["step"] + 1, "move": child.move, "child": k, **state["current"]})
        nets["current"] = child.net

    def score(self, p, state) -> float:
        if self.select == "accuracy":
            return p.extra["val_value"]
        removed = (state["current"]["macs"] - p.macs) / state["start"]["macs"]
        return (p.extra["val_value"] - state["current"]["val"]) / max(removed, 1e-9)

    def finish(self, ctx, state, nets):
        net, cost = nets["current"], TrainingCost(**state["cost"])
        last = state["step"] + 1
        final = self.train_and_record(ctx, state, net, self.final_epochs, cost, ("final",), last,
                                      {"phase": "final", "arch": spec_summary(net)})
        ctx.save_net(net, "greedy_final")
        ctx.results[self.label] = {"train_samples": cost.samples, "train_macs": cost.macs,
                                    "search_samples": cost.samples - state["dense_cost"]["samples"],
                                    "value": final.value, "val_value": final.extra["val_value"],
                                    "macs": final.macs, "limits": state["limits"]}
        if self.scratch_control:
            self.seed(ctx, "scratch_init")  # its initialisation must not depend on what ran before in the process
            fresh = rebuild(net)
            epochs = self.scratch_epochs or int(ctx.cfg.train.dense_epochs)
            scratch = TrainingCost()
            self.train_and_record(ctx, {**state, "dense_cost": vars(TrainingCost())}, fresh, epochs, scratch,
                                  ("scratch",), last, {"phase": "scratch_control", "arch": spec_summary(fresh)})
