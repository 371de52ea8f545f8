"""Time every structured_llm model side by side in ONE process: prefill latency and decode tokens/s.

Each grid cell measured its own model, in its own process, possibly while another grid process shared the CPU; for
the curves, every pruned architecture of the WikiText-2 cells is rebuilt here from its ``structure.json`` -- the
kept KV heads and neurons of every layer and the removed blocks, applied by the same surgery to the same dense
bench LM (FLAP's compensation biases are added as zero biases: the same shapes and operations) -- and all of them,
with the dense model, are timed in interleaved rounds (median per model), nothing else running.

    python experiments/structured_llm/latency.py outputs/structured_llm [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch

from inferno.cost import decode_tokens_per_s, measure_latency_ms
from inferno.models.hf import load_causal_lm
from inferno.pruning.llm import surgery
from inferno.pruning.llm.runner import get_blocks


def rebuild(dense, structure: dict):
    """The pruned architecture of one run: its per-layer kept units and removed blocks, on a copy of ``dense``."""
    net = copy.deepcopy(dense)
    decisions = {}
    for layer, kept in structure["layers"].items():
        u = surgery.block_units(get_blocks(net)[int(layer)], net.config)
        decisions[int(layer)] = surgery.BlockDecision(
            heads=sorted(set(range(u["kv_heads"])) - set(kept["heads_kept"])),
            neurons=sorted(set(range(u["neurons"])) - set(kept["neurons_kept"])))
    surgery.apply(net, decisions)
    if structure["method"] == "flap":
        for i in decisions:
            c = surgery.coupled(get_blocks(net)[i], net.config)
            for s in c.heads + c.neurons:
                if s.dim == "in":
                    surgery.add_bias(s.module)
    if structure.get("removed_blocks"):
        surgery.remove_blocks(net, structure["removed_blocks"])
    return net.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", nargs="?", default="outputs/structured_llm")
    p.add_argument("--model", default=os.environ.get("INFERNO_BENCH_LM", str(Path.home() / ".cache/inferno/bench_lm")))
    p.add_argument("--task", default="wikitext2", help="whose cells' structures to time (all tasks share them)")
    p.add_argument("--seqlen", type=int, default=128, help="prefill tokens (task.cost_seqlen)")
    p.add_argument("--decode", type=int, default=64, help="new tokens of greedy decoding")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="default: ROOT/latency.json")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    root = Path(a.root)
    dense = load_causal_lm(a.model)
    models = [{"label": "dense", "setting": "dense", "seed": None, "net": dense}]
    for f in sorted(root.glob(f"*/{a.task}/*/*/seed*/structure.json")):
        structure = json.loads(f.read_text())
        rows = (f.parent / "points.csv").read_text().splitlines()
        label = ("nirvana_kl" if "kl_seed" in structure else
                 "flap_nocomp" if structure.get("variant") == "wifv_nocomp" else structure["method"])
        models.append({"label": label, "setting": f"{round(structure['target_sparsity'] * 100)}%",
                       "seed": f.parent.name, "net": rebuild(dense, structure), "cell": str(f.parent), "rows": len(rows)})
    ids = torch.randint(3, dense.config.vocab_size, (1, a.seqlen), generator=torch.Generator().manual_seed(0))
    times = {i: [] for i in range(len(models))}
    decode = {i: [] for i in range(len(models))}
    for r in range(a.rounds):  # interleaved: every model once per round, so drift hits all alike
        for i, m in enumerate(models):
            times[i].append(measure_latency_ms(m["net"], {"input_ids": ids}, warmup=2, repeats=5))
            if r < 2:
                decode[i].append(decode_tokens_per_s(m["net"], ids, new_tokens=a.decode, repeats=1))
        print(f"round {r + 1}/{a.rounds} done", flush=True)
    out = {"threads": torch.get_num_threads(), "seqlen": a.seqlen, "decode_tokens": a.decode, "rounds": a.rounds,
           "torch": torch.__version__, "models": []}
    for i, m in enumerate(models):
        entry = {k: v for k, v in m.items() if k not in ("net", "rows")}
        entry |= {"params": sum(q.numel() for q in m["net"].parameters()),
                  "latency_ms": statistics.median(times[i]), "decode_tok_s": statistics.median(decode[i])}
        out["models"].append(entry)
        print(f"{m['label']:>12} {m['setting']:>6} {m['seed'] or '':>6}  {entry['params']:>9,d} params  "
              f"{entry['latency_ms']:8.2f} ms  {entry['decode_tok_s']:8.1f} tok/s")
    path = Path(a.out) if a.out else root / "latency.json"
    path.write_text(json.dumps(out, indent=2))
    print("wrote", path)


if __name__ == "__main__":
    main()
