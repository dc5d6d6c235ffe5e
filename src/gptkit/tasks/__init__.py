"""Task modules. Fine-tuning tasks share one shape (:class:`FinetuneTask`), checked by a test.

The fine-tuning tasks plug into :mod:`gptkit.finetune` (the runner beside :mod:`gptkit.pretrain`), which owns
splits, LoRA, the call to the one training loop and saving (:mod:`gptkit.trained`).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

FINETUNE_TASKS = ("classify", "qa", "translate", "summarize", "multitask")


@runtime_checkable
class FinetuneTask(Protocol):
    FIELDS: tuple[str, ...]  # fields every row needs (mapped from file columns by data.columns)
    OPTIONAL: tuple[str, ...]  # fields a row may have
    TEXTS: tuple[str, ...]  # fields that hold text: a string in every format but csv (data.check_texts)
    METRIC: str  # validation metric that picks the best checkpoint by default

    def build_model(self, recipe: Any, tokenizer: Any, train_rows: list[dict]) -> Any: ...

    def preprocess(self, recipe: Any, tokenizer: Any, rows: list[dict], split: str, model: Any) -> Any: ...

    def loss(self, model: Any, batch: dict, per: str = "token", smoothing: float = 0.0) -> Any: ...  # summed over
    # the items count() gives; smoothing: label smoothing (training only)

    def count(self, batch: dict, per: str = "token") -> int: ...

    def predict(self, model: Any, tokenizer: Any, rows: list[dict], recipe: Any) -> list: ...

    def score(self, predictions: list, rows: list[dict], recipe: Any = None) -> dict[str, float]: ...


def load(name: str) -> FinetuneTask:
    """The module of a fine-tuning task."""
    return importlib.import_module(f"gptkit.tasks.{name}")  # type: ignore[return-value]
