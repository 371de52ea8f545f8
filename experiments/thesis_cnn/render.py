"""Render the thesis_cnn table and curves from a multirun of ``experiment=thesis_cnn``.

    python experiments/thesis_cnn/render.py outputs/multiruns/thesis_cnn [--out results/thesis_cnn]

Per method (mean ± std over seeds): final MACs, test accuracy (selection always on the validation split),
training examples processed with and without the start model's training, the same in MACs, and the
ratio of random sampling's training cost to reach greedy's test accuracy (the thesis' ">10x" figure).
Random sampling at 1x / 3x / 10x greedy's cost is read off one 10x sequence: the sample with the best
validation accuracy among those trained within that cost.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from inferno.tracking import read_points


def ms(xs, fmt="{:.4f}"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(statistics.stdev(xs))}"


def f(r, k):
    return float(r[k]) if r.get(k) not in (None, "") else None


def seed_summary(rows: list[dict]) -> dict:
    out = {}
    dense = next(r for r in rows if r["method"] == "dense")
    start = int(dense["train_samples"])
    start_macs = int(dense["train_macs"])
    out["dense"] = {"macs": f(dense, "macs"), "acc": f(dense, "value"), "samples": start, "search": 0,
                    "train_macs": start_macs, "search_macs": 0}

    def final(method, variant=""):
        rs = [r for r in rows if r["method"] == method and r.get("phase") == "final" and (r.get("variant") or "") == variant]
        return rs[-1] if rs else None

    g = final("greedy_layerwise")
    for key, r in (("greedy_layerwise", g), ("greedy_layerwise[no_width]", final("greedy_layerwise", "no_width")),
                   ("supernet", final("supernet"))):
        if r:
            out[key] = {"macs": f(r, "macs"), "acc": f(r, "value"), "samples": int(r["train_samples"]),
                        "search": int(r["search_samples"]), "train_macs": int(r["train_macs"]),
                        "search_macs": int(r["search_macs"]), "arch": r.get("arch")}
    ctrl = [r for r in rows if r.get("phase") == "scratch_control" and not r.get("variant")]
    if ctrl:
        r = ctrl[-1]
        out["greedy arch from scratch (control)"] = {"macs": f(r, "macs"), "acc": f(r, "value"),
                                                      "samples": int(r["own_samples"]), "search": int(r["own_samples"]),
                                                      "train_macs": int(r["train_macs"]), "search_macs": int(r["train_macs"])}
    uni = [r for r in rows if r["method"] == "uniform"]
    for r in uni:
        out[f"uniform ({float(r['ratio']):.2f} of channels)"] = {
            "macs": f(r, "macs"), "acc": f(r, "value"), "samples": int(r["train_samples"]),
            "search": int(r["train_samples"]) - start, "train_macs": int(r["train_macs"]),
            "search_macs": int(r["train_macs"]) - start_macs}
    rnd = [r for r in rows if r["method"] == "random_sampling"]
    if g and rnd:
        for mult in (1, 3, 10):
            for base_name, base in (("search", int(g["search_samples"])), ("total", int(g["train_samples"]))):
                within = [r for r in rnd if int(r["train_samples"]) <= mult * base]
                if not within or (mult * base > int(rnd[-1]["train_samples"]) + int(rnd[-1]["own_samples"])):
                    continue  # the sequence does not reach that cost
                best = max(within, key=lambda r: float(r["val_value"]))
                out[f"random_sampling @ {mult}x greedy {base_name} cost"] = {
                    "macs": f(best, "macs"), "acc": f(best, "value"), "samples": int(within[-1]["train_samples"]),
                    "search": int(within[-1]["train_samples"]), "train_macs": int(within[-1]["train_macs"]),
                    "search_macs": int(within[-1]["train_macs"])}
        # cost for random sampling's selected model to reach greedy's test accuracy
        best_val, reach = -1.0, None
        for r in rnd:
            if float(r["val_value"]) > best_val:
                best_val, chosen = float(r["val_value"]), r
            if float(chosen["value"]) >= float(g["value"]):
                reach = int(r["train_samples"])
                break
        out["_reach"] = {"samples": reach, "greedy_search": int(g["search_samples"]), "greedy_total": int(g["train_samples"]),
                         "random_total": int(rnd[-1]["train_samples"])}
    return out


def render(multirun: Path, out: Path) -> str:
    runs = sorted(p.parent for p in multirun.glob("*/points.csv"))
    seeds = {}
    for run in runs:
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
        seed = summary.get("config", {}).get("seed", run.name)
        seeds[seed] = seed_summary(read_points(run / "points.csv"))
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(run / "points.csv", out / f"points_seed{seed}.csv")
    keys = [k for k in dict.fromkeys(k for s in seeds.values() for k in s) if not k.startswith("_")]
    lines = [(f"Seeds: {sorted(seeds)} ({len(seeds)}); mean ± std. Test accuracy on 1k held-out MNIST images "
             f"(selection on the other 1k). Samples = training examples processed."), "",
             ("| method | final MACs | test acc | train samples (with start) | train samples (search only) "
             "| train MACs (with start) | train MACs (search only) | n |"),
             "|---|---|---|---|---|---|---|---|"]
    for k in keys:
        vals = [s[k] for s in seeds.values() if k in s]
        lines.append(
            f"| {k} | {ms([v['macs'] for v in vals], '{:,.0f}')} | {ms([v['acc'] for v in vals])} "
            f"| {ms([v['samples'] for v in vals], '{:,.0f}')} | {ms([v['search'] for v in vals], '{:,.0f}')} "
            f"| {ms([v['train_macs'] for v in vals], '{:.3g}')} | {ms([v['search_macs'] for v in vals], '{:.3g}')} | {len(vals)} |")
    lines += ["", ("Random sampling's training cost until its selected model (best validation accuracy so far) "
              "reaches greedy's test accuracy, as a multiple of greedy's cost:"), "",
              "| seed | greedy search samples | greedy total samples | random samples to reach | ratio vs search | ratio vs total |",
              "|---|---|---|---|---|---|"]
    for seed, s in sorted(seeds.items()):
        r = s.get("_reach")
        if not r:
            continue
        if r["samples"] is None:
            lo = r["random_total"]
            lines.append(f"| {seed} | {r['greedy_search']:,} | {r['greedy_total']:,} | not reached in {lo:,} "
                         f"| > {lo / r['greedy_search']:.1f}x | > {lo / r['greedy_total']:.1f}x |")
        else:
            lines.append(f"| {seed} | {r['greedy_search']:,} | {r['greedy_total']:,} | {r['samples']:,} "
                         f"| {r['samples'] / r['greedy_search']:.2f}x | {r['samples'] / r['greedy_total']:.2f}x |")
    archs = [f"seed {seed}: {s['greedy_layerwise'].get('arch')}" for seed, s in sorted(seeds.items()) if "greedy_layerwise" in s]
    lines += ["", "Greedy's final architectures: " + "; ".join(archs)]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    plot(seeds, runs, out / "curves.png")
    return text


def plot(seeds, runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"greedy_layerwise": "C0", "greedy_layerwise[no_width]": "C5", "supernet": "C2", "dense": "k",
              "greedy arch from scratch (control)": "C4"}
    for run in runs:
        rows = read_points(run / "points.csv")
        rnd = [r for r in rows if r["method"] == "random_sampling"]
        best_val, xs, ys = -1, [], []
        for r in rnd:
            if float(r["val_value"]) > best_val:
                best_val, chosen = float(r["val_value"]), r
            xs.append(int(r["train_samples"]))
            ys.append(float(chosen["value"]))
        a.step(xs, ys, where="post", color="C1", alpha=0.6, label="random sampling (selected so far)" if run == runs[0] else None)
        b.scatter([int(r["macs"]) for r in rnd], [float(r["value"]) for r in rnd], s=8, color="C1", alpha=0.4,
                  label="random samples" if run == runs[0] else None)
    for i, s in enumerate(seeds.values()):
        for k, v in s.items():
            if k.startswith(("_", "random")):
                continue
            c = colors.get(k, "C3")
            a.scatter(v["search"] or 1, v["acc"], color=c, marker="o", label=k if i == 0 else None)
            b.scatter(v["macs"], v["acc"], color=c, marker="o", label=k if i == 0 else None)
    a.set_xscale("symlog")
    a.set_xlabel("training examples processed (search only, start model excluded)")
    b.set_xscale("log")
    b.set_xlabel("MACs of the final model")
    for ax in (a, b):
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("multirun", type=Path)
    ap.add_argument("--out", type=Path, default=Path("results/thesis_cnn"))
    args = ap.parse_args()
    print(render(args.multirun, args.out))
