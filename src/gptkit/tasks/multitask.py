"""multitask: several generative tasks (translate, summarize, generative qa) trained into one language model
(decoder-only; an encoder-decoder base takes translate and summarize only).

The recipe lists the tasks under ``finetune.tasks``, each with its own files, columns, prompt and a
sampling weight; each task keeps its own preprocessing, prediction and metric (this module only routes
rows to them), and validation reports every task's metrics plus ``score``, the mean of each task's
primary metric, which picks the best checkpoint.
"""

from __future__ import annotations

import numpy as np

from gptkit import tasks
from gptkit.errors import UserError
from gptkit.tasks import generative as gen

FIELDS: tuple[str, ...] = ()
OPTIONAL: tuple[str, ...] = ()
TEXTS: tuple[str, ...] = ()
METRIC = "val_score"
PRIMARY = {"translate": "bleu", "summarize": "rougeL", "qa": "f1"}

build_model = gen.build_model
loss, count = gen.loss, gen.count


def sub_recipe(recipe, i: int):
    """The recipe as task i alone sees it: its files, columns and prompt; qa is always generative here."""
    sub = recipe.finetune.tasks[i]
    data = recipe.data.model_copy(update={"train_files": sub.train_files, "val_files": sub.val_files,
                                          "test_files": sub.test_files, "columns": sub.columns})
    finetune = recipe.finetune.model_copy(update={"prompt": sub.prompt, "qa_mode": "generative", "tasks": []})
    return recipe.model_copy(update={"task": sub.task, "data": data, "finetune": finetune})


def _names(recipe) -> list[str]:
    kinds = [s.task for s in recipe.finetune.tasks]
    return [k if kinds.count(k) == 1 else f"{k}{i}" for i, k in enumerate(kinds)]


def load_splits(recipe) -> dict:
    """Rows of every task and split, tagged with their task (``_sub`` index, ``_task`` kind, ``_name``) as they are
    read (:class:`gptkit.data.Joined`, a part per task)."""
    from gptkit.data import Joined, check_texts, load_rows

    if not recipe.finetune.tasks:
        raise UserError("finetune.tasks: task 'multitask' needs a list of tasks, each with task and train_files")
    parts: dict[str, list] = {"train": [], "validation": [], "test": []}
    tags: dict[str, list[dict]] = {split: [] for split in parts}
    for i, (sub, name) in enumerate(zip(recipe.finetune.tasks, _names(recipe))):
        module, sr, tag = tasks.load(sub.task), sub_recipe(recipe, i), {"_sub": i, "_task": sub.task, "_name": name}
        for split, files, key in (("train", sub.train_files, "train_files"), ("validation", sub.val_files, "val_files"),
                                  ("test", sub.test_files, "test_files")):
            if files:
                rows = load_rows(files, f"finetune.tasks[{i}].{key}", module.FIELDS, module.OPTIONAL, sr.data.columns)
                check_texts(rows, files, f"finetune.tasks[{i}].{key}", module.TEXTS)
                parts[split].append((rows, None))
                tags[split].append(tag)
    return {split: Joined(found, lambda row, k, t=tags[split]: {**row, **t[k]}, [t["_sub"] for t in tags[split]])
            for split, found in parts.items() if found}


def _of_task(rows, i: int):
    """The rows of task ``i``: its part of :func:`load_splits`' rows as it is (nothing read), else those tagged."""
    from gptkit.data import Joined

    if isinstance(rows, Joined) and rows.keys is not None:
        return rows.part(rows.keys.index(i)) if i in rows.keys else []
    return [r for r in rows if r["_sub"] == i]


class Mixture:
    """Examples of several tasks. For training, each task fills a share of every epoch proportional to its weight;
    the rows of a share are read from an endless stream of seeded permutations of the task's rows (a new one per
    pass), so over epochs every row is seen equally often (±1) and none is skipped, and the row at any slot is a
    pure function of (seed, epoch, slot): resume stays exact. Otherwise every example appears once, in order."""

    def __init__(self, parts: list[tuple[float, gen.Examples]], weighted: bool, seed: int = 0):
        self.parts, self.seed, self.weighted = [p for _, p in parts], seed, weighted
        total, wsum = sum(len(p) for p in self.parts), sum(w for w, _ in parts)
        self.sizes = [max(1, round(total * w / wsum)) if weighted else len(p) for w, p in parts]
        self.pad_id, self.decoder_start = self.parts[0].pad_id, self.parts[0].decoder_start
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return sum(self.sizes)

    def _perm(self, k: int, rounds: int) -> np.ndarray:
        if (k, rounds) not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            self._perms[k, rounds] = np.random.default_rng([self.seed, k, rounds]).permutation(len(self.parts[k]))
        return self._perms[k, rounds]

    def row(self, i: int, epoch: int = 0) -> dict:
        """The example at slot ``i`` of ``epoch``."""
        for k, (part, size) in enumerate(zip(self.parts, self.sizes)):
            if i < size:
                if not self.weighted:
                    return part.rows[i]
                pos = epoch * size + i  # position in task k's stream of permutations
                return part.rows[int(self._perm(k, pos // len(part))[pos % len(part)])]
            i -= size
        raise IndexError(i)

    def batch(self, indices: list[int], epochs: list[int] | None = None) -> dict:
        rows = [self.row(i, e) for i, e in zip(indices, epochs or [0] * len(indices))]
        return gen.Examples(rows, self.pad_id, self.decoder_start).batch(list(range(len(rows))))


def preprocess(recipe, tokenizer, rows, split, model=None) -> Mixture:
    parts = []
    for i, sub in enumerate(recipe.finetune.tasks):
        mine = _of_task(rows, i)
        if len(mine):
            examples = tasks.load(sub.task).preprocess(sub_recipe(recipe, i), tokenizer, mine, f"{split} ({sub.task})",
                                                       model)
            parts.append((sub.weight, examples))
    return Mixture(parts, weighted=split == "train", seed=recipe.train.seed)


def predict(model, tokenizer, rows, recipe) -> list:
    out: list = [None] * len(rows)
    for i, sub in enumerate(recipe.finetune.tasks):
        idx = [n for n, r in enumerate(rows) if r["_sub"] == i]
        if idx:
            preds = tasks.load(sub.task).predict(model, tokenizer, [rows[n] for n in idx], sub_recipe(recipe, i))
            for n, p in zip(idx, preds):
                out[n] = p
    return out


def score(predictions, rows, recipe=None) -> dict[str, float]:
    """Each task's metrics, prefixed with its name, and ``score``: the mean of the tasks' primary metrics."""
    result: dict[str, float] = {}
    primaries = []
    for i in sorted({r["_sub"] for r in rows}):
        idx = [n for n, r in enumerate(rows) if r["_sub"] == i]
        kind, name = rows[idx[0]]["_task"], rows[idx[0]]["_name"]
        sub = sub_recipe(recipe, i) if recipe is not None else None
        scores = tasks.load(kind).score([predictions[n] for n in idx], [rows[n] for n in idx], sub)
        result.update({f"{name}_{k}": v for k, v in scores.items()})
        primaries.append(scores[PRIMARY[kind]])
    result["score"] = sum(primaries) / len(primaries)
    return result
