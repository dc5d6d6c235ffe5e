"""Synthetic but learnable fine-tuning data: deterministic word mappings a tiny model can master."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

SRC = "red blue green black white small big old new fast".split()
TGT = "rot blau gruen schwarz weiss klein gross alt neu schnell".split()
MAP = dict(zip(SRC, TGT))


def translate_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(SRC) for _ in range(4)]
        rows.append({"source": " ".join(words), "target": " ".join(MAP[w] for w in words)})
    return rows


def summarize_rows(n: int, seed: int) -> list[dict]:
    """The summary is the document's first two words: ROUGE rewards learning which words to keep."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(SRC) for _ in range(6)]
        rows.append({"document": " ".join(words), "summary": " ".join(words[:2])})
    return rows


def classify_rows(n: int, seed: int) -> list[dict]:
    """label 'warm' when the first word is one of the first five colours/sizes, else 'cold'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(SRC) for _ in range(3)]
        rows.append({"sentence": " ".join(words), "label": "warm" if SRC.index(words[0]) < 5 else "cold"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base_corpus(path: Path) -> Path:
    """Text with every word of both vocabularies, for the base model's BPE tokenizer."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(SRC + TGT) for _ in range(12)) + " =>" for _ in range(400)]
    path.write_text("\n".join(lines) + "\n")
    return path


def base_recipe(tmp: Path) -> Path:
    recipe = {
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "model": {"n_layer": 2, "n_head": 4, "n_embd": 64, "context": 64, "tie_embeddings": False},
        "data": {"train_files": [str(base_corpus(tmp / "base.txt"))], "val_fraction": 0.0},
        "train": {"max_steps": 20, "batch_size": 16, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "save_every": 20},
        "output": {"dir": str(tmp / "base")},
    }
    path = tmp / "base.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def finetune_recipe(tmp: Path, name: str, task: str, base: Path, splits: dict[str, Path], **sections) -> Path:
    recipe = {
        "task": task,
        "model": {"init_from": str(base)},
        "data": {"train_files": [str(splits["train"])], "val_files": [str(splits["validation"])],
                 **({"test_files": [str(splits["test"])]} if "test" in splits else {})},
        "train": {"max_steps": 400, "batch_size": 16, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20,
                  "eval_every": 100, "save_every": 100, "log_every": 20, "weight_decay": 0.0},
        "finetune": {"eval_examples": 50, "max_new_tokens": 16},
        "output": {"dir": str(tmp / name)},
    }
    for sec, values in sections.items():
        recipe.setdefault(sec, {}).update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def splits(tmp: Path, make, n_train: int = 600) -> dict[str, Path]:
    """train / validation / test files from a row maker ``make(n, seed)``, with distinct seeds."""
    return {"train": write_jsonl(tmp / "train.jsonl", make(n_train, 1)),
            "validation": write_jsonl(tmp / "val.jsonl", make(50, 2)),
            "test": write_jsonl(tmp / "test.jsonl", make(50, 3))}


def read_test_metrics(run: Path) -> dict:
    """What the runner scored on the test split."""
    return json.loads((run / "test_metrics.json").read_text())
