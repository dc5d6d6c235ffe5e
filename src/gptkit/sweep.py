"""`gptkit sweep RECIPE --space SPACE.yaml`: hyperparameter search with Optuna (extra ``gptkit[sweep]``).

Every trial is an ordinary gptkit run in ``SWEEP/trial-NNN/``, started as a subprocess with the trial's values
as recipe overrides: a crashing trial is recorded as failed and the sweep goes on. While a trial runs, its
``metrics.jsonl`` is read as it grows and each new value of the objective is reported to the pruner, which may
stop the trial (SIGTERM: it checkpoints and exits). The study lives in ``SWEEP/study.db`` (SQLite) unless
``--storage`` names another database (several machines can then work on one study): ``--resume`` continues
it, finished trials are not rerun, and a trial the killed sweep left running is retried with the same values (a
field keeps its kind of distribution and its choices; bounds, trials and the other settings may change).
The objective of a trial is the best value of the metric over its evaluations.

The space file::

    metric: val_loss             # default: the task's own (val_loss for pretraining)
    direction: minimize          # default: minimize for loss/perplexity, maximize otherwise
    sampler: tpe                 # tpe | random | grid
    pruner: median               # median | halving | none
    trials: 20
    jobs: 1                      # trials run at once
    seed: 0
    train.lr: {log_uniform: [5.0e-4, 5.0e-3]}  # every value must pass the recipe's checks (lr >= train.min_lr)
    model.n_layer: {choice: [2, 4, 6]}
    train.batch_size: {int: [8, 32], step: 8}
    model.dropout: {uniform: [0.0, 0.2]}   # an integer field (train.warmup_steps) takes int, not uniform

Bounds are finite numbers (int: integers); ``step`` (optional) is a positive integer for int, a positive number for
uniform, and is refused on log_uniform and choice; ``seed`` is an integer, ``metric`` a name. A bad value stops the
sweep in one line naming the space file and key, before anything is written to the sweep folder. A trial that fails
with a user error (exit 2) is recorded and the sweep goes on (the error may belong to its values), unless an earlier
trial failed with the same line: then every trial would, and the sweep stops with it. A sweep in which no trial
finished exits non-zero (2 when every trial failed with a user error).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gptkit.errors import UserError

log = logging.getLogger(__name__)
SETTINGS = {"metric", "direction", "sampler", "pruner", "trials", "jobs", "seed"}
DISTRIBUTIONS = {"log_uniform", "uniform", "int", "choice"}
STUDY = "gptkit-sweep"
MARKER = "sweep.json"  # in --out: this folder holds a sweep (its storage, its recipe)


@dataclass
class Space:
    params: dict[str, dict]
    metric: str | None = None
    direction: str | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    trials: int = 10
    jobs: int = 1
    seed: int = 0
    source: str = ""
    extra: dict = field(default_factory=dict)


def read_space(path: Path) -> Space:
    """The space file, checked in one line per problem: settings, distributions and their bounds."""
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"--space: cannot read {path} ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UserError(f"--space: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"--space: {path}: expected a mapping of recipe fields to distributions")
    settings = {k: raw.pop(k) for k in list(raw) if k in SETTINGS}
    params = raw.pop("params", None) or {}
    if not isinstance(params, dict):
        raise UserError(f"{where}: params: expected a mapping of recipe fields to distributions, got {params!r}")
    raw = {**params, **raw}
    if not raw:
        raise UserError(f"--space: {path} names no recipe field to search (e.g. train.lr: {{log_uniform: [5e-4, 5e-3]}})")
    for name, dist in raw.items():
        _check_distribution(where, str(name), dist)
    space = Space(params={str(k): v for k, v in raw.items()}, source=where, **settings)
    choices = {"direction": (None, "minimize", "maximize"), "sampler": ("tpe", "random", "grid"),
               "pruner": ("median", "halving", "none")}
    for key, allowed in choices.items():
        if getattr(space, key) not in allowed:
            raise UserError(f"{where}: {key}: expected one of {', '.join(a for a in allowed if a)}, got "
                            f"{getattr(space, key)!r}")
    for key in ("trials", "jobs"):
        value = getattr(space, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{where}: {key}: expected a positive integer, got {value!r}")
    if not isinstance(space.seed, int) or isinstance(space.seed, bool) or not 0 <= space.seed < 2**32:
        raise UserError(f"{where}: seed: expected an integer from 0 to 2**32 - 1, got {space.seed!r}")
    if space.metric is not None and not (isinstance(space.metric, str) and space.metric.strip()):
        raise UserError(f"{where}: metric: expected the name of a logged metric such as val_loss, got "
                        f"{space.metric!r}")
    if space.sampler == "grid":
        bad = [k for k, d in space.params.items() if "choice" not in d and "int" not in d]
        if bad:
            raise UserError(f"{where}: {bad[0]}: sampler grid needs choice or int distributions")
    return space


def _check_distribution(where: str, name: str, dist: Any) -> None:
    if "." not in name:
        raise UserError(f"{where}: '{name}': expected a dotted recipe field such as train.lr")
    if not isinstance(dist, dict) or len(set(dist) & DISTRIBUTIONS) != 1 or set(dist) - DISTRIBUTIONS - {"step"}:
        raise UserError(f"{where}: {name}: expected one of {{log_uniform: [lo, hi]}}, {{uniform: [lo, hi]}}, "
                        f"{{int: [lo, hi], step: n}}, {{choice: [...]}}; got {dist!r}")
    kind = next(iter(set(dist) & DISTRIBUTIONS))
    value = dist[kind]
    if "step" in dist and kind not in ("int", "uniform"):
        raise UserError(f"{where}: {name}: step: {kind} takes no step (int and uniform do)")
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise UserError(f"{where}: {name}: choice needs a non-empty list")
        return
    if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)):
        raise UserError(f"{where}: {name}: {kind} needs [low, high] with low < high, got {value!r}")
    if not all(_finite(v) for v in value):
        raise UserError(f"{where}: {name}: {kind} needs finite bounds, got {value!r}")
    if not value[0] < value[1]:
        raise UserError(f"{where}: {name}: {kind} needs [low, high] with low < high, got {value!r}")
    if kind == "log_uniform" and value[0] <= 0:
        raise UserError(f"{where}: {name}: log_uniform needs a positive low bound, got {value[0]}")
    if kind == "int" and not all(isinstance(v, int) for v in value):
        raise UserError(f"{where}: {name}: int needs integer bounds, got {value!r}")
    if "step" in dist:
        step = dist["step"]
        if kind == "int" and not (isinstance(step, int) and not isinstance(step, bool) and step > 0):
            raise UserError(f"{where}: {name}: step: int needs a positive integer step, got {step!r}")
        if kind == "uniform" and not (_is_number(step) and _finite(step) and step > 0):
            raise UserError(f"{where}: {name}: step: uniform needs a positive number as step, got {step!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: float) -> bool:
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an integer beyond a float's range
        return False


def _suggest(trial, name: str, dist: dict):
    kind = next(iter(set(dist) & DISTRIBUTIONS))
    value = dist[kind]
    if kind == "choice":
        return trial.suggest_categorical(name, value)
    if kind == "int":
        return trial.suggest_int(name, value[0], value[1], step=dist.get("step", 1))
    return trial.suggest_float(name, float(value[0]), float(value[1]), log=kind == "log_uniform",
                               step=float(dist["step"]) if "step" in dist else None)


def _override(name: str, value) -> str:
    """name=value as the override parser (YAML) reads it back: text quoted, None as null (not the text 'None'), a
    float with a dot in its mantissa (YAML reads 1e-05 as text, 1.0e-05 as a number)."""
    if isinstance(value, str) or value is None:
        return f"{name}={json.dumps(value)}"
    text = repr(value)
    if isinstance(value, float) and "e" in text and "." not in text:
        text = text.replace("e", ".0e")
    return f"{name}={text}"


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("gptkit sweep needs the optuna package: pip install 'gptkit[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # its failed-trial warning carries a traceback; ours is a line
    return optuna


def _objective_name(recipe, space: Space) -> tuple[str, str]:
    """The metric and its direction; by default the ones the run picks its best checkpoint by (finetune.metric or
    the task's, in the direction finetune.metric_higher_is_better gives when set: val_ter is lower-is-better)."""
    from gptkit import tasks

    selected = None if recipe.task == "pretrain" else recipe.finetune.metric or tasks.load(recipe.task).METRIC
    metric = space.metric or selected or "val_loss"
    if space.direction:
        return metric, space.direction
    if metric == selected and recipe.finetune.metric_higher_is_better is not None:
        return metric, "maximize" if recipe.finetune.metric_higher_is_better else "minimize"
    return metric, "minimize" if metric in ("val_loss", "val_perplexity") else "maximize"


@dataclass
class Sweep:
    recipe_path: Path
    overrides: list[str]
    space: Space
    out: Path
    storage: str
    metric: str
    direction: str
    command: str
    poll: float = 1.0
    user_errors: dict[str, int] = field(default_factory=dict)  # a trial's user-error line -> the first trial it ended

    def check_params(self) -> None:
        """Every field the space names is a recipe field that takes the values it may be given, before any trial."""
        from gptkit.recipe import is_int_field, load_recipe

        for name, dist in self.space.params.items():
            kind = next(iter(set(dist) & DISTRIBUTIONS))
            if kind in ("uniform", "log_uniform") and is_int_field(name):  # its bounds pass, every draw between fails
                lo, hi = dist[kind]
                raise UserError(f"{self.space.source}: {name}: an integer field; {kind} draws fractional values, use "
                                f"{{int: [{math.ceil(lo)}, {math.floor(hi)}]}}")
            samples = dist[kind] if kind in ("choice", "int", "uniform", "log_uniform") else []
            for value in samples:
                value = int(value) if kind == "int" else value
                try:
                    load_recipe(self.recipe_path, [*self.overrides, _override(name, value)])
                except UserError as e:
                    raise UserError(f"{self.space.source}: {name}: {str(e).split(': ', 2)[-1]}") from None

    def objective(self, trial) -> float:
        optuna = sys.modules["optuna"]
        values = {name: _suggest(trial, name, dist) for name, dist in self.space.params.items()}
        run = self.out / f"trial-{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run))
        trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
        args = [*self.overrides, *(_override(k, v) for k, v in values.items()), f"output.dir={run}"]
        cmd = [sys.executable, "-m", "gptkit", self.command, str(self.recipe_path), *args, "--overwrite"]
        log_path = self.out / f"trial-{trial.number:03d}.log"
        started = time.monotonic()
        with open(log_path, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                best, pruned = self._follow(trial, proc, run)
            except KeyboardInterrupt:  # Ctrl-C: Optuna fails the trial; --resume runs it again with the same values
                trial.set_user_attr("interrupted", True)
                trial.set_user_attr("retry", True)
                proc.wait()  # (the run got the signal too: it writes a checkpoint and stops)
                raise
        trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
        if pruned:
            raise optuna.TrialPruned()
        if proc.returncode in (130, 143, -signal.SIGINT, -signal.SIGTERM):  # the run was stopped by a signal that
            # did not reach the sweep (a sweep started where SIGINT is ignored: `cmd &` in a script): stop as Ctrl-C
            trial.set_user_attr("interrupted", True)
            trial.set_user_attr("retry", True)
            raise KeyboardInterrupt
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            trial.set_user_attr("error", tail[0][:300])
            trial.set_user_attr("exit", proc.returncode)
            log.warning("sweep: trial %d failed (exit %d): %s (%s)", trial.number, proc.returncode, tail[0][:200],
                        log_path)
            if proc.returncode == 2:  # a user error: the same line from trials with other values repeats in all
                line = tail[0].removeprefix("error: ")
                earlier = self.user_errors.setdefault(line, trial.number)
                if earlier != trial.number:
                    raise UserError(f"trials {earlier} and {trial.number} failed alike, so every trial would "
                                    f"({log_path}): {line}")
            raise RuntimeError(f"trial {trial.number} exited with {proc.returncode}: {tail[0][:200]}")
        if best is None:  # a misnamed objective: every trial would fail the same way, so the sweep stops here
            logged = sorted({k for row in _rows(run / "metrics.jsonl") for k in row if k.startswith("val_")})
            raise UserError(f"{self.space.source}: metric: '{self.metric}' was not logged by trial {trial.number}; "
                            f"its validation metrics are {', '.join(logged) or 'none (is train.eval_every set?)'}")
        return best


    def _follow(self, trial, proc, run: Path) -> tuple[float | None, bool]:
        """Report each new value of the metric as the run logs it, until the run ends or the pruner stops it:
        (the best value, whether it was pruned)."""
        seen, best = 0, None
        while True:
            done = proc.poll() is not None
            rows = _rows(run / "metrics.jsonl")
            for row in rows[seen:]:
                if self.metric in row:
                    value = float(row[self.metric])
                    best = value if best is None else (min if self.direction == "minimize" else max)(best, value)
                    trial.report(value, row["step"])
                    if not done and trial.should_prune():
                        proc.send_signal(signal.SIGTERM)
                        proc.wait()
                        return best, True
            seen = len(rows)
            if done:
                return best, False
            time.sleep(self.poll)


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            break
    return out


def _sampler(optuna, space: Space, trials: int = 0, worker: str = ""):
    """The space's sampler, seeded by its seed, the number of ``trials`` the study holds already and the ``worker``
    (a shared study's process): a continued study, or a second worker, draws new values, not the first ones again
    (a seeded sampler's draws do not depend on the trials stored; the first of TPE's are random ones)."""
    seed = space.seed
    if seed is not None and (trials or worker):
        seed = int.from_bytes(hashlib.sha256(f"{seed}-{trials}-{worker}".encode()).digest()[:4], "little")
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if space.sampler == "grid":
        return optuna.samplers.GridSampler(_grid(space), seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _grid(space: Space) -> dict[str, list]:
    grid = {}
    for name, dist in space.params.items():
        if "choice" in dist:
            grid[name] = dist["choice"]
        else:
            lo, hi = dist["int"]
            grid[name] = list(range(lo, hi + 1, dist.get("step", 1)))
    return grid


def _pruner(optuna, space: Space):
    if space.pruner == "none":
        return optuna.pruners.NopPruner()
    if space.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


def run(recipe_path: Path, overrides: list[str], space_path: Path, out: Path, *, storage: str | None = None,
        resume: bool = False, overwrite: bool = False) -> dict:
    """Run (or continue) the study until ``space.trials`` trials have finished; write the table, best.yaml, plots."""
    from gptkit.recipe import check_columns, load_recipe, recipe_to_yaml

    optuna = _import_optuna()
    space = read_space(space_path)
    recipe = load_recipe(recipe_path, overrides)
    check_columns(recipe, recipe.task, str(recipe_path))  # a trial would refuse it, as every other one
    metric, direction = _objective_name(recipe, space)
    own_db = storage is None
    storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file, not a folder; choose another output folder")
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():  # before a --storage study is created for it
        raise UserError(f"--out: {out} is under {above}, which is a file, not a folder; choose another output folder")
    sweep = Sweep(recipe_path.resolve(), overrides, space, out.resolve(), storage, metric, direction,
                  "pretrain" if recipe.task == "pretrain" else "finetune")
    sweep.check_params()  # before anything in --out is written or removed
    space_text = space_path.read_text()  # before --overwrite removes the folder it may sit in
    if out.exists() and any(out.iterdir()) and not _holds_sweep(out):
        raise UserError(f"{out}: not empty and holds no sweep; choose another output folder")
    if own_db:
        if resume and not (out / "study.db").exists():  # a typo'd --out would start another sweep in silence
            raise UserError(f"--resume: {out} holds no sweep yet; start it without --resume")
        if (out / "study.db").exists() and not (resume or overwrite):
            raise UserError(f"{out}: a sweep is already there; --resume continues it, --overwrite starts over")
        if overwrite and not resume and out.exists():
            import shutil

            for arg, path in (("--space", space_path), ("recipe", recipe_path)):  # out/space.yaml is written back
                if out.resolve() in path.resolve().parents and path.resolve() != (out / "space.yaml").resolve():
                    raise UserError(f"{arg}: {path} is inside {out}, which --overwrite removes; move it out first")
            shutil.rmtree(out)
    if own_db:
        out.mkdir(parents=True, exist_ok=True)
    study = _open_study(optuna, storage, own_db, sampler=_sampler(optuna, space), pruner=_pruner(optuna, space),
                        direction=direction)
    _check_continues(optuna, study, space, metric, direction)  # before the stored space.yaml is replaced
    study.sampler = _sampler(optuna, space, len(study.get_trials(deepcopy=False)),
                             "" if own_db else f"{os.uname().nodename}:{os.getpid()}")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"storage": storage, "recipe": str(recipe_path.resolve())}) + "\n")
    (out / "space.yaml").write_text(space_text)
    if own_db and resume:  # this machine's own sweep: what it left running died with it
        _retry_interrupted(optuna, study)
    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)

    def done() -> int:
        return len([t for t in study.get_trials(deepcopy=False, states=counted) if not t.user_attrs.get("interrupted")])

    def enough(study, trial) -> None:
        if done() >= space.trials:
            study.stop()

    log.info("sweep: %s over %s, %s %s, %d of %d trials done, study in %s", recipe_path, ", ".join(space.params),
             direction, metric, done(), space.trials, storage)
    if done() < space.trials:
        study.optimize(sweep.objective, n_jobs=space.jobs, callbacks=[enough], catch=(RuntimeError,))
    return report(study, sweep, recipe_to_yaml, load_recipe)


def _check_continues(optuna, study, space: Space, metric: str, direction: str) -> None:
    """A study being continued keeps its objective (Optuna keeps the stored direction whatever is asked), a grid
    sweep its grid (Optuna would start another grid, the old trials still counted), and each field its kind of
    distribution and its choices (Optuna refuses a change at the trial's first suggestion, leaving a failed trial
    behind); otherwise bounds and settings may change."""
    stored = study.user_attrs.get("metric", metric)
    if (stored, study.direction.name.lower()) != (metric, direction):
        raise UserError(f"{space.source}: the study being continued {study.direction.name.lower()[:-1]}es {stored}, "
                        f"not {direction[:-1]}es {metric}; keep its objective (metric, direction) or start another sweep")
    study.set_user_attr("metric", metric)
    if space.sampler == "grid":
        grids = {json.dumps(t.system_attrs["search_space"], sort_keys=True)
                 for t in study.get_trials(deepcopy=False) if "search_space" in t.system_attrs}
        if grids - {json.dumps(_grid(space), sort_keys=True)}:
            raise UserError(f"{space.source}: the grid sweep being continued has another grid "
                            f"({', '.join(sorted(grids))}); keep it or start another sweep")
    known = {}
    for t in study.get_trials(deepcopy=False):
        known.update(t.distributions)
    for name, dist in space.params.items():
        if name not in known:
            continue
        kind = next(iter(set(dist) & DISTRIBUTIONS))
        value = dist[kind]
        if kind == "choice":
            new = optuna.distributions.CategoricalDistribution(value)
        elif kind == "int":
            new = optuna.distributions.IntDistribution(value[0], value[1], step=dist.get("step", 1))
        else:
            new = optuna.distributions.FloatDistribution(float(value[0]), float(value[1]), log=kind == "log_uniform")
        try:
            optuna.distributions.check_distribution_compatibility(known[name], new)
        except ValueError:
            raise UserError(f"{space.source}: {name}: the study being continued has {_described(known[name])}, not "
                            f"{_described(new)}; keep it or start another sweep") from None


def _described(d) -> str:
    """An Optuna distribution as the space file writes it."""
    if hasattr(d, "choices"):
        return f"choice {list(d.choices)}"
    kind = "int" if isinstance(d.low, int) else "log_uniform" if d.log else "uniform"
    return f"{kind} [{d.low}, {d.high}]"


def _storage(optuna, url: str, own: bool):
    """``journal:PATH``: a journal file (several processes, no database server); else an SQLAlchemy URL. A shared
    database gets heartbeats: a trial whose worker died is failed after a minute and retried once by the next
    worker (on the sweep's own database, --resume retries at once instead)."""
    if url.startswith("journal:"):
        backend = optuna.storages.journal.JournalFileBackend(url.removeprefix("journal:"))
        return optuna.storages.JournalStorage(backend)
    if own:
        return url
    import warnings

    with warnings.catch_warnings():  # heartbeats are "experimental" since optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=15, grace_period=60,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))


def _open_study(optuna, url: str, own: bool, **settings):
    """The study, created or loaded; a storage that cannot be opened (an unknown scheme, no driver, a folder that is
    not there, no server) is the user's one line, not SQLAlchemy's traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    flag = "--out" if own else "--storage"
    try:
        return optuna.create_study(study_name=STUDY, storage=_storage(optuna, url, own), load_if_exists=True,
                                   **settings)
    except ImportError:
        raise UserError(f"{flag}: {url}: no database driver for '{url.split(':')[0]}' is installed (e.g. pip install "
                        "psycopg2-binary for postgresql://)") from None
    except (OSError, SQLAlchemyError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(getattr(e, "orig", None) or e)
        raise UserError(f"{flag}: cannot open the study at {url} ({reason.splitlines()[0]}); expected "
                        "postgresql://..., sqlite:///PATH or journal:PATH in an existing folder") from None


def _retry_interrupted(optuna, study) -> None:
    """Trials a killed sweep left RUNNING, and those Ctrl-C stopped (failed by Optuna, marked ``retry``): marked
    failed (interrupted) and queued again, once, with the same values (the new trial names its ``retry_of``)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == optuna.trial.TrialState.RUNNING:
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        elif not (t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("retry") and t.number not in retried):
            continue
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        log.info("sweep: trial %d was interrupted; it runs again", t.number)


def _holds_sweep(out: Path) -> bool:
    """A folder a sweep wrote (its database, or its marker for a --storage study; a space.yaml alone is no sign:
    a user's folder may hold one, and --overwrite would remove it all)."""
    return (out / "study.db").exists() or (out / MARKER).is_file() or (
        (out / "space.yaml").is_file() and any(out.glob("trial-*")))  # (written before the marker existed)


def report(study, sweep: Sweep, recipe_to_yaml, load_recipe) -> dict:
    """trials.csv, the printed table, best.yaml (the winning recipe, runnable as is) and the plots."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("interrupted")]
    names = list(sweep.space.params)
    table = []
    for t in trials:
        table.append({"trial": t.number, **{n: t.params.get(n) for n in names}, sweep.metric: t.value,
                      "state": t.state.name, "seconds": t.user_attrs.get("seconds"), "worker": t.user_attrs.get("worker"),
                      "run_dir": t.user_attrs.get("run_dir"), "error": t.user_attrs.get("error", "")})
    with open(sweep.out / "trials.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]) if table else ["trial"])
        writer.writeheader()
        writer.writerows(table)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    result = {"trials": table, "metric": sweep.metric, "direction": sweep.direction, "out": str(sweep.out),
              "user_errors_only": bool(trials) and all(t.user_attrs.get("exit") == 2 for t in trials)}
    if complete:
        best = study.best_trial
        recipe = load_recipe(sweep.recipe_path, [*sweep.overrides, *(_override(k, v) for k, v in best.params.items()),
                                                 f"output.dir={sweep.out / 'best-run'}"])
        (sweep.out / "best.yaml").write_text(f"# best of {len(trials)} trials: {sweep.metric} {best.value:.6g} "
                                             f"(trial {best.number})\n" + recipe_to_yaml(recipe))
        result.update(best={"trial": best.number, "value": best.value, "params": best.params})
        _plots(study, sweep.out)
    return result


def _plots(study, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as vis

    import matplotlib.pyplot as plt

    import warnings

    for name, plot in (("history", vis.plot_optimization_history), ("importance", vis.plot_param_importances)):
        try:
            with warnings.catch_warnings():  # "experimental" since optuna 2.2; "too few trials" for importances
                warnings.simplefilter("ignore")
                ax = plot(study)
        except (ValueError, RuntimeError) as e:  # importance needs >= 2 finished trials with varied values
            log.info("sweep: no %s plot (%s)", name, str(e).splitlines()[0])
            continue
        ax.figure.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
