"""Local experiment tracking: MLflow (SQLite store read back through the MLflow client), TensorBoard (event files
read back), several loggers at once, per-child training curves (also from worker processes), and the
classification accuracy through torchmetrics."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from inferno.run import build_loggers, run
from inferno.tracking import read_points
from inferno.training import Trainers

FAST = ["hardware.limit_batches=2", "hardware.num_threads=1", "hardware.progress_bar=false", "hardware.latency_repeats=1",
        "hardware.latency_batch_size=8"]
# a tiny greedy search (see tests/test_sweeps.py GREEDY): two epochs per child, so every curve has two values
GREEDY = ["task=digits", "model=microcnn", "model.stages=2", "model.depth=1", "model.base_channels=8",
          "train.dense_epochs=1", "pruner=greedy_layerwise", "pruner.moves=[drop_block,narrow]", "pruner.budget.macs=0.6",
          "pruner.finetune_epochs=2", "pruner.final_epochs=1", "pruner.scratch_epochs=1", *FAST]


def mlflow_overrides(tmp_path):
    return [f"logger.mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"logger.mlflow.artifact_location={tmp_path}/art"]


def mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("inferno")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_mlflow_tensorboard_and_csv_at_once(compose_cfg, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    cfg = compose_cfg("experiment=smoke", "logger=[csv,mlflow,tensorboard]", *FAST, *mlflow_overrides(tmp_path))
    run(cfg, tmp_path / "run")
    rows = read_points(tmp_path / "run" / "points.csv")
    assert [r["method"] for r in rows] == ["dense", "uniform"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["curves"]) == {"dense/step0", "uniform/fit1"}  # dense training, the child's fine-tuning
    assert all(len(v) == 1 for c in summary["curves"].values() for v in c.values())  # one epoch each

    # MLflow: the run, every point's metrics at step = point index, the config as params, the files as artifacts
    client, r = mlflow_run(tmp_path)
    assert r.info.status == "FINISHED" and r.data.params["pruner/name"] == "uniform"
    for i, row in enumerate(rows):
        for col in ("value", "macs", "train_samples", "latency_ms"):
            hist = client.get_metric_history(r.info.run_id, f"{row['method']}/{col}")
            assert [(m.step, m.value) for m in hist] == [(i, pytest.approx(float(row[col]), rel=1e-6))]
    for name, c in summary["curves"].items():
        for series, values in c.items():
            hist = client.get_metric_history(r.info.run_id, f"curves/{name}/{series}")
            assert [(m.step, m.value) for m in hist] == [(e, pytest.approx(v, rel=1e-6)) for e, v in enumerate(values)]
    assert {a.path for a in client.list_artifacts(r.info.run_id)} == {"summary.json", "curve.png", "points.csv"}
    got = client.download_artifacts(r.info.run_id, "summary.json", str(tmp_path / "dl"))
    assert json.loads(Path(got).read_text())["best"] == summary["best"]

    # TensorBoard: the same scalars, the curve as an image, the summary as text
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = event_accumulator.EventAccumulator(str(events[0]), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    for i, row in enumerate(rows):
        assert [(e.step, e.value) for e in acc.Scalars(f"{row['method']}/value")] == [(i, pytest.approx(float(row["value"]), rel=1e-6))]
    assert [e.value for e in acc.Scalars("curves/dense/step0/train_loss")] == pytest.approx(summary["curves"]["dense/step0"]["train_loss"])
    image = acc.Images("curve")[0]
    assert image.width > 300 and image.height > 200
    assert "best" in acc.Tensors("summary/text_summary")[0].tensor_proto.string_val[0].decode()

    # CSV: the points' metrics
    metrics = list((tmp_path / "run" / "lightning_csv").rglob("metrics.csv"))
    assert metrics and "uniform/value" in metrics[0].read_text()


def test_two_loggers_build_from_a_list(compose_cfg, tmp_path):
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger

    cfg = compose_cfg("logger=[csv,mlflow]", *mlflow_overrides(tmp_path))
    assert list(cfg.logger) == ["csv", "mlflow"]
    loggers = build_loggers(cfg, tmp_path)
    assert [type(lg) for lg in loggers] == [CSVLogger, MLFlowLogger]
    assert build_loggers(compose_cfg("logger=none"), tmp_path) == []


def test_greedy_child_curves_in_mlflow_and_from_workers(compose_cfg, tmp_path):
    cfg = compose_cfg(*GREEDY, "logger=mlflow", *mlflow_overrides(tmp_path), f"paths.state_dir={tmp_path}/state1")
    run(cfg, tmp_path / "one")
    curves = json.loads((tmp_path / "one" / "summary.json").read_text())["curves"]
    children = {k: v for k, v in curves.items() if "/child" in k}
    assert "greedy_layerwise/step1/child0" in children and len(children) >= 2
    for c in children.values():  # train loss and accuracy, one value per epoch
        assert set(c) >= {"train_loss", "train_accuracy"} and len(c["train_loss"]) == len(c["train_accuracy"]) == 2
    client, r = mlflow_run(tmp_path)
    for name, c in children.items():
        for series in ("train_loss", "train_accuracy"):
            hist = client.get_metric_history(r.info.run_id, f"curves/{name}/{series}")
            assert [(m.step, m.value) for m in hist] == [(e, pytest.approx(v, rel=1e-6)) for e, v in enumerate(c[series])]
    # the same search with its children trained in two worker processes: the same curves come back
    cfg = compose_cfg(*GREEDY, "logger=none", "pruner.parallel_children=2", f"paths.state_dir={tmp_path}/state2")
    run(cfg, tmp_path / "two")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["curves"] == curves


class _Loaders:
    def __init__(self, loader):
        self.loader = loader

    def test_dataloader(self):
        return self.loader

    def val_dataloader(self):
        return self.loader


def test_accuracy_through_torchmetrics_equals_a_count():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x, y = torch.randn(103, 3, 4), torch.randint(0, 5, (103,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # a short last batch: the mean is weighted by examples
    with torch.no_grad():
        want = (net(x).argmax(-1) == y).sum().item() / len(y)
    trainers = Trainers(progress_bar=False)
    assert trainers.evaluate(net, _Loaders(loader), "test") == pytest.approx(want, abs=1e-6)
    assert trainers.evaluate(net, _Loaders(loader), "val") == pytest.approx(want, abs=1e-6)


STORE_JOB = """
import sys
from pathlib import Path
from omegaconf import OmegaConf
from inferno.run import build_loggers
root = Path(sys.argv[1])
cfg = OmegaConf.create({"logger": {"mlflow": {"_target_": "lightning.pytorch.loggers.MLFlowLogger",
    "experiment_name": "inferno", "tracking_uri": f"sqlite:///{root}/mlflow.db",
    "artifact_location": f"{root}/mlartifacts", "run_name": sys.argv[2]}}})
logger = build_loggers(cfg, root / sys.argv[2])[0]
logger.log_metrics({"value": float(sys.argv[2])}, step=0)
logger.finalize("success")
"""


def test_parallel_sweep_jobs_share_one_new_mlflow_store(tmp_path):
    # the jobs of a parallel sweep (joblib, submitit) create one new SQLite store at once: without the lock in
    # build_loggers, alembic's migrations collide and jobs die ("Online migration expected to match one row")
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    procs = [subprocess.Popen([sys.executable, "-c", STORE_JOB, str(tmp_path), str(i)], stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}) for i in range(2)]
    errs = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("inferno").experiment_id])
    assert sorted(r.data.metrics["value"] for r in runs) == [0.0, 1.0]
