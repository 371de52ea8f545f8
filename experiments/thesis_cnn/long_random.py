"""Cost to reach each greedy method's final test accuracy for a *long* random-sampling run (a separate multirun
of ``random_sampling`` alone, variant ``long``, on the same seeds and budget as the main thesis_cnn runs).

    python experiments/thesis_cnn/long_random.py outputs/multiruns/thesis_cnn_random_long \
        --main outputs/multiruns/thesis_cnn_v2 --add outputs/multiruns/thesis_cnn_run_recipe

Prints one markdown table: per seed and greedy method, greedy's final test accuracy and search cost, and the long
random run's training until its best-validation model reaches that accuracy (as a multiple of greedy's search
cost), or "not reached in N" (N: every sample it trained, a lower bound). A run cut short still counts: its
points.csv holds every finished sample.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from render import baseline_rows, cost_to_reach, final_row, load_runs, merge_runs, num

GREEDY = ("greedy_thesis", "greedy_thesis[run_recipe]", "greedy_layerwise")


def table(long_dirs: list[Path], main: list[Path], add: list[Path]) -> str:
    runs = {(str(r.seed), r.budget): r for r in merge_runs(load_runs(main), load_runs(add) if add else [])}
    header = ("| seed | budget | greedy method | greedy test acc | greedy search samples | long random: samples to reach "
              "| × greedy search | random samples trained |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for long in sorted(load_runs(long_dirs), key=lambda r: str(r.seed)):
        rows = baseline_rows(long.rows, "random_sampling")
        run = runs.get((str(long.seed), long.budget))
        if run is None:
            print(f"warning: no main run for seed {long.seed} budget {long.budget}", file=sys.stderr)
            continue
        for label in GREEDY:
            final = final_row(run.rows, label)
            if final is None:
                continue
            target, search = num(final, "value"), num(final, "search_samples")
            reached, total = cost_to_reach(rows, target)
            what = f"{reached:,.0f}" if reached is not None else f"not reached in {total:,.0f}"
            ratio = (f"{reached / search:.2f}x" if reached is not None else f"> {total / search:.2f}x")
            lines.append(f"| {long.seed} | {long.budget:.0%} | {label} | {target:.4f} | {search:,.0f} | {what} | "
                         f"{ratio} | {len(rows)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("long", type=Path, nargs="+", help="the long random-sampling multirun(s)")
    ap.add_argument("--main", type=Path, nargs="+", required=True, help="the main thesis_cnn multirun(s)")
    ap.add_argument("--add", type=Path, nargs="*", default=[], help="ablation multiruns merged into the main runs")
    args = ap.parse_args()
    print(table(args.long, args.main, args.add))
