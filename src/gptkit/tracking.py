"""Run bookkeeping (main process only): metrics.jsonl, the experiment trackers, the end-of-run loss/LR plot.

``metrics.jsonl`` is the source of truth and is always written. ``train.trackers`` mirrors every logged
row, at the same step with the same values, into:

- ``tensorboard``: ``RUN/tensorboard`` (Accelerate's ``TensorBoardTracker``; tags ``train/loss``, ``val/loss``...).
- ``mlflow``: the run's own store ``sqlite:///RUN/mlflow.db`` (artifacts in ``RUN/mlartifacts``), experiment =
  the run directory's name, unless ``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_NAME`` say otherwise. Not the
  ``file://`` store: MLflow 3 refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true`` ("maintenance mode"), and
  sqlite is its own local default now. Keys are metrics.jsonl's (``train_loss``...).
- ``wandb``: ``RUN/wandb``, offline unless ``WANDB_MODE`` is set (``wandb sync`` uploads it later); project
  ``$WANDB_PROJECT`` or ``gptkit``, run name = the run directory's name. Keys are metrics.jsonl's.

The recipe (``RUN/recipe.yaml``; flattened to ``train.lr``... for MLflow) is sent as the run's parameters to
mlflow and wandb when a run starts. A resume continues the same mlflow/wandb run (ids kept in ``RUN/trackers.json``);
TensorBoard drops events after the resume step (``purge_step``), and metrics.jsonl its lines after it. MLflow's
and W&B's histories are append-only: steps a killed run logged after its last checkpoint appear twice in
MLflow (the resumed run logs them again) and W&B keeps the first values (it ignores steps that go back).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import uuid
from pathlib import Path

from gptkit.errors import UserError

log = logging.getLogger(__name__)

IDS_FILE = "trackers.json"  # mlflow run id / wandb run id, so that a resume continues the same run
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores need sqlalchemy + alembic


def mlflow_uri(run_dir: Path) -> str:
    """Where MLflow logs: ``$MLFLOW_TRACKING_URI`` when set, else a sqlite store inside the run directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"


def destinations(names: list[str], run_dir: Path) -> list[str]:
    """One ``name (where)`` per tracker, for ``gptkit validate``."""
    where = {"tensorboard": str(run_dir / "tensorboard"), "mlflow": mlflow_uri(run_dir),
             "wandb": f"{run_dir / 'wandb'}, {os.environ.get('WANDB_MODE', 'offline')}"}
    return [f"{n} ({where[n]})" for n in dict.fromkeys(names)]


_MLFLOW_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc", *_DB_SCHEMES)  # and file (see below)
_WANDB_MODES = ("offline", "online", "disabled", "shared", "dryrun", "run")


def check(names: list[str], run_dir: Path) -> None:
    """Refuse, in one line and before any work, a tracker whose package is not installed or whose environment
    (``MLFLOW_TRACKING_URI``, ``WANDB_MODE``) it would refuse only once training has started."""
    for name in dict.fromkeys(names):
        needs = {"tensorboard": ["tensorboard"], "mlflow": ["mlflow"], "wandb": ["wandb"]}[name]
        if name == "mlflow" and mlflow_uri(run_dir).split(":", 1)[0].split("+", 1)[0] in _DB_SCHEMES:
            needs += ["sqlalchemy", "alembic"]
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if missing:
            pkgs = ", ".join(missing) + (" packages" if len(missing) > 1 else " package")
            fix = "pip install tensorboard" if name == "tensorboard" else f"pip install 'gptkit[{name}]'"
            raise UserError(f"train.trackers: '{name}' needs the {pkgs}: {fix}")
        _check_env(name)


def _check_env(name: str) -> None:
    """What can be told without contacting a server: the tracking URI's scheme, the W&B mode."""
    if name == "wandb" and (os.environ.get("WANDB_MODE") or "offline") not in _WANDB_MODES:
        raise UserError(f"WANDB_MODE: '{os.environ['WANDB_MODE']}' is not a W&B mode; expected one of "
                        + ", ".join(_WANDB_MODES))
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if name != "mlflow" or not uri or uri in ("databricks", "databricks-uc", "uc"):
        return
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else uri.split(":", 1)[0] if ":" in uri else ""
    if scheme in ("", "file"):  # a path is the file store too
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
            raise UserError(f"MLFLOW_TRACKING_URI: '{uri}' is MLflow's file store, which MLflow 3 refuses unless "
                            "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///PATH/mlflow.db, or unset it for the run's own store")
        return
    if scheme not in _MLFLOW_SCHEMES and scheme not in _mlflow_plugins():
        raise UserError(f"MLFLOW_TRACKING_URI: '{uri}' has an unknown scheme '{scheme}'; expected http(s)://, "
                        "sqlite:///, postgresql://, mysql://, mssql://, databricks or a file path")


def _mlflow_plugins() -> set[str]:
    """URI schemes that installed MLflow plugins add."""
    from importlib.metadata import entry_points

    return {ep.name for ep in entry_points(group="mlflow.tracking_store")}


def _start_failed(name: str, run_dir: Path, e: Exception) -> UserError:
    """A tracker that cannot start is a setting to fix (a server down, a bad URI), named in one line."""
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if name == "mlflow":
        var = "MLFLOW_TRACKING_URI" if "MLFLOW_TRACKING_URI" in os.environ else "train.trackers"
        return UserError(f"{var}: mlflow cannot start a run in {mlflow_uri(run_dir)} ({detail})")
    return UserError(f"train.trackers: {name} cannot start ({detail}); check WANDB_MODE "
                     f"({os.environ.get('WANDB_MODE', 'offline')}) and WANDB_PROJECT")


def _flat(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _recipe(run_dir: Path) -> dict:
    """The run's recipe, as written to the run directory (the hyperparameters a tracker records)."""
    import yaml

    path = run_dir / "recipe.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


class MLflowRunTracker:
    """One MLflow run, through an ``MlflowClient`` bound to its store, with the interface of Accelerate's trackers
    (``store_init_configuration``, ``log``, ``finish``). Accelerate's own ``MLflowTracker`` drives MLflow's
    process-global fluent API: pointing it at the run directory takes ``mlflow.set_tracking_uri``, which also
    exports ``MLFLOW_TRACKING_URI``, so a second run in the same process would log into the first one's store."""

    name = "mlflow"

    def __init__(self, run_dir: Path, run_id: str | None = None):
        from mlflow import MlflowClient

        if "MLFLOW_LOGGING_LEVEL" not in os.environ:  # "Creating initial MLflow database tables..."
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        own = "MLFLOW_TRACKING_URI" not in os.environ
        self.uri = mlflow_uri(run_dir)
        self.client = MlflowClient(self.uri)
        self.resumed = False
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
                self.run_id, self.resumed = run_id, True
                return
            except Exception as e:  # deleted from the store meanwhile: a new run
                log.warning("mlflow: cannot continue run %s in %s (%s); starting a new run", run_id, self.uri, e)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or run_dir.name
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            name, artifact_location=(run_dir.resolve() / "mlartifacts").as_uri() if own else None)
        tags = {"gptkit.run_dir": str(run_dir.resolve())}
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.name, tags=tags).info.run_id

    def store_init_configuration(self, values: dict) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        params = [Param(k, str(v)) for k, v in values.items() if len(str(v)) <= MAX_PARAM_VAL_LENGTH]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def log(self, values: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in values.items()])

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _start_mlflow(run_dir: Path, saved: dict, config: dict | None) -> tuple[MLflowRunTracker, dict]:
    same_store = saved.get("tracking_uri") == mlflow_uri(run_dir)
    tracker = MLflowRunTracker(run_dir, saved.get("run_id") if same_store else None)
    if config and not tracker.resumed:  # a resumed run has its parameters already, and MLflow refuses to change one
        tracker.store_init_configuration(_flat(config))  # train.lr: 0.001
    return tracker, {"run_id": tracker.run_id, "tracking_uri": tracker.uri}


def _start_wandb(run_dir: Path, saved: dict, config: dict | None) -> tuple[object, dict]:
    from accelerate.tracking import WandBTracker

    run_id = saved.get("run_id") or uuid.uuid4().hex[:8]  # chosen here so that a resume can name it
    tracker = WandBTracker(os.environ.get("WANDB_PROJECT") or "gptkit", name=run_dir.name, id=run_id, resume="allow",
                           dir=str(run_dir), mode=os.environ.get("WANDB_MODE") or "offline")
    tracker.start()
    if config:
        tracker.store_init_configuration(config)
    return tracker, {"run_id": run_id}


class Tracker:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors it to ``trackers``."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None,
                 trackers: list[str] | tuple[str, ...] = ("tensorboard",), config: dict | None = None):
        """``config``: the hyperparameters sent to mlflow and wandb (nested; default: ``run_dir/recipe.yaml``)."""
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._backends: dict[str, object] = {}
        if not enabled:
            return
        names = list(dict.fromkeys(trackers))
        check(names, run_dir)
        if resume_step is not None:
            self._truncate_after(resume_step)
        ids_path = run_dir / IDS_FILE
        ids = json.loads(ids_path.read_text()) if resume_step is not None and ids_path.is_file() else {}
        if config is None and any(n != "tensorboard" for n in names):
            config = _recipe(run_dir)
        try:
            self._start(names, run_dir, resume_step, ids, config)
        except BaseException:
            self.close("FAILED")  # those that started
            raise
        if len(ids):
            ids_path.write_text(json.dumps(ids, indent=1) + "\n")

    def _start(self, names: list[str], run_dir: Path, resume_step: int | None, ids: dict, config: dict | None) -> None:
        for name in names:
            if name == "tensorboard":
                from accelerate.tracking import TensorBoardTracker

                # purge_step: TensorBoard drops the events a killed run wrote at steps >= it, i.e. after the step
                # resumed from (Accelerate's tracker hands the keyword on to SummaryWriter)
                purge = resume_step + 1 if resume_step is not None else None
                tb = TensorBoardTracker("tensorboard", run_dir, purge_step=purge)
                tb.start()
                self._backends[name] = tb
            else:
                start = _start_mlflow if name == "mlflow" else _start_wandb
                try:
                    self._backends[name], ids[name] = start(run_dir, ids.get(name, {}), config)
                except Exception as e:
                    raise _start_failed(name, run_dir, e) from None

    def _truncate_after(self, step: int) -> None:
        """Drop lines a killed run logged after the checkpoint we resume from."""
        if not self.path.exists():
            return
        keep = [row for row in read_metrics(self.path) if row["step"] <= step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in keep))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, backend in list(self._backends.items()):
            # TensorBoard keeps its section/name tags (train/loss); the others take metrics.jsonl's keys
            values = {k.replace("_", "/", 1): v for k, v in metrics.items()} if name == "tensorboard" else metrics
            try:
                backend.log(values, step=step)
            except Exception as e:  # a tracker (a remote server, a full disk) never stops training
                log.warning("%s: logging failed (%s); it gets no more metrics, metrics.jsonl still does", name, e)
                del self._backends[name]

    def close(self, status: str = "FINISHED") -> None:
        """``status``: how training ended (FINISHED, KILLED by a signal, FAILED), for the trackers that record it."""
        for name, backend in self._backends.items():
            try:
                backend.finish(status) if isinstance(backend, MLflowRunTracker) else backend.finish()
            except Exception as e:
                log.warning("%s: closing failed (%s)", name, e)
        self._backends = {}


def read_metrics(path: Path) -> list[dict]:
    """The rows of ``metrics.jsonl``. A torn last line (a kill, or a full disk, mid-write: exactly what --resume is
    for) is dropped, as the checkpoint resumed from is older; a bad line before it is the user's to look at."""
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            if n == len(lines):
                log.warning("%s: dropping its torn last line %d", path, n)
                break
            raise UserError(f"{path}: line {n} is not a metrics row (JSON with a step); remove or repair it")
        rows.append(row)
    return rows


def plot(run_dir: Path) -> Path | None:
    """``loss.png``: train and validation loss (left) and learning rate (right) against step. Best effort: it runs
    after the model is saved, and a failure to write it (a full disk) is a warning."""
    try:
        return _plot(run_dir)
    except OSError as e:
        log.warning("loss.png not written (%s); metrics.jsonl holds the same figures", e.strerror or e)
        return None


def _plot(run_dir: Path) -> Path | None:
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        return None
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, and half a second less to import

    fig = Figure(figsize=(10, 4))
    ax_loss, ax_lr = fig.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax_loss.plot(*zip(*pts), label=label, marker="o" if key == "val_loss" else None, markersize=3)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    lr = [(r["step"], r["train_lr"]) for r in rows if "train_lr" in r]
    if lr:
        ax_lr.plot(*zip(*lr))
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=100)
    return out
