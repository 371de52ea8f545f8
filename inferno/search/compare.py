"""``pruner=compare``: several pruners in one run, sharing the trained start model, the task and the
tracker, in the order given, so that later ones can match earlier ones' training cost
(``random_sampling``'s ``match.method``) and every method lands in one ``points.csv`` and one curve.

The objective it returns to a sweeper (``objective``): the final test quality of the named method (its
result's ``value``, e.g. greedy's winner after its final training), so a sweep over ``compare`` or
``greedy_vs_random`` optimises that method's answer."""

from __future__ import annotations

from omegaconf import DictConfig


class Compare:
    method = "compare"

    def __init__(self, methods: DictConfig, budget: DictConfig | None = None, objective: str | None = None):
        from inferno.config import build_node
        from inferno.errors import ConfigError

        # every method built (so every option checked) before anything trains; ``budget`` is only the value
        # the methods' configs interpolate
        self.methods = {}
        for key, node in methods.items():
            if node is None:
                continue
            try:
                self.methods[key] = build_node(node, "pruner")
            except ConfigError as e:  # name the nested key: pruner.methods.KEY.option
                msg = str(e)
                raise ConfigError(msg.replace("pruner.", f"pruner.methods.{key}.", 1) if msg.startswith("pruner.")
                                  else f"pruner.methods.{key}: {msg.removeprefix('pruner: ')}") from None
        if objective is not None and objective not in self.methods:
            raise ConfigError(f"pruner.objective: {objective!r} is not an active method; allowed: "
                              f"{', '.join(self.methods)}")
        self.objective_method = objective
        earlier = []
        for key, m in self.methods.items():
            ref = (getattr(m, "match", None) or {}).get("method")
            if ref and ref not in earlier:
                raise ConfigError(f"pruner.methods.{key}.match.method: {ref!r} does not run before {key}; allowed: "
                                  f"{', '.join(earlier) or 'none'}")
            earlier.append(getattr(m, "label", m.method))

    def check(self, task) -> None:
        for m in self.methods.values():
            if hasattr(m, "check"):
                m.check(task)

    def run(self, ctx) -> None:
        for key, method in self.methods.items():
            ctx.log(f"compare: {key}")
            method.run(ctx)

    def objective(self, ctx) -> float | None:
        """The final test quality of the ``objective`` method (None when unset or it reports none)."""
        if self.objective_method is None:
            return None
        method = self.methods[self.objective_method]
        return (ctx.results.get(getattr(method, "label", method.method)) or {}).get("value")
