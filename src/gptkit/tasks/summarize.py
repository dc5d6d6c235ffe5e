"""summarize: causal LM on "document + TL;DR:" (the GPT-2 paper's prompt) + summary; scored with ROUGE."""

from __future__ import annotations

from gptkit import metrics
from gptkit.tasks import generative as gen

FIELDS = ("document", "summary")
OPTIONAL = ()
TEXTS = FIELDS
METRIC = "val_rougeL"
PROMPT = "{document}\nTL;DR:"

build_model = gen.build_model
loss, count = gen.loss, gen.count
preprocess, predict = gen.bind(PROMPT, target="summary", shorten="document")


def score(predictions, rows, recipe=None):
    tokenizer = recipe.finetune.rouge_tokenizer if recipe is not None else "default"
    return metrics.task_scores("summarize", predictions, [r["summary"] for r in rows], rouge_tokenizer=tokenizer)
