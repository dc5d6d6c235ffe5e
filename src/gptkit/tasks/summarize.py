"""summarize: causal LM on "document + TL;DR:" (the GPT-2 paper's prompt) + summary; scored with ROUGE."""

from __future__ import annotations

from gptkit import metrics
from gptkit.tasks import generative as gen

FIELDS = ("document", "summary")
OPTIONAL = ()
METRIC = "val_rougeL"
PROMPT = "{document}\nTL;DR:"

build_model = gen.build_model
loss = gen.loss
preprocess, predict = gen.bind(PROMPT, target="summary", shorten="document")


def score(predictions, rows):
    out = metrics.rouge(predictions, [r["summary"] for r in rows])
    return {k: out[k] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
