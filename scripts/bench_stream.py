"""Benchmark of ``model.stream=true`` (not a timed test): a random Llama of about 1.5 GB in float32 is saved to disk
and pruned with Wanda (50 % unstructured) through the real CLI twice, in memory and streaming, each run in its own
fresh process; printed side by side, and written to ``--out`` (JSON, plus a CSV next to it):

* the model's size on disk (safetensors), its parameters, the bytes of one decoder block and of the weights outside
  the blocks (embeddings, final norm, LM head);
* per run: the **peak resident set** of the process (``VmHWM`` of /proc/self/status, read by the wrapper that runs
  ``python -m inferno`` in that process as it exits; Linux's ``ru_maxrss`` is also recorded, from ``wait4`` -- the
  parent stays small, torch is not imported in it before both runs are over), the resident set once torch,
  transformers and inferno are imported (what any run pays before a weight is read), the wall time of the whole
  CLI run, and a coarse timeline of the resident set (sampled every ``--sample-s`` seconds);
* the streaming / in-memory ratio of the peaks (and of the peaks above the import baseline) and of the wall times;
* whether the two pruned model folders (``save=true``: the run directory's ``model/``) hold bitwise the same tensors
  (read one tensor at a time through safetensors: same names, dtypes, shapes, values; the largest absolute
  difference), and the perplexities of both runs' points.csv (dense and pruned points), which must be equal;
* ``--depth-check N``: both runs again on a model of the same width with N blocks -- what the peaks owe to depth
  (in memory: every block; streaming: nothing, ideally).

Both runs see the same calibration (``pruner.calibration=task``: ``--nsamples`` windows of ``--seqlen`` tokens of
WikiText-2's last 10 %, byte-level ids since the random model has no tokenizer: ``task.tokenizer=null``) and the
same evaluation (the first ``--eval-limit`` windows of ``--seqlen`` tokens of the evaluated 90 %). The latency of
the cost model is measured once per point at batch 1 (``hardware.latency_repeats=1``) to keep runs short.

    python scripts/bench_stream.py --out results/stream/bench_stream.json     # 24 x (1024, 2816), vocab 32000: 1.5 GB
    python scripts/bench_stream.py --layers 3 --hidden 256 --ffn 688 --heads 4 --vocab 4096 --depth-check 1 \
        --out /tmp/s.json                                                      # a smoke run (under a minute)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816, help="intermediate size of the MLP")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16, help="attention heads (as many KV heads)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration and evaluation window")
    p.add_argument("--eval-limit", type=int, default=4, help="evaluated windows (task.limit)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--depth-check", type=int, default=2,
                   help="also run both on the same width with this many blocks (streaming's peak should not depend "
                        "on depth); 0: skip")
    p.add_argument("--sample-s", type=float, default=0.5, help="period of the resident-set timeline")
    p.add_argument("--workdir", default="/tmp/inferno_bench_stream", help="model folders and run directories")
    p.add_argument("--keep", action="store_true", help="keep the workdir (model folders, runs) afterwards")
    p.add_argument("--out", required=True, help="JSON file of the figures (a .csv of the same name is written too)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------- /proc
def status_mb(field: str, pid: str = "self") -> float:
    """A memory field of /proc/PID/status (VmRSS, VmHWM), in MB (2**20 bytes)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------------- child: build the model
def build(a) -> None:
    """``--build DIR``: the random Llama, seeded, saved with save_pretrained (safetensors) -- in a child so that the
    parent never holds it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.set_num_threads(a.threads)
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.heads, vocab_size=a.vocab,
                      max_position_embeddings=max(2048, a.seqlen), tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(a.build)
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    (Path(a.build) / "bench_stream_build.json").write_text(json.dumps({
        "params": sum(p.numel() for p in model.parameters()), "weight_bytes": total, "block_bytes": block,
        "outside_blocks_bytes": total - a.layers * block, "config": cfg.to_diff_dict()}))


# ----------------------------------------------------------------------------------- child: one measured CLI run
def measured(result: str, sample_s: float, cli_args: list[str]) -> None:
    """``--measure RESULT -- ARGS``: ``python -m inferno ARGS`` in this process; on the way out (success or not)
    write its peak resident set (VmHWM), the resident set after the imports, the wall time and a timeline."""
    t0 = time.perf_counter()
    timeline: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            timeline.append((round(time.perf_counter() - t0, 2), round(status_mb("VmRSS"), 1)))
            stop.wait(sample_s)

    threading.Thread(target=sample, daemon=True).start()
    import runpy

    import torch  # noqa: F401  (what the run imports anyway: the baseline every run pays)
    import transformers  # noqa: F401

    import inferno.run  # noqa: F401

    imported = status_mb("VmRSS")
    code = 0
    sys.argv = ["inferno", *cli_args]
    try:
        runpy.run_module("inferno", run_name="__main__", alter_sys=True)
    except SystemExit as e:  # hydra / the CLI's one-line errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        stop.set()
        seconds = time.perf_counter() - t0
        Path(result).write_text(json.dumps({
            "peak_rss_mb": status_mb("VmHWM"), "rss_end_mb": status_mb("VmRSS"), "rss_imported_mb": imported,
            "wall_s": seconds, "exit": code, "timeline": timeline}))
    sys.exit(code)


# ----------------------------------------------------------------------------------- parent
def cli_args(a, model_dir: Path, run_dir: Path, stream: bool) -> list[str]:
    return ["model=hf_causal_lm", f"model.path={model_dir}", f"model.stream={str(stream).lower()}",
            "task=wikitext2", "task.tokenizer=null", f"task.seqlen={a.seqlen}", f"task.limit={a.eval_limit}",
            "pruner=wanda", f"pruner.sparsity={a.sparsity}", "pruner.calibration=task",
            f"pruner.nsamples={a.nsamples}", f"pruner.seqlen={a.seqlen}", "save=true", "logger=none",
            f"hardware.num_threads={a.threads}", "hardware.progress_bar=false", "hardware.latency_repeats=1",
            "hardware.latency_batch_size=1", f"hydra.run.dir={run_dir}"]


def run_child(a, name: str, model_dir: Path, stream: bool) -> dict:
    run_dir = Path(a.workdir) / f"run_{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    result = Path(a.workdir) / f"{name}.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", "-", "--measure", str(result),
           "--sample-s", str(a.sample_s), "--", *cli_args(a, model_dir, run_dir, stream)]
    print(f"[{name}] python -m inferno {' '.join(cli_args(a, model_dir, run_dir, stream))}", flush=True)
    with open(Path(a.workdir) / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (ru_maxrss)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not result.is_file():
        tail = (Path(a.workdir) / f"{name}.log").read_text()[-3000:]
        raise SystemExit(f"[{name}] exit {proc.returncode}:\n{tail}")
    out = json.loads(result.read_text()) | {"ru_maxrss_mb": usage.ru_maxrss / 1024, "run_dir": str(run_dir)}
    with open(run_dir / "points.csv") as f:
        out["points"] = list(csv.DictReader(f))
    print(f"[{name}] peak RSS {out['peak_rss_mb']:.0f} MB, wall {out['wall_s']:.0f} s", flush=True)
    return out


def folder_files(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return dict.fromkeys(f.keys(), path / "model.safetensors")


def compare(a_dir: Path, b_dir: Path) -> dict:
    """Tensor by tensor (one pair in memory at a time): same names, and per tensor dtype, shape and values."""
    import torch
    from safetensors import safe_open

    fa, fb = folder_files(a_dir), folder_files(b_dir)
    out = {"tensors": len(fa), "same_names": set(fa) == set(fb), "unequal": [], "max_abs_diff": 0.0,
           "zeros_in_blocks": 0, "numel_in_blocks": 0}
    for key in sorted(set(fa) & set(fb)):
        with safe_open(str(fa[key]), framework="pt") as ha, safe_open(str(fb[key]), framework="pt") as hb:
            x, y = ha.get_tensor(key), hb.get_tensor(key)
        if x.dtype != y.dtype or x.shape != y.shape:
            out["unequal"].append(key)
            continue
        if not torch.equal(x, y):
            out["unequal"].append(key)
        out["max_abs_diff"] = max(out["max_abs_diff"], float((x.double() - y.double()).abs().max()) if x.numel() else 0.0)
        if ".layers." in key and key.endswith("proj.weight"):
            out["zeros_in_blocks"] += int((x == 0).sum())
            out["numel_in_blocks"] += x.numel()
    out["identical"] = out["same_names"] and not out["unequal"]
    out["linear_sparsity"] = out.pop("zeros_in_blocks") / max(1, out.pop("numel_in_blocks"))
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def bench(a, layers: int, tag: str = "") -> tuple[dict, dict, dict]:
    """Build the model with ``layers`` blocks, run both CLI runs on it, compare the pruned folders."""
    work = Path(a.workdir)
    dense = work / f"dense{tag}"
    shutil.rmtree(dense, ignore_errors=True)
    t0 = time.perf_counter()
    opts = {k: getattr(a, k) for k in ("hidden", "ffn", "heads", "vocab", "seed", "seqlen", "threads")} | {"layers": layers}
    with open(work / f"build{tag}.log", "w") as log:  # save_pretrained's progress bars
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--out", "-", "--build", str(dense),
                               *[f"--{k}={v}" for k, v in opts.items()]],
                              env=dict(os.environ, OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1"), stdout=log,
                              stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        raise SystemExit(f"building the model failed:\n{(work / f'build{tag}.log').read_text()[-3000:]}")
    info = json.loads((dense / "bench_stream_build.json").read_text())
    info["disk_bytes"] = dir_bytes(dense)
    info["files"] = sorted(f.name for f in dense.glob("*.safetensors"))
    print(f"model ({layers} blocks): {info['params'] / 1e6:.1f} M parameters, {info['disk_bytes'] / 2**20:.0f} MB on "
          f"disk ({', '.join(info['files'])}); one block {info['block_bytes'] / 2**20:.1f} MB, outside the blocks "
          f"{info['outside_blocks_bytes'] / 2**20:.1f} MB; built and saved in {time.perf_counter() - t0:.0f} s", flush=True)
    runs = {"in_memory": run_child(a, f"in_memory{tag}", dense, False),
            "stream": run_child(a, f"stream{tag}", dense, True)}
    weights = compare(Path(runs["in_memory"]["run_dir"]) / "model", Path(runs["stream"]["run_dir"]) / "model")
    return info, runs, weights


def main(a) -> None:
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    info, runs, weights = bench(a, a.layers)
    depth = None
    if a.depth_check:
        d_info, d_runs, d_weights = bench(a, a.depth_check, tag=f"_{a.depth_check}l")
        depth = {"layers": a.depth_check, "disk_bytes": d_info["disk_bytes"], "weights_identical": d_weights["identical"]}
        depth |= {f"peak_rss_mb_{k}": r["peak_rss_mb"] for k, r in d_runs.items()}
        depth |= {f"wall_s_{k}": r["wall_s"] for k, r in d_runs.items()}
        depth |= {f"ppl_pruned_{k}": next(float(p["value"]) for p in r["points"] if p["method"] == "wanda")
                  for k, r in d_runs.items()}

    def ppl(r, method):
        rows = [p for p in r["points"] if p["method"] == method]
        return float(rows[0]["value"]) if rows else float("nan")

    mem, st = runs["in_memory"], runs["stream"]
    summary = {
        "model": {k: info[k] for k in ("params", "weight_bytes", "disk_bytes", "block_bytes", "outside_blocks_bytes",
                                       "files")} | {"config": {k: getattr(a, k) for k in
                                                               ("hidden", "ffn", "layers", "heads", "vocab", "seed")}},
        "setup": {k: getattr(a, k) for k in ("sparsity", "nsamples", "seqlen", "eval_limit", "threads")}
                 | {"method": "wanda", "calibration": "task (WikiText-2, last 10 %, byte-level)",
                    "torch_threads": a.threads, "python": sys.version.split()[0]},
        "runs": {name: {k: r[k] for k in ("peak_rss_mb", "ru_maxrss_mb", "rss_imported_mb", "rss_end_mb", "wall_s")}
                 | {"ppl_dense": ppl(r, "dense"), "ppl_pruned": ppl(r, "wanda"),
                    "stream_column": [p.get("stream") for p in r["points"]]}
                 for name, r in runs.items()},
        "ratio_peak_rss_in_memory_over_stream": mem["peak_rss_mb"] / st["peak_rss_mb"],
        "ratio_peak_above_imports_in_memory_over_stream": (mem["peak_rss_mb"] - mem["rss_imported_mb"])
                                                          / (st["peak_rss_mb"] - st["rss_imported_mb"]),
        "ratio_wall_stream_over_in_memory": st["wall_s"] / mem["wall_s"],
        "weights": weights,
        "points_equal": all(p.get(k) == q.get(k) for p, q in zip(mem["points"], st["points"])
                            for k in ("method", "value", "nll", "eval_tokens", "sparsity", "density", "calib_tokens")),
        "depth_check": depth,
        "timelines": {name: r["timeline"] for name, r in runs.items()},
    }
    mb = 2**20
    print()
    print(f"model on disk                 {info['disk_bytes'] / mb:9.0f} MB  ({info['params'] / 1e6:.1f} M params fp32)")
    print(f"{'':30s}{'in memory':>12s}{'stream':>12s}{'ratio':>10s}")
    for label, key in (("peak RSS (VmHWM) MB", "peak_rss_mb"), ("RSS after imports MB", "rss_imported_mb"),
                       ("wall time s", "wall_s")):
        x, y = mem[key], st[key]
        print(f"{label:30s}{x:12.0f}{y:12.0f}{x / y:10.2f}")
    print(f"{'peak above imports MB':30s}{mem['peak_rss_mb'] - mem['rss_imported_mb']:12.0f}"
          f"{st['peak_rss_mb'] - st['rss_imported_mb']:12.0f}{summary['ratio_peak_above_imports_in_memory_over_stream']:10.2f}")
    for key in ("ppl_dense", "ppl_pruned"):
        print(f"{key:30s}{summary['runs']['in_memory'][key]:12.4f}{summary['runs']['stream'][key]:12.4f}")
    print(f"pruned weights identical: {weights['identical']} ({weights['tensors']} tensors, max |diff| "
          f"{weights['max_abs_diff']:g}, decoder linear sparsity {weights['linear_sparsity']:.4f}); "
          f"points.csv equal: {summary['points_equal']}")
    if depth:
        print(f"same width, {depth['layers']} blocks ({depth['disk_bytes'] / mb:.0f} MB): peak RSS in memory "
              f"{depth['peak_rss_mb_in_memory']:.0f} MB, stream {depth['peak_rss_mb_stream']:.0f} MB; from "
              f"{depth['layers']} to {a.layers} blocks the peak grows by "
              f"{mem['peak_rss_mb'] - depth['peak_rss_mb_in_memory']:.0f} MB in memory, "
              f"{st['peak_rss_mb'] - depth['peak_rss_mb_stream']:.0f} MB streaming "
              f"(the {a.layers - depth['layers']} extra blocks: {(info['block_bytes'] * (a.layers - depth['layers'])) / mb:.0f} MB)")

    if a.out != "-":
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2))
        with open(out.with_suffix(".csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["run", "peak_rss_mb", "ru_maxrss_mb", "rss_imported_mb", "wall_s", "ppl_dense", "ppl_pruned",
                        "disk_mb", "weights_identical", "max_abs_diff"])
            for name, r in summary["runs"].items():
                w.writerow([name, f"{r['peak_rss_mb']:.1f}", f"{r['ru_maxrss_mb']:.1f}", f"{r['rss_imported_mb']:.1f}",
                            f"{r['wall_s']:.1f}", r["ppl_dense"], r["ppl_pruned"], f"{info['disk_bytes'] / mb:.1f}",
                            weights["identical"], weights["max_abs_diff"]])
            if depth:
                for name in ("in_memory", "stream"):
                    w.writerow([f"{name}_{depth['layers']}_blocks", f"{depth[f'peak_rss_mb_{name}']:.1f}", "", "",
                                f"{depth[f'wall_s_{name}']:.1f}", "", depth[f"ppl_pruned_{name}"],
                                f"{depth['disk_bytes'] / mb:.1f}", depth["weights_identical"], ""])
        print(f"written: {out} and {out.with_suffix('.csv')}")
    if not a.keep:
        shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    if "--measure" in sys.argv:  # child: everything after "--" is the CLI's
        i, j = sys.argv.index("--measure"), sys.argv.index("--")
        sample = float(sys.argv[sys.argv.index("--sample-s") + 1]) if "--sample-s" in sys.argv[:j] else 0.5
        sys.path.insert(0, str(ROOT))
        measured(sys.argv[i + 1], sample, sys.argv[j + 1:])
    else:
        parser_argv = sys.argv[1:]
        build_dir = None
        if "--build" in parser_argv:
            k = parser_argv.index("--build")
            build_dir = parser_argv[k + 1]
            parser_argv = parser_argv[:k] + parser_argv[k + 2:]
        args = parse_args(parser_argv)
        args.build = build_dir
        if build_dir:
            sys.path.insert(0, str(ROOT))
            build(args)
        else:
            main(args)
