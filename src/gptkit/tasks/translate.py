"""translate: causal LM on a prompt template + target; scored with corpus sacreBLEU and chrF."""

from __future__ import annotations

from gptkit import metrics
from gptkit.tasks import generative as gen

FIELDS = ("source", "target")
OPTIONAL = ("synthetic",)  # true on back-translated pairs (gptkit augment backtranslate; finetune.synthetic_tag)
TEXTS = FIELDS
METRIC = "val_bleu"
PROMPT = "{source} =>"

build_model = gen.build_model
loss, count = gen.loss, gen.count
preprocess, predict = gen.bind(PROMPT, target="target", shorten="source")


def score(predictions, rows, recipe=None):
    return metrics.task_scores("translate", predictions, [r["target"] for r in rows])
