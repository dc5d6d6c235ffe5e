"""Shared fixtures: tiny corpora and recipes built in the test, the CLI driven in-process."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "tinyshakespeare.txt"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# the test session tokenizes into its own cache, never the user's, and sees an empty Hugging Face cache (a hub
# test lays out its own): what a developer has downloaded cannot change a result
os.environ["GPTKIT_CACHE"] = tempfile.mkdtemp(prefix="gptkit-test-cache-")
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="gptkit-test-hf-")
for _tmp in (os.environ["GPTKIT_CACHE"], os.environ["HF_HUB_CACHE"]):  # token streams: GBs over many sessions
    atexit.register(shutil.rmtree, _tmp, ignore_errors=True)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """The first 40k characters of the bundled Shakespeare sample."""
    p = tmp_path / "corpus.txt"
    p.write_text(SHAKESPEARE.read_text()[:40_000])
    return p


def tiny_recipe(path: Path, corpus: Path, out: Path, **sections) -> Path:
    """Write a recipe for a 2-layer, 32-wide character-level GPT; ``sections`` update the defaults."""
    recipe = {
        "tokenizer": {"kind": "char"},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "context": 32, "tie_embeddings": False},
        "data": {"train_files": [str(corpus)], "val_fraction": 0.1},
        "train": {"max_steps": 20, "batch_size": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 5,
                  "eval_every": 10, "eval_batches": 4, "log_every": 1, "save_every": 10,
                  "seed": int(os.environ.get("GPTKIT_TEST_SEED", "1337"))},
        "output": {"dir": str(out)},
    }
    for sec, values in sections.items():
        recipe.setdefault(sec, {}).update(values)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def recipe_file(tmp_path, corpus) -> Path:
    return tiny_recipe(tmp_path / "recipe.yaml", corpus, tmp_path / "run")


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run ``gptkit`` in this process; returns (exit code, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from gptkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def run_interrupted(monkeypatch, *args: str, at: int) -> str:
    """Run ``gptkit ARGS`` in this process, interrupted by SIGINT (Ctrl-C) when the loop asks for the learning rate
    of iteration ``at``: asserts exit code 130 and returns stderr. The caller resumes it with ``--resume``."""
    import signal

    from gptkit import engine

    real_lr_at = engine.lr_at

    def interrupt(it, cfg):
        if it == at:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(it, cfg)

    monkeypatch.setattr(engine, "lr_at", interrupt)
    try:
        code, _, err = run_cli(*args)
    finally:
        monkeypatch.setattr(engine, "lr_at", real_lr_at)
    assert code == 130, err
    return err


def gptkit_cmd() -> list[str]:
    return [sys.executable, "-m", "gptkit"]


def assert_user_error(code: int, err: str, *needles: str) -> str:
    """Exit code 2, no traceback, exactly one `error:` line, containing every needle."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("gptkit: ")]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]
