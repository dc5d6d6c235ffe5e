"""Atomic, verifiable training checkpoints.

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed to ``checkpoints/step-N`` only
once every file is on disk together with ``manifest.json`` (step, file sizes and SHA-256). A kill at
any moment therefore leaves either a complete checkpoint or a temporary folder that is ignored.
On resume, the newest checkpoint whose manifest verifies is used; broken ones are reported and skipped.

Contents: ``model.safetensors`` (weights), ``optimizer.pt`` (AdamW state, loaded with
``weights_only=True``), ``rng-<rank>.pt`` (torch CPU/CUDA generator states, one per process) and
``state.json`` (step, loop counters, and the examples of the data order consumed). The learning rate is a
pure function of the step and the data order of the seed, so nothing else is needed for a bit-identical resume
(on another process count, training goes on from the example reached).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def tmp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-step-{step:08d}"


def finalize(root: Path, step: int, keep_last: int) -> Path:
    """Write the manifest, rename the temporary folder into place, prune old checkpoints (main process)."""
    tmp, final = tmp_dir(root, step), step_dir(root, step)
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):  # sharded state sits in a subfolder
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        files[str(f.relative_to(tmp))] = {"size": f.stat().st_size, "sha256": sha256(f)}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    # pruned among the steps up to this one: a newer checkpoint left by a resume that fell back past it (it did not
    # verify) belongs to an abandoned timeline and must not push out the good ones this run writes
    earlier = [p for p in complete_checkpoints(root, verified=False) if int(p.name.split("-")[-1]) <= step]
    for old in earlier[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong with it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return "missing or unreadable manifest"
    for name, meta in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != meta["size"]:
            return f"{name} has {f.stat().st_size} bytes, manifest says {meta['size']}"
        if sha256(f) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def complete_checkpoints(root: Path, verified: bool = True) -> list[Path]:
    """Finished checkpoints, oldest first (optionally only those whose files verify)."""
    if not root.is_dir():
        return []
    found = sorted(p for p in root.glob("step-*") if p.is_dir() and (p / MANIFEST).exists())
    return [p for p in found if not verified or _check(p)]


def _check(path: Path) -> bool:
    problem = verify(path)
    if problem:
        log.warning("skipping checkpoint %s: %s", path.name, problem)
    return problem is None


def latest(root: Path) -> Path | None:
    """The newest checkpoint that verifies; broken newer ones are reported and skipped."""
    good = complete_checkpoints(root, verified=True)
    return good[-1] if good else None


def clean_partial(root: Path) -> None:
    """Remove temporary folders left by a run that was killed mid-write."""
    if root.is_dir():
        for p in root.glob(".tmp-step-*"):
            log.warning("removing incomplete checkpoint %s (the run was interrupted while writing it)", p.name)
            shutil.rmtree(p, ignore_errors=True)
