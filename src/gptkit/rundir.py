"""The run directory: refuse to clobber other runs, check resumes, record how to repeat a run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from gptkit import checkpoint
from gptkit.errors import UserError
from gptkit.recipe import Recipe, recipe_to_yaml

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
RUN_FILE = "run.json"

# Fields that may change between a run and its resume without changing what is computed. Not train.eval_batches:
# best/ and patience compare each evaluation with the best one before it, measured on the sample it sets.
_HARMLESS = {
    "description",
    "output.dir",
    "data.cache_dir",
    "data.num_proc",
    "train.eval_every",
    "train.full_final_eval",
    "train.log_every",
    "train.save_every",
    "train.keep_last",
    "train.compile",
    "train.skip_nonfinite",
    "train.trackers",
}
_SYSTEM = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/sbin", "/sys", "/usr", "/var/lib", "/var/log")


def resolve_output(raw: str) -> Path:
    """``output.dir`` against the working directory; ``..`` and system folders are refused."""
    if ".." in Path(raw).parts:
        raise UserError(f"output.dir: '{raw}' contains '..'; give a path without parent references")
    path = Path(raw).expanduser().resolve()
    refuse_system(path, "output.dir", raw)
    return path


def refuse_system(path: Path, flag: str, raw: str | None = None) -> None:
    """A folder a command writes into is never / or a system folder (a run as root would write into /etc)."""
    path = path.expanduser().resolve()
    if path == Path("/") or any(str(path) == s or str(path).startswith(s + "/") for s in _SYSTEM):
        raise UserError(f"{flag}: '{raw or path}' is a system folder; choose a directory you own")


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def recipe_changes(old: dict, new: dict) -> list[str]:
    """Differences that matter for a resume, as 'field: old -> new' lines."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted((set(a) | set(b)) - _HARMLESS)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def check(run_dir: Path, recipe: Recipe, *, resume: bool, overwrite: bool, force: bool, resumable: bool = True
          ) -> None:
    """Read-only checks before any work: is it safe to write into ``run_dir``? Are its trackers installed?"""
    from gptkit import tracking

    tracking.check(recipe.train.trackers, run_dir)
    if resume and overwrite:
        raise UserError("--resume and --overwrite conflict: resume continues a run, overwrite deletes it")
    saved = run_dir / RECIPE_FILE
    if resume:
        if not is_run(run_dir):
            raise UserError(f"--resume: {run_dir} holds no gptkit run ({RECIPE_FILE} and {RUN_FILE} not found)")
        changes = recipe_changes(_saved_recipe(saved), recipe.model_dump(mode="json"))
        if changes and not force:
            raise UserError(
                f"--resume: the recipe differs from the run in {run_dir} in ways that change training: "
                + "; ".join(changes)
                + " (pass --force to resume anyway)"
            )
        _check_resumable(run_dir)
        check_writable(run_dir, "output.dir")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output.dir: {run_dir} exists and is not a directory")
    check_writable(run_dir, "output.dir")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not is_run(run_dir):  # a folder with the user's own recipe.yaml in it is not a run to overwrite
            raise UserError(f"output.dir: {run_dir} is not empty and holds no gptkit run; choose an empty directory")
        if not overwrite:
            raise UserError(f"output.dir: {run_dir} already holds a run; pass "
                            + ("--resume to continue it or " if resumable else "") + "--overwrite to replace it")
        check_writable(run_dir.parent, "output.dir")  # the old run is moved aside, beside it (new_run)


def _check_resumable(run_dir: Path) -> None:
    """What a resume reads or rewrites is whole, before it rewrites anything: the run record, the metrics log
    (a torn last line, a kill mid-write, is dropped), a checkpoint to continue from."""
    from gptkit import tracking

    _run_record(run_dir / RUN_FILE)
    tracking.read_metrics(run_dir / "metrics.jsonl")
    if not checkpoint.complete_checkpoints(run_dir / "checkpoints", verified=False):
        raise UserError(no_checkpoint(run_dir / "checkpoints"))


def no_checkpoint(root: Path) -> str:
    """A run that stopped before its first checkpoint has nothing to resume: it starts again (a loop otherwise,
    as a start without --overwrite refuses the folder)."""
    return (f"--resume: no complete checkpoint in {root} (the run stopped before its first one); start it again "
            "with --overwrite instead of --resume")


def _run_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--resume: {path} is not readable JSON ({e}); the run cannot be resumed") from None
    if not isinstance(record, dict):
        raise UserError(f"--resume: {path} holds no run record (expected a JSON object); the run cannot be resumed")
    return record


def is_run(run_dir: Path) -> bool:
    """A folder gptkit made: it holds both the recipe and the run record :func:`create` writes."""
    return (run_dir / RECIPE_FILE).is_file() and (run_dir / RUN_FILE).is_file()


def _saved_recipe(path: Path) -> dict:
    try:
        saved = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"--resume: {path} is not readable YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(saved, dict):
        raise UserError(f"--resume: {path} holds no recipe (expected a mapping); the run cannot be resumed")
    return saved


def create(run_dir: Path, recipe: Recipe, *, overwrite: bool, command: list[str]) -> None:
    """Make the run directory (replacing an old run only with --overwrite, which sets it aside: :func:`new_run`) and
    record recipe and versions."""
    if overwrite and is_run(run_dir):
        _set_aside(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write(run_dir / RECIPE_FILE, recipe_to_yaml(recipe))
        _write(run_dir / RUN_FILE, json.dumps({**environment(command), "sources": sources(recipe)}, indent=1))
    except OSError as e:
        raise UserError(f"output.dir: cannot write {run_dir} ({e.strerror or e})") from None


def replaced(run_dir: Path) -> Path:
    """Where --overwrite keeps the old run while the new one has nothing of its own: a hidden folder beside it."""
    return run_dir.with_name(f".{run_dir.name}.replaced")


def _set_aside(run_dir: Path) -> None:
    aside = replaced(run_dir)
    if aside.exists():  # an earlier replacement was killed before its first checkpoint: that one goes, not the old run
        shutil.rmtree(run_dir)
    else:
        os.replace(run_dir, aside)


@contextlib.contextmanager
def new_run(run_dir: Path, recipe: Recipe, *, overwrite: bool, command: list[str], make: bool = True):
    """:func:`create` the run (when ``make``: the main process of a fresh run) for the block that trains it. The run
    --overwrite replaces is not deleted at once but set aside (:func:`replaced`): it is deleted when the new run has
    a checkpoint of its own (:func:`started`, which the loop calls) or the block completes, and put back in place
    when the block fails before that (a tracker that cannot start, a non-finite loss at step 3): a failed start never
    costs the old run. A kill -9 before the first checkpoint leaves it beside the new folder."""
    if not make:
        yield
        return
    replacing = overwrite and is_run(run_dir)
    try:
        create(run_dir, recipe, overwrite=overwrite, command=command)
        yield
    except BaseException:
        if replacing and replaced(run_dir).is_dir():
            shutil.rmtree(run_dir, ignore_errors=True)
            os.replace(replaced(run_dir), run_dir)
            log.warning("the new run failed before its first checkpoint: the run it was to replace is back in %s",
                        run_dir)
        raise
    started(run_dir)


def started(run_dir: Path) -> None:
    """The new run has a checkpoint: the run --overwrite replaced is deleted now."""
    shutil.rmtree(replaced(run_dir), ignore_errors=True)


def resumed(run_dir: Path, recipe: Recipe, command: list[str]) -> None:
    """A resume (maybe with --force) records the recipe it continues with, and appends to the run record when,
    how and with which changes it resumed: the saved recipe is the one a further --resume compares against."""
    old = _saved_recipe(run_dir / RECIPE_FILE)
    record = _run_record(run_dir / RUN_FILE)
    record.setdefault("resumes", []).append({**environment(command),
                                             "changes": recipe_changes(old, recipe.model_dump(mode="json"))})
    _write(run_dir / RECIPE_FILE, recipe_to_yaml(recipe))
    _write(run_dir / RUN_FILE, json.dumps(record, indent=1))


def _write(path: Path, text: str) -> None:
    """Whole or not at all: a kill while writing never leaves a torn recipe or record."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def check_out_folder(out: Path, flag: str = "--out") -> None:
    """``out`` can become a new model folder: absent (under folders, not files) or an empty directory."""
    refuse_system(out, flag)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag}: {out} is a file, not a folder; choose a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{flag}: {out} is not empty; choose a new directory")
    _not_under_a_file(out, flag)


def _not_under_a_file(path: Path, what: str) -> Path | None:
    """The nearest folder above ``path`` that exists (None: none does), refused when it is a file."""
    above = next((p for p in path.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"{what}: {path} is under {above}, which is a file, not a folder; choose a new directory")
    return above


def check_writable(path: Path, what: str) -> None:
    """Before any work: ``path`` (a folder, or where one will be made) can be written — it is not under a file, and
    the nearest folder on the way to it that exists takes a new file (a read-only filesystem or folder, someone
    else's folder). ``what`` names the setting in the message."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}: {path} is a file, not a folder; choose a directory")
    above = path if path.is_dir() else _not_under_a_file(path, what)
    if above is None:
        return
    try:
        with tempfile.TemporaryFile(dir=above):
            pass
    except OSError as e:
        raise UserError(f"{what}: cannot write in {above} ({e.strerror or e}); choose a folder you can write to"
                        ) from None


@contextlib.contextmanager
def new_folder(out: Path):
    """Yields a staging folder beside ``out`` that becomes ``out`` only when the block completes (``out`` absent or
    empty, :func:`check_out_folder`). On failure nothing is left: not the staging folder, nor the folders above
    ``out`` that this made."""
    made = [p for p in out.absolute().parents if not p.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield staging
        if out.is_dir():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
                folder.rmdir()
        raise


def sources(recipe: Recipe) -> dict:
    """Where the recipe's base model and tokenizer came from: a local path, or a hub id with the commit its
    revision resolved to."""
    from gptkit import hub

    named = {"model.init_from": recipe.model.init_from,
             "tokenizer.path": recipe.tokenizer.path if recipe.tokenizer.kind == "pretrained" else None}
    return {field: hub.resolve(value, field).record() for field, value in named.items() if value}


def environment(command: list[str]) -> dict:
    import torch
    import transformers

    from gptkit import __version__

    return {
        "gptkit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": command or sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_of(path: Path):
    """(recipe, run dir) of a gptkit run directory or of its best/ checkpoint; (None, path) otherwise."""
    from gptkit.recipe import load_recipe

    for home in (path, path.parent) if path.name == "best" else (path,):
        if (home / RECIPE_FILE).is_file():
            return load_recipe(home / RECIPE_FILE), home
    return None, path


def check_disk_space(run_dir: Path, n_params: int, keep_last: int) -> None:
    """Refuse to start when the retained checkpoints (+1 being written, + final model) cannot fit."""
    need = (keep_last + 1) * 12 * n_params + 4 * n_params  # fp32 weights + two AdamW moments each
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise UserError(
            f"output.dir: {run_dir} has {size(free)} free; {keep_last} kept checkpoints of this model "
            f"need about {size(need)} (lower train.keep_last or free space)"
        )


def size(n: float) -> str:
    """Bytes for a message, in the unit that shows them (a small disk is not "0.00 GB")."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"
