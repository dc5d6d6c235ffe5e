"""train.trackers: every metric of metrics.jsonl reaches TensorBoard, MLflow and W&B, offline, inside the run directory;
a tracker whose package is missing is one error line before any work."""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest

from conftest import assert_user_error, run_cli, tiny_recipe

TRAIN = {"max_steps": 10, "eval_every": 5, "save_every": 5}


@pytest.fixture(autouse=True)
def offline_defaults(monkeypatch):
    """The defaults under test: no tracking server, experiment name or W&B mode set by the environment."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected(run: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {metric: {step: value}}."""
    out: dict[str, dict[int, float]] = {}
    for row in rows(run):
        for k, v in row.items():
            if k != "step":
                out.setdefault(k, {})[row["step"]] = v
    return out


def mlflow_run(run: Path):
    """(client, the one MLflow run of the run directory's own store)."""
    from mlflow import MlflowClient

    assert (run / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    experiments = client.search_experiments()
    assert [e.name for e in experiments if e.name != "Default"] == [run.name]
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert len(runs) == 1, "a resume continues the run, it does not start another"
    assert runs[0].info.run_id == json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    return client, runs[0]


def train(tmp_path: Path, corpus: Path, trackers: list[str], *args: str, **train) -> Path:
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run", train={**TRAIN, "trackers": trackers, **train})
    code, out, err = run_cli("pretrain", str(recipe), *args)
    assert code == 0, err
    return tmp_path / "run"


def test_mlflow_store_in_the_run_directory_equals_metrics_jsonl(tmp_path, corpus):
    run = train(tmp_path, corpus, ["tensorboard", "mlflow"])
    client, info = mlflow_run(run)
    assert info.info.status == "FINISHED" and info.info.run_name == run.name
    want = expected(run)
    assert set(want) == {"train_loss", "train_lr", "train_tokens_per_s", "val_loss", "val_perplexity"}
    for key, by_step in want.items():
        history = [(m.step, m.value) for m in client.get_metric_history(info.info.run_id, key)]
        assert sorted(history) == sorted(by_step.items()), key  # every step once, the very same float
    params = info.data.params
    assert params["train.max_steps"] == "10" and params["model.n_embd"] == "32" and params["tokenizer.kind"] == "char"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # the default tracker still writes
    assert "MLFLOW_TRACKING_URI" not in os.environ  # nothing leaks into the next run of this process


def test_resume_continues_the_mlflow_run_and_purges_tensorboard(tmp_path, corpus):
    """A run killed after step 10 whose last checkpoint is step 5: metrics.jsonl and TensorBoard keep steps 6-10
    once (the resumed values), MLflow continues the same run and holds them twice (its history is append-only),
    the later entry being metrics.jsonl's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tmp_path, corpus, ["tensorboard", "mlflow"])
    shutil.rmtree(run / "checkpoints" / "step-00000010")
    run = train(tmp_path, corpus, ["tensorboard", "mlflow"], "--resume")
    client, info = mlflow_run(run)
    assert info.info.status == "FINISHED"
    for key, by_step in expected(run).items():
        history = client.get_metric_history(info.info.run_id, key)
        latest = {m.step: m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))}
        assert latest == by_step, key
        assert sorted(m.step for m in history) == sorted([*by_step, *(s for s in by_step if s > 5)]), key
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 11))
    assert [e.step for e in events.Scalars("val/loss")] == [5, 10]


def wandb_records(run: Path) -> tuple[list[dict], dict]:
    """(history rows, config) of the offline W&B run, read from its .wandb file: LevelDB-log records of wandb's
    protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    data, block, off, records, part = path.read_bytes(), 32768, 7, [], b""  # 7: the file header
    while off + 7 <= len(data):
        if block - off % block < 7:  # a block's tail too short for a record header is padding
            off += block - off % block
            continue
        _, length, kind = struct.unpack("<IHB", data[off:off + 7])
        chunk, off = data[off + 7:off + 7 + length], off + 7 + length
        if kind in (1, 4):  # full record, last fragment
            records.append(part + chunk)
            part = b""
        elif kind in (2, 3):  # first, middle fragment
            part += chunk
    history, config = [], {}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        items = record.history.item if kind == "history" else record.config.update if kind == "config" else []
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
        history.append(row) if kind == "history" else config.update(row)
    return history, config


def test_wandb_runs_offline_into_the_run_directory(tmp_path, corpus):
    pytest.importorskip("wandb")
    run = train(tmp_path, corpus, ["wandb"])
    assert not (run / "tensorboard").exists()
    rows_, config = wandb_records(run)
    history = {row["_step"]: row for row in rows_}
    for key, by_step in expected(run).items():
        assert {s: history[s][key] for s in by_step} == by_step, key
    assert config["train"]["max_steps"] == 10 and config["model"]["n_embd"] == 32  # the recipe is the run's config
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]["run_id"]  # what a resume continues
    assert (run / "wandb" / "latest-run").resolve().name.endswith(f"-{run_id}")


@pytest.mark.parametrize("tracker, hidden", [("mlflow", "mlflow"), ("mlflow", "sqlalchemy"), ("wandb", "wandb")])
def test_a_missing_tracker_package_is_one_line_before_any_work(tmp_path, corpus, monkeypatch, tracker, hidden):
    monkeypatch.setitem(sys.modules, hidden, None)  # import fails, as when it is not installed
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run", train={"trackers": ["tensorboard", tracker]})
    needle = f"train.trackers: '{tracker}' needs the {hidden} package: pip install 'gptkit[{tracker}]'"
    for command in ("pretrain", "validate"):
        code, _, err = run_cli(command, str(recipe))
        assert_user_error(code, err, needle)
    assert not (tmp_path / "run").exists()


def test_a_tracking_server_needs_no_database_packages(tmp_path, monkeypatch):
    from gptkit import tracking

    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    tracking.check(["mlflow"], tmp_path)  # the mlflow client alone talks to a server
    assert tracking.destinations(["mlflow", "mlflow"], tmp_path) == ["mlflow (http://mlflow.example:5000)"]


def test_validate_says_where_metrics_go(tmp_path, corpus):
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run", train={"trackers": ["tensorboard", "mlflow"]})
    code, out, err = run_cli("validate", str(recipe))
    assert code == 0, err
    run = tmp_path / "run"
    assert f"trackers: tensorboard ({run / 'tensorboard'}), mlflow (sqlite:///{run / 'mlflow.db'})" in out
    code, out, err = run_cli("validate", str(recipe), "train.trackers=[]")
    assert code == 0 and f"metrics: {run / 'metrics.jsonl'}\n" in out, err


def test_no_trackers_means_metrics_jsonl_only(tmp_path):
    from gptkit.tracking import Tracker

    tracker = Tracker(tmp_path, True, trackers=[])
    tracker.log(1, {"train_loss": 2.5})
    tracker.close()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert rows(tmp_path) == [{"step": 1, "train_loss": 2.5}]


def test_an_unknown_tracker_is_refused_by_the_schema(tmp_path, corpus):
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run", train={"trackers": ["tensorbord"]})
    code, _, err = run_cli("validate", str(recipe))
    assert_user_error(code, err, "train.trackers.0", "'tensorboard', 'mlflow' or 'wandb'", "tensorbord")


def test_mlflow_run_says_how_training_ended(tmp_path, corpus, monkeypatch):
    """A run stopped by a non-finite loss is FAILED in MLflow, not left RUNNING or marked FINISHED."""
    from gptkit import engine

    real = engine.causal_lm_loss
    monkeypatch.setattr(engine, "causal_lm_loss",
                        lambda model, batch: real(model, batch) * (float("nan") if model.training else 1.0))
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run", train={**TRAIN, "trackers": ["mlflow"]})
    code, _, err = run_cli("pretrain", str(recipe))
    assert code == 3, err
    assert mlflow_run(tmp_path / "run")[1].info.status == "FAILED"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("var, value, needle", [("MLFLOW_TRACKING_URI", "bogus://x", "unknown scheme 'bogus'"),
                                                ("MLFLOW_TRACKING_URI", "file:///tmp/x", "MLFLOW_ALLOW_FILE_STORE=true"),
                                                ("WANDB_MODE", "bogus", "not a W&B mode")])
def test_a_bad_tracker_setting_is_one_line_before_any_work(tmp_path, corpus, monkeypatch, var, value, needle):
    """Settings a tracker would refuse only once training started (after --overwrite had deleted the old run)."""
    run = train(tmp_path, corpus, [])
    before = snapshot(run)
    monkeypatch.setenv(var, value)
    tracker = "wandb" if var == "WANDB_MODE" else "mlflow"
    for args in (["validate"], ["pretrain", "--overwrite"]):
        code, _, err = run_cli(args[0], str(tmp_path / "r.yaml"), *args[1:], f"train.trackers=[{tracker}]")
        assert_user_error(code, err, f"{var}: '{value}'", needle)
    assert snapshot(run) == before


def test_a_tracker_that_cannot_start_costs_no_run(tmp_path, corpus, monkeypatch):
    """A tracking server that is down: one line naming MLFLOW_TRACKING_URI, and the run --overwrite was replacing is
    put back whole."""
    from gptkit import tracking

    run = train(tmp_path, corpus, [])
    before = snapshot(run)

    def refused(*args, **kwargs):
        raise ConnectionError("API request to http://127.0.0.1:9/api/2.0/mlflow/experiments/get-by-name failed\nmore")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setattr(tracking, "_start_mlflow", refused)
    code, _, err = run_cli("pretrain", str(tmp_path / "r.yaml"), "--overwrite", "train.trackers=[mlflow]")
    assert_user_error(code, err, "MLFLOW_TRACKING_URI: mlflow cannot start a run in http://127.0.0.1:9",
                      "get-by-name failed")
    assert snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing set aside is left
