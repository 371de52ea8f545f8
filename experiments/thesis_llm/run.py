"""Run an LLM experiment's grid (``experiment=thesis_llm`` by default; ``--experiment structured_llm``: any
experiment config with a ``<name>_grid`` key) in one process (imports paid once), one run directory per cell:
``OUT/<model>/<task>/<setting>/<method label>/seed<k>/points.csv``. Cells already done are skipped, so the
command resumes. The dense model is recorded once per (model, task).

    python experiments/thesis_llm/run.py                                   # the whole grid (~1 h on 2 cores)
    python experiments/thesis_llm/run.py --seeds 0 --tasks wikitext2 piqa  # a reduced grid
    python experiments/thesis_llm/render.py OUT                            # table + plots
    python experiments/thesis_llm/run.py --experiment structured_llm       # the structured methods' grid
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TQDM_DISABLE", "1")  # no per-cell progress lines (weights loading, the harness requests)
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import inferno.config  # noqa: F401  (resolvers)
from inferno.config import CONF_DIR


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("config", overrides=overrides)


def cells(grid, a):
    models = a.models or list(grid.models)
    tasks = a.tasks or list(grid.tasks)
    seeds = a.seeds if a.seeds is not None else list(grid.seeds)
    settings = {k: list(v) for k, v in grid.settings.items() if not a.settings or k in a.settings}
    methods = {k: v for k, v in grid.methods.items() if not a.methods or k in a.methods}
    for model in models:
        for task in tasks:
            limit = grid.perplexity_limit if task in ("wikitext2", "shakespeare") else grid.commonsense_limit
            if a.limit is not None:
                limit = a.limit
            first = True
            for setting, s_over in settings.items():
                for label, m in methods.items():
                    if m.get("unstructured_only") and any("pattern" in o for o in s_over):
                        continue
                    if setting not in m.get("settings", grid.default_settings) or task not in m.get("tasks", [task]):
                        continue
                    for seed in seeds[: m.get("seeds", len(seeds))]:
                        over = [f"model={model}", f"task={task}", *m.overrides, *s_over, f"seed={seed}",
                                f"task.limit={limit}", f"pruner.record_dense={str(first).lower()}"]
                        first = False
                        yield Path(model) / task / setting.replace("%", "pct").replace(":", "-") / label / f"seed{seed}", over


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiment", default="thesis_llm", help="an experiment config with a <name>_grid key")
    p.add_argument("--out", default=None, help="default: outputs/<experiment>")
    p.add_argument("--models", nargs="*")
    p.add_argument("--tasks", nargs="*")
    p.add_argument("--settings", nargs="*", help="e.g. 50%% 70%% 2:4")
    p.add_argument("--methods", nargs="*")
    p.add_argument("--seeds", nargs="*", type=int)
    p.add_argument("--limit", type=int, help="override the per-task evaluation subset size")
    p.add_argument("--max-minutes", type=float, default=None, help="stop starting new cells after this")
    p.add_argument("--wandb", action="store_true", help="log every cell to W&B (offline) in the experiment's group")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every cell")
    a = p.parse_args()
    from inferno.run import run

    grid = compose_cfg([f"experiment={a.experiment}"]).get(f"{a.experiment}_grid")
    if grid is None:
        raise SystemExit(f"--experiment {a.experiment}: conf/experiment/{a.experiment}.yaml has no {a.experiment}_grid key")
    todo = list(cells(grid, a))
    out, t0, done = Path(a.out or ROOT / "outputs" / a.experiment), time.time(), 0
    print(f"{len(todo)} cells -> {out}", flush=True)
    for rel, over in todo:
        run_dir = out / rel
        if (run_dir / "summary.json").is_file():
            continue
        if a.max_minutes and time.time() - t0 > a.max_minutes * 60:
            print(f"stopping: {a.max_minutes} minutes spent ({done} cells run)")
            break
        over = [f"experiment={a.experiment}", *over, *([] if a.wandb else ["logger=none"]), *a.overrides]
        if a.dry_run:
            print(rel, " ".join(over))
            continue
        t = time.time()
        cfg = compose_cfg(over)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "command.txt").write_text("python -m inferno " + " ".join(over) + f" hydra.run.dir={run_dir}\n")
        run(cfg, run_dir)
        done += 1
        print(f"[{time.time() - t0:7.0f}s] {rel}  ({time.time() - t:.1f}s)", flush=True)
    if not a.dry_run:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(grid, out / "grid.yaml")


if __name__ == "__main__":
    main()
