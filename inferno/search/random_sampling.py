"""``pruner=random_sampling``: architectures drawn at random from greedy's space, each trained from
scratch, under the same budget: the baseline the INFERNO thesis compares greedy against. Every sample gets
the start model's recipe (the run's ``train`` settings for ``epochs``, default ``train.dense_epochs``),
so the baseline is not under-trained relative to the model greedy starts from.

The space is that of the start model: B' <= B stages, D' <= D blocks (the same in every stage, or per
stage), and widths for the stem and each stage from ``width_choices`` (fractions of the start model's
channels). Samples
are drawn until the training cost reaches ``total_samples``, or ``match.multiple`` times what the
method named by ``match.method`` spent earlier in the same run (with or without its start model's
training, ``match.include_start``), or ``max_samples`` samples. Each point's ``train_samples`` is the
cumulative cost of the search so far (``own_samples``: that sample's own training). The best sample by
validation accuracy is kept in the search state and written as ``random_sampling_best.safetensors`` (+ ``.json``).
"""

from __future__ import annotations

import random

from inferno.cost import TrainingCost, count_macs, count_params
from inferno.errors import ConfigError, check_int
from inferno.search.loop import Budget, SearchLoop, spec_summary
from inferno.search.moves import rebuild
from inferno.training import check_epochs


def check_width_choices(choices, key: str = "pruner.width_choices") -> list[float]:
    if not choices or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1 for f in choices):
        raise ConfigError(f"{key}: {list(choices or [])} must be a non-empty list of fractions in (0, 1]")
    return list(choices)


def scale_width(n: int, f: float) -> int:
    return max(1, round(n * f))


def scale_spec(spec: dict, depths: list[int], widths: list[float], stem: float = 1.0) -> dict:
    """The start spec cut to ``depths`` blocks per stage, every channel count scaled per stage (and the stem's)."""
    stages = [[{k: scale_width(v, f) for k, v in b.items()} for b in st[:d]] for st, d, f in zip(spec["stages"], depths, widths)]
    return {"stem": scale_width(spec["stem"], stem), "stages": stages}


def sample_arch(rng: random.Random, spec: dict, width_choices, per_stage_depth: bool = False) -> dict:
    """A random point of greedy's space: B' <= B stages, D' <= D blocks, a width per stage and for the stem."""
    B, D = len(spec["stages"]), max(len(s) for s in spec["stages"])
    b = rng.randint(1, B)
    depths = [rng.randint(1, D) for _ in range(b)] if per_stage_depth else [rng.randint(1, D)] * b
    return {"depths": [min(d, len(s)) for d, s in zip(depths, spec["stages"])],
            "widths": [rng.choice(width_choices) for _ in range(b)], "stem": rng.choice(width_choices)}


class RandomSampling(SearchLoop):
    method = "random_sampling"

    def __init__(self, epochs: int | None = None, max_samples: int = 20, total_samples: int | None = None,
                 match: dict | None = None, width_choices=(1.0, 0.75, 0.5), per_stage_depth: bool = False,
                 max_tries: int = 2000, **kw):
        super().__init__(**kw)
        check_epochs("pruner.epochs", epochs, allow_none=True)
        check_width_choices(width_choices)
        self.budget.check(self.method, required=False, measured=False)
        check_int("pruner.max_samples", max_samples, 1)
        check_int("pruner.max_tries", max_tries, 1)
        if total_samples is not None and total_samples <= 0:
            raise ConfigError(f"pruner.total_samples: {total_samples} must be positive (or null)")
        unknown = set(match or {}) - {"method", "multiple", "include_start"}
        if unknown:
            raise ConfigError(f"pruner.match: unknown key(s) {', '.join(sorted(unknown))}; allowed: method, multiple, "
                              "include_start")
        if match and match.get("method") and not float(match.get("multiple", 1.0)) > 0:
            raise ConfigError(f"pruner.match.multiple: {match.get('multiple')} must be positive")
        self.epochs, self.max_samples, self.total_samples = epochs, max_samples, total_samples
        self.match = dict(match or {})
        self.width_choices, self.per_stage_depth, self.max_tries = list(width_choices), per_stage_depth, max_tries

    def start(self, ctx):
        start = ctx.net
        x = ctx.example()
        figures = {"macs": count_macs(start, x), "params": count_params(start), "latency_ms": float("inf")}
        limits = self.budget.limits(figures)
        total = self.total_samples
        if self.match.get("method"):
            ref = ctx.results.get(self.match["method"])
            if ref is None:
                raise ConfigError(f"pruner.match.method: {self.match['method']!r} has not run earlier in this run; "
                                  f"ran: {', '.join(ctx.results) or 'none'}")
            base = ref["train_samples"] if self.match.get("include_start", True) else ref["search_samples"]
            total = int(base * float(self.match.get("multiple", 1.0)))
        state = {"dense_cost": vars(TrainingCost()), "cost": vars(TrainingCost()), "limits": limits,
                 "start_spec": start.spec(), "total_samples": total, "best_val": None}
        return state, {}

    def sample_epochs(self, ctx) -> float:
        """Epochs per sample: ``epochs``, or the start model's (``train.dense_epochs``) when null."""
        return self.epochs if self.epochs is not None else ctx.cfg.train.dense_epochs

    def done(self, ctx, state, nets):
        if state["step"] >= self.max_samples:
            return True
        per_sample = self.sample_epochs(ctx) * ctx.samples_per_epoch()
        return state["total_samples"] is not None and state["cost"]["samples"] + per_sample > state["total_samples"]

    def sample(self, ctx, state) -> tuple[dict, object]:
        rng = random.Random(int(ctx.cfg.seed) * 7919 + state["step"])
        spec = state["start_spec"]
        x = ctx.example()
        for _ in range(self.max_tries):
            arch = sample_arch(rng, spec, self.width_choices, self.per_stage_depth)
            net = rebuild(ctx.net, scale_spec(spec, **arch))
            if Budget.fits({"macs": count_macs(net, x), "params": count_params(net)}, state["limits"]):
                return arch, net
        raise ConfigError(f"pruner.budget: no architecture within {state['limits']} in {self.max_tries} random draws")

    def draws(self, ctx, state):
        """The progress bar over the draws (held across steps): ``max_samples``, or as many as the training budget
        allows where it is the tighter limit."""
        if getattr(self, "_bar", None) is None:
            total = self.max_samples
            if state["total_samples"] is not None:
                per_sample = self.sample_epochs(ctx) * ctx.samples_per_epoch()
                total = min(total, max(1, int(state["total_samples"] // max(per_sample, 1))))
            self._bar = ctx.progress(range(total), desc=f"{self.label}: samples")
            self._bar.update(state["step"])  # a resumed search starts where it stopped
        return self._bar

    def step(self, ctx, state, nets):
        bar = self.draws(ctx, state)
        choice, net = self.sample(ctx, state)
        cost = TrainingCost(**state["cost"])
        self.seed(ctx, state["step"])  # initialisation depends only on the sample's index
        net = rebuild(net)
        p = self.train_and_record(ctx, state, net, self.sample_epochs(ctx), cost, ("sample", state["step"]), state["step"] + 1,
                                  {"phase": "sample", "arch": spec_summary(net), "choice": choice})
        state["cost"] = vars(cost)
        if state["best_val"] is None or p.extra["val_value"] > state["best_val"]:
            state["best_val"] = p.extra["val_value"]
            nets["best"] = net  # saved with the state: the best sample so far, by validation accuracy
        bar.update(1)
        ctx.log(f"{self.label}: sample {state['step'] + 1} {spec_summary(net)}: val {p.extra['val_value']:.4f}, "
                f"{state['cost']['samples']} training samples so far")

    def finish(self, ctx, state, nets):
        if getattr(self, "_bar", None) is not None:
            self._bar.close()
            self._bar = None
        if "best" in nets:  # the chosen architecture's trained weights (+ its spec) in the run dir
            ctx.save_net(nets["best"], f"{self.method}_best")
        ctx.results[self.label] = {"train_samples": state["cost"]["samples"], "train_macs": state["cost"]["macs"],
                                    "samples": state["step"], "best_val": state["best_val"]}
