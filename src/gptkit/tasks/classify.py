"""classify: a sequence-classification head on the language model (the task layer replacing the LM head).

Rows have ``text`` (and optionally ``text_pair``) and ``label`` (strings or ints). The label map is built
from the training split and saved in the model config (``id2label``/``label2id``).
"""

from __future__ import annotations

import logging

import torch

from gptkit import metrics, modeling
from gptkit.errors import UserError
from gptkit.tasks.generative import Examples as _Padded
from gptkit.tasks.generative import Rows, in_chunks
from gptkit.tokenizer import adds_bos, plain_ids

log = logging.getLogger(__name__)

FIELDS = ("text", "label")
OPTIONAL = ("text_pair",)
TEXTS = ("text", "text_pair")
METRIC = "val_accuracy"
SEP = "\n"


def label_names(rows: list[dict]) -> list[str]:
    """Distinct labels as strings: integers in numeric order, then the rest alphabetically."""

    def key(s: str) -> tuple:
        return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)

    return sorted({str(r["label"]) for r in rows}, key=key)


def labels_of(recipe, train_rows) -> list[str]:
    """:func:`label_names` of the training split: at least two (one label trains to a loss of 0 and 100% accuracy,
    and a one-output head means regression to transformers)."""
    names = label_names(train_rows)
    if len(names) < 2:
        column = (recipe.data.columns or {}).get("label", "label")
        raise UserError(f"data.train_files: every row has the label {names[0]!r} (column '{column}'); a classifier "
                        "needs at least 2 labels in the training split")
    return names


def build_model(recipe, tokenizer, train_rows):
    """The base with a classification head for the training split's labels. A base that is already a classifier
    keeps its head when it has the same number of labels (in its own order when the labels are the same), else
    the head is re-initialised and that is logged (transformers' ignore_mismatched_sizes, as run_glue allows)."""
    from transformers import AutoModelForSequenceClassification

    names = labels_of(recipe, train_rows)
    base = modeling.base_config(recipe.model.init_from or "", trust_remote_code=recipe.model.trust_remote_code)
    before = {int(k): str(v) for k, v in (base.id2label or {}).items()}
    if set(before.values()) == set(names) and sorted(before) == list(range(len(names))):
        names = [before[i] for i in range(len(names))]  # a classifier's own labels: each keeps its row of the head
    model, info = AutoModelForSequenceClassification.from_pretrained(
        modeling.model_dir(recipe.model.init_from or "", "model.init_from"), num_labels=len(names),
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        ignore_mismatched_sizes=True, output_loading_info=True, **modeling.load_kwargs(recipe.model),
    )
    if info.get("mismatched_keys"):
        log.warning("model.init_from: %s is a classifier with %d labels, the training split has %d: its head (%s) "
                    "is re-initialised", recipe.model.init_from, len(before), len(names),
                    ", ".join(sorted(k[0] if isinstance(k, tuple) else str(k) for k in info["mismatched_keys"])))
    model.config.pad_token_id = tokenizer.pad_token_id  # GPT-style heads read the last non-pad token
    return model


class _Labelled(_Padded):
    def batch(self, indices: list[int], epochs: list[int] | None = None) -> dict:
        out = super().batch(indices)
        out["labels"] = torch.tensor([self.rows[i]["label"] for i in indices])
        return out


def _fit(first: list[int], second: list[int], limit: int) -> list[int]:
    """The text's tokens, then SEP and text_pair's: at most ``limit`` together, the longer side losing its end first
    (tokenizers' "longest_first": a long first sentence never pushes the pair out)."""
    if len(first) + len(second) > limit:
        half = limit // 2
        if len(second) <= half:
            first = first[: limit - len(second)]
        elif len(first) <= limit - half:
            second = second[: limit - len(first)]
        else:
            first, second = first[: limit - half], second[:half]
    return first + second


def _encode(tokenizer, rows: list[dict], limit: int) -> list[list[int]]:
    """Each row's text (and SEP + text_pair) as token ids, fitted to ``limit`` (:func:`_fit`); never empty. A
    tokenizer that starts sequences with BOS (Llama-style) gets it first, as ``tokenizer(text)`` encodes it, so the
    exported classifier scores a text in a plain transformers pipeline as it was trained and evaluated here."""
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    firsts = plain_ids(tokenizer, [str(r["text"]) for r in rows])
    paired = [i for i, r in enumerate(rows) if r.get("text_pair") not in (None, "")]
    seconds = [[] for _ in rows]
    for i, ids in zip(paired, plain_ids(tokenizer, [SEP + str(rows[i]["text_pair"]) for i in paired]) if paired else ()):
        seconds[i] = ids
    return [bos + _fit(a, b, limit - len(bos)) or [tokenizer.eos_token_id] for a, b in zip(firsts, seconds)]


def preprocess(recipe, tokenizer, rows, split, model):
    """Token ids and label ids (from the model's label map, built on the training split)."""
    label2id = {str(k): int(v) for k, v in model.config.label2id.items()}
    unseen = sorted({str(r["label"]) for r in rows} - set(label2id))
    if unseen:
        raise UserError(f"data: {split} split has labels never seen in training: {unseen[:5]} (training labels: "
                        f"{sorted(label2id)[:10]})")
    context = modeling.max_positions(model.config)  # finetune.max_length within the model's positions
    limit = min(recipe.finetune.max_length, context) if context else recipe.finetune.max_length
    parts = (Rows([{"input_ids": ids, "label": label2id[str(r["label"])]}
                   for r, ids in zip(chunk, _encode(tokenizer, chunk, limit))]) for chunk in in_chunks(rows, split))
    return _Labelled(Rows.concat(parts), tokenizer.pad_token_id)


def loss(model, batch: dict, per: str = "token", smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the label (``smoothing``: label smoothing), summed over the batch's examples."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum",
                                             label_smoothing=smoothing)


def count(batch: dict, per: str = "token") -> int:
    """Examples: one label each, whatever ``per`` says."""
    return batch["input_ids"].shape[0]


@torch.no_grad()
def probabilities(model, tokenizer, rows, recipe) -> list[dict[str, float]]:
    """Per row, every label's probability (softmax of the head's logits), in the model's label order."""
    any_label = next(iter(model.config.label2id))
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    out: list[dict[str, float]] = []
    for chunk in in_chunks(rows, "rows", "classifying"):
        data = preprocess(recipe, tokenizer, [{**r, "label": any_label} for r in chunk], "predict", model)
        for start in range(0, len(data), 32):
            batch = data.batch(list(range(start, min(len(data), start + 32))))
            batch.pop("labels")
            probs = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float().softmax(-1).cpu()
            out += [dict(zip(names, p.tolist())) for p in probs]
    return out


def predict(model, tokenizer, rows, recipe) -> list[str]:
    """The likeliest label of each row."""
    return [max(p, key=p.get) for p in probabilities(model, tokenizer, rows, recipe)]


def score(predictions, rows, recipe=None):
    """accuracy, macro_f1 and per-class figures (:func:`gptkit.metrics.task_scores`, as `gptkit eval` reports)."""
    return metrics.task_scores("classify", predictions, [str(r["label"]) for r in rows])
