"""Within an accuracy-loss budget, the cheapest configuration of any sweep (CNN, LLM or encoder points).

    python scripts/pick.py RUN_OR_SWEEP_DIR [...] --max-loss 0.02 --by latency_ms [--relative] [--json]
    python scripts/pick.py outputs/multiruns/prumux --prumux --max-loss 0.05     # Auto-PruMUX: fit, predict, pick

The loss is measured against the dense configuration of the same model and task, in the metric's units (accuracy
0.02 = 2 points; perplexity +0.5), or as a fraction of it with --relative. See inferno/pick.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inferno import pick


def fmt(c: dict, by: str) -> str:
    what = " ".join(f"{k}={c[k]:g}" if isinstance(c[k], float) else f"{k}={c[k]}" for k in pick.KEYS
                    if k not in ("model", "task") and c.get(k) not in (None, ""))
    return f"{what} (value {c['value']:.4f}, {by} {c[by]:.4g}, n={c['n']})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="run or sweep folders (searched for points.csv), or csv files")
    ap.add_argument("--max-loss", type=float, required=True, help="allowed quality loss vs the dense model")
    ap.add_argument("--by", default="latency_ms", help="the cost column (throughput-like columns are maximised)")
    ap.add_argument("--relative", action="store_true", help="the loss as a fraction of the dense value")
    ap.add_argument("--reference-value", type=float, default=None, help="use this instead of the dense value")
    ap.add_argument("--json", action="store_true", help="print the answer and the table as JSON")
    ap.add_argument("--prumux", action="store_true", help="fit the Auto-PruMUX predictor (needs mux_n, throughput)")
    args = ap.parse_args(argv)
    try:
        rows = pick.load_points(args.paths)
        if args.prumux:
            pts = [{**r, "sparsity": pick.setting(r)} for r in rows if r.get("mux_n") is not None]
            dense = args.reference_value if args.reference_value is not None else pick.reference_value(
                rows, rows[0].get("model"), rows[0].get("task"))
            if dense is None:
                raise ValueError("--prumux: no dense point with mux_n 1 to measure the loss against")
            print(pick.prumux_report(pts, dense, budgets=(args.max_loss,)))
            return 0
        groups = list(dict.fromkeys((r.get("model"), r.get("task")) for r in rows))
        answers = [(g, *pick.pick([r for r in rows if (r.get("model"), r.get("task")) == g], args.max_loss, args.by,
                                  args.relative, args.reference_value)) for g in groups]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"model": g[0], "task": g[1], "best": best, "table": table} for g, best, table in answers],
                         indent=1, default=str))
        return 0
    unit = "relative " if args.relative else ""
    found = 0
    for (model, task), best, table in answers:
        if len(answers) > 1:
            print(f"\n## model {model}, task {task}")
        for c in sorted(table, key=lambda c: (not c["feasible"], c[args.by])):
            loss = "-" if c["loss"] is None else f"{c['loss']:+.4f}"
            print(f"{'*' if c is best else ' '} {'ok ' if c['feasible'] else 'no '} loss {loss}  {fmt(c, args.by)}")
        if best is None:
            print(f"{model} on {task}: no configuration within {unit}loss {args.max_loss}")
            continue
        found += 1
        print(f"{model} on {task}: within {unit}loss {args.max_loss} of dense ({best['metric']} {best['reference']:.4f}): "
              f"cheapest by {args.by} is {fmt(best, args.by)}")
    return 0 if found else 1


if __name__ == "__main__":
    raise SystemExit(main())
