"""Greedy layer-wise structured pruning for a task: the INFERNO thesis' algorithm and the project's extension.

Both run on the one search loop: from the trained start model, each step builds the children one move away,
transfers the parent's weights, fine-tunes every child, scores it on the validation split and keeps one,
until the current model fits the budget; the winner is then trained longer. Every child is a point; the
chosen one is marked ``selected``.

- ``pruner=greedy_thesis`` (:class:`GreedyThesis`, method ``greedy_thesis``): the thesis' rule. Two children
  per step, B-1 (drop the last stage) and D-1 (drop the last block of every stage), weights copied by name
  (leading slice where shapes differ: for B-1 only the head), each fine-tuned ``finetune_epochs`` (3) with
  SGD (lr 1e-3, momentum 0.9, constant), scored by the mean validation accuracy over its last
  ``score_epochs`` (4) epochs, selected by :func:`thesis_pick`, the winner trained ``final_epochs`` (93).
- ``pruner=greedy_layerwise`` (:class:`GreedyLayerwise`, method ``greedy_layerwise``): the project's own
  extension, not the thesis: an extra ``narrow`` move (channels through Torch-Pruning's dependency graph),
  importance-ranked weight transfer, an ``efficiency`` selection, the run's training recipe, and a
  from-scratch control of the winner's architecture.
"""

from __future__ import annotations

from dataclasses import asdict

from inferno.cost import TrainingCost
from inferno.errors import ConfigError, check_choice, check_int
from inferno.pruning.cnn.surgery import IMPORTANCES
from inferno.search.loop import Budget, Fit, SearchLoop, spec_summary
from inferno.search.moves import MOVES, TRANSFERS, MoveOptions, check_moves, children, rebuild
from inferno.training import OPTIMIZERS, SCHEDULES, TrainConfig, check_epochs

SELECTIONS = ("accuracy", "efficiency")


class GreedyLayerwise(SearchLoop):
    """The project's greedy search (see the module docstring); ``GreedyThesis`` overrides its rule."""

    method = "greedy_layerwise"

    def __init__(self, moves=("drop_stage", "drop_block", "narrow"), transfer: str = "importance",
                 select: str = "accuracy", narrow_ratio: float = 0.25, narrow_scope: str = "stage",
                 drop_block_scope: str = "all", importance: str = "l1", final_epochs: float = 3,
                 scratch_control: bool = True, scratch_epochs: int | None = None, parallel_children: int = 1, **kw):
        super().__init__(**kw)
        self.parallel_children = check_int("pruner.parallel_children", parallel_children, 1)
        for m in moves:
            check_choice("pruner.moves", m, tuple(MOVES))
        check_choice("pruner.transfer", transfer, TRANSFERS)
        check_choice("pruner.select", select, SELECTIONS)
        check_choice("pruner.importance", importance, IMPORTANCES)
        MoveOptions(None, narrow_ratio, narrow_scope, drop_block_scope)  # checks the scopes
        if not 0 < float(narrow_ratio) < 1:
            raise ConfigError(f"pruner.narrow_ratio: {narrow_ratio} must lie in (0, 1)")
        check_epochs("pruner.finetune_epochs", self.finetune_epochs)
        check_epochs("pruner.final_epochs", final_epochs)
        check_epochs("pruner.scratch_epochs", scratch_epochs, allow_none=True)
        self.budget.check(self.method)
        self.moves, self.transfer, self.select = list(moves), transfer, select
        self.narrow_ratio, self.narrow_scope, self.drop_block_scope = narrow_ratio, narrow_scope, drop_block_scope
        self.importance, self.final_epochs = importance, final_epochs
        self.scratch_control, self.scratch_epochs = scratch_control, scratch_epochs

    # ---------------------------------------------------------------- what differs between the two rules
    def recipe(self, ctx, phase: str) -> TrainConfig | None:
        """The training recipe of a child (``phase="child"``) or of the winner (``"final"``); None: the run's."""
        return None

    def val_history(self) -> bool:
        return False

    def score(self, p, state) -> float:
        if self.select == "accuracy":
            return p.extra["val_value"]
        removed = (state["current"]["macs"] - p.macs) / state["start"]["macs"]
        return (p.extra["val_value"] - state["current"]["val"]) / max(removed, 1e-9)

    def pick(self, scored: list[tuple[float, dict, object]], state) -> int:
        """Index of the kept child among ``(score, figures, point)``: the best score (the first on ties)."""
        return max(range(len(scored)), key=lambda i: (scored[i][0], -i))

    def objective(self, ctx) -> float | None:
        """What a sweeper optimises: the winner's test quality after its final training."""
        return (ctx.results.get(self.label) or {}).get("value")

    # ---------------------------------------------------------------- the search
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
        self.seed(ctx, state["step"], "children")  # fresh layers (a new head, leading-slice children) by position
        kids = children(parent, self.moves, opts, self.transfer)
        if not kids:
            raise ConfigError(f"pruner.budget: {state['limits']} is out of reach: {spec_summary(parent)} has no smaller child")
        cost = TrainingCost(**state["cost"])
        fits = [Fit(child.net, self.finetune_epochs, (state["step"], k), self.recipe(ctx, "child"), self.val_history())
                for k, child in enumerate(kids)]
        # in worker processes (pruner.parallel_children > 1) all at once, else each just before it is recorded
        fitted = self.fit(ctx, fits, self.parallel_children) if self.parallel_children > 1 else [None] * len(kids)
        scored = []
        for k, child in enumerate(ctx.progress(kids, desc=f"{self.method} step {state['step'] + 1}")):
            detail = {key: v for key, v in child.detail.items() if key != "kept"}
            p = self.train_and_record(ctx, state, child.net, self.finetune_epochs, cost, (state["step"], k),
                                      state["step"] + 1, {"phase": "child", "move": child.move, "detail": detail,
                                                          "arch": spec_summary(child.net), "selected": False},
                                      train=fits[k].train, val_history=fits[k].val_history, fitted=fitted[k])
            figures = {"macs": p.macs, "params": p.params, "latency_ms": p.latency_ms}
            scored.append((self.score(p, state), figures, p, len(state["points"]) - 1))
            self.annotate(ctx, state, p, scored[-1][3], score=scored[-1][0])
            ctx.log(f"{self.method} step {state['step'] + 1} child {k} ({child.move}, {spec_summary(child.net)}): "
                    f"val {p.extra['val_value']:.4f}, test {p.value:.4f}, {p.macs} MACs")
        k = self.pick([t[:3] for t in scored], state)
        p, child = scored[k][2], kids[k]
        self.annotate(ctx, state, p, scored[k][3], selected=True)
        state["cost"] = vars(cost)
        state["current"] = {"macs": p.macs, "params": p.params, "latency_ms": p.latency_ms, "val": p.extra["val_value"],
                            "arch": spec_summary(child.net)}
        state["path"].append({"step": state["step"] + 1, "move": child.move, "child": k, **state["current"]})
        nets["current"] = child.net

    @staticmethod
    def annotate(ctx, state, point, index: int, **columns) -> None:
        """Set extra ``columns`` on a recorded point: in points.csv and in the saved state's copy
        (``state["points"][index]``), so that a resumed run replays them too."""
        state["points"][index]["extra"].update(columns)
        ctx.tracker.update(point, **columns)

    def finish(self, ctx, state, nets):
        net, cost = nets["current"], TrainingCost(**state["cost"])
        last = state["step"] + 1
        final = self.train_and_record(ctx, state, net, self.final_epochs, cost, ("final",), last,
                                      {"phase": "final", "arch": spec_summary(net), "selected": True},
                                      train=self.recipe(ctx, "final"))
        ctx.save_net(net, f"{self.label}_final".replace("[", "_").replace("]", ""))
        if self.method == "greedy_layerwise" and not self.variant:
            ctx.save_net(net, "greedy_final")  # the name earlier runs and scripts read
        ctx.results[self.label] = {"train_samples": cost.samples, "train_macs": cost.macs,
                                    "search_samples": cost.samples - state["dense_cost"]["samples"],
                                    "value": final.value, "val_value": final.extra["val_value"],
                                    "macs": final.macs, "limits": state["limits"], "path": state["path"]}
        if self.scratch_control:
            self.seed(ctx, "scratch_init")  # its initialisation must not depend on what ran before in the process
            fresh = rebuild(net)
            epochs = self.scratch_epochs or int(ctx.cfg.train.dense_epochs)
            scratch = TrainingCost()
            self.train_and_record(ctx, {**state, "dense_cost": vars(TrainingCost())}, fresh, epochs, scratch,
                                  ("scratch",), last, {"phase": "scratch_control", "arch": spec_summary(fresh)},
                                  train=self.recipe(ctx, "final"))


def thesis_pick(b: tuple[float, bool] | None, d: tuple[float, bool] | None) -> str:
    """The thesis' selection between B-1 and D-1, each ``(score, above_threshold)`` or None when absent:
    B-1 if it is more accurate than D-1 and still above the threshold; else D-1 if it is above the
    threshold; else the more accurate of the two (which is then below the threshold: the search stops),
    B-1 on a tie (as the reference code's ``else`` branch does)."""
    if b is None or d is None:
        if b is None and d is None:
            raise ValueError("thesis_pick: no child")
        return "drop_stage" if d is None else "drop_block"
    if b[0] > d[0] and b[1]:
        return "drop_stage"
    if d[1]:
        return "drop_block"
    return "drop_block" if d[0] > b[0] else "drop_stage"


def above(figures: dict, limits: dict) -> bool:
    """The thesis' "above the threshold": some figure at or over its limit (its search stops once the kept
    model is strictly below)."""
    return any(float(figures[k]) >= v for k, v in limits.items())


class GreedyThesis(GreedyLayerwise):
    """``pruner=greedy_thesis``: the INFERNO thesis' greedy (see the module docstring); every number an option."""

    method = "greedy_thesis"

    def __init__(self, finetune_epochs: float = 3, final_epochs: float = 93, score_epochs: int = 4,
                 optimizer: str = "sgd", lr: float = 1e-3, momentum: float = 0.9, nesterov: bool = False,
                 weight_decay: float = 0.0, schedule: str = "constant", final_lr: float | None = None,
                 final_schedule: str | None = None, scratch_control: bool = False, **kw):
        for key in ("moves", "transfer", "select", "narrow_ratio", "narrow_scope", "drop_block_scope", "importance"):
            if key in kw:
                raise ConfigError(f"pruner.{key}: greedy_thesis has no {key} (the thesis' moves are B-1 and D-1, "
                                  "weights copied by name); use pruner=greedy_layerwise for the project's options")
        super().__init__(moves=("drop_stage", "drop_block"), transfer="leading_slice", select="accuracy",
                         drop_block_scope="all", final_epochs=final_epochs,
                         scratch_control=scratch_control, finetune_epochs=finetune_epochs, **kw)
        check_int("pruner.score_epochs", score_epochs, 1)
        if self.finetune_epochs < 1:
            raise ConfigError(f"pruner.finetune_epochs: {self.finetune_epochs} must be >= 1: greedy_thesis scores a "
                              "child by its validation accuracy after each epoch")
        check_choice("pruner.optimizer", optimizer, OPTIMIZERS)
        check_choice("pruner.schedule", schedule, SCHEDULES)
        check_choice("pruner.final_schedule", final_schedule, (None, *SCHEDULES))
        for key, v in (("lr", lr), ("final_lr", final_lr)):
            if v is not None and not v > 0:
                raise ConfigError(f"pruner.{key}: {v} must be positive")
        self.score_epochs = score_epochs
        self.optimizer, self.lr, self.momentum, self.nesterov = optimizer, lr, momentum, nesterov
        self.weight_decay, self.schedule = weight_decay, schedule
        self.final_lr, self.final_schedule = final_lr, final_schedule

    def recipe(self, ctx, phase):
        r = ctx.train.replace(optimizer=self.optimizer, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                              weight_decay=self.weight_decay, schedule=self.schedule)
        if phase == "final":
            r = r.replace(lr=self.final_lr, schedule=self.final_schedule)
        return r

    def val_history(self) -> bool:
        return True

    def done(self, ctx, state, nets):
        """Below the threshold, or nothing left to remove (B = D = 1: the reference code stops there too)."""
        net = nets["current"]
        if len(net.stages) == 1 and len(net.stages[0]) == 1:
            if above(state["current"], state["limits"]):
                ctx.log(f"{self.method}: {spec_summary(net)} is the smallest network and still above {state['limits']}")
            return True
        return not above(state["current"], state["limits"])

    def score(self, p, state) -> float:
        history = p.extra["val_history"][-self.score_epochs:]
        return sum(history) / len(history)

    def pick(self, scored, state) -> int:
        by_move = {}
        for i, (score, figures, p) in enumerate(scored):
            by_move[p.extra["move"]] = (i, (score, above(figures, state["limits"])))
        choice = thesis_pick(*(by_move[m][1] if m in by_move else None for m in ("drop_stage", "drop_block")))
        return by_move[choice][0]
