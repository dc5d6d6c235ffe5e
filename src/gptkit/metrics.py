"""Evaluation metrics: thin wrappers over the reference implementations.

Every score is on a 0-100 scale (like sacreBLEU), except :func:`perplexity_from_nll`. Every
public function that takes ``predictions`` and ``references`` raises :class:`UserError` with a
one-line message when they are empty or differ in length.

* BLEU / chrF: ``sacrebleu.metrics.BLEU`` / ``CHRF`` with their defaults (13a tokenizer, exp
  smoothing; chrF2 with 6 char n-grams), so the numbers and signature strings equal the
  ``sacrebleu`` command-line tool's.
* ROUGE: ``rouge_score.rouge_scorer.RougeScorer(use_stemmer=True)``. Its tokenizer lower-cases
  and keeps only ``[a-z0-9]``: non-ASCII letters become separators, so e.g. German umlauts split
  words and text in a non-Latin script scores 0. Use it for English.
* SQuAD v1.1: a transcription of the official evaluation script.
* Classification: plain Python (no sklearn), same conventions as sklearn with ``zero_division=0``.

Library imports (sacrebleu, rouge_score, numpy) happen inside the functions that need them.
"""

from __future__ import annotations

import logging

import math
import re
import string
from collections import Counter
from typing import Any, Callable, Hashable, Sequence

from gptkit.errors import UserError

References = Sequence[str] | Sequence[Sequence[str]]


# --------------------------------------------------------------------------------------- checks
def _check_pairs(predictions: Sequence[Any], references: Sequence[Any], what: str) -> None:
    """Raise UserError unless predictions/references are equally long, non-empty sequences."""
    for name, seq in (("predictions", predictions), ("references", references)):
        if isinstance(seq, str) or not isinstance(seq, Sequence):
            raise UserError(f"{what}: {name} must be a list, got {type(seq).__name__}")
    if not predictions or not references:
        raise UserError(f"{what}: predictions and references must be non-empty "
                        f"(got {len(predictions)} predictions, {len(references)} references)")
    if len(predictions) != len(references):
        raise UserError(f"{what}: got {len(predictions)} predictions but "
                        f"{len(references)} references; they must pair up one to one")


def _refs_per_example(references: References, what: str) -> list[list[str]]:
    """Normalise references to one non-empty list of strings per example."""
    out = []
    for i, ref in enumerate(references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise UserError(f"{what}: references[{i}] must be a string or a non-empty list of strings")
        out.append(refs)
    return out


# ----------------------------------------------------------------------------- BLEU and chrF
def _ref_streams(references: References, what: str) -> list[list[str | None]]:
    """Transpose per-example references into sacrebleu's streams: ``streams[k][i]`` is the k-th
    reference of example i. Examples with fewer references are padded with ``None``, which
    sacrebleu drops (signature then says ``nrefs:var``). Note: sacrebleu only drops ``None``;
    an empty string would count as a real (empty) reference."""
    per_example = _refs_per_example(references, what)
    width = max(len(r) for r in per_example)
    return [[refs[k] if k < len(refs) else None for refs in per_example] for k in range(width)]


def bleu(predictions: Sequence[str], references: References) -> dict[str, Any]:
    """Corpus sacreBLEU with default settings (tokenizer 13a, mixed case, exp smoothing).

    ``references`` holds one string per prediction, or a list of strings per prediction
    (multi-reference). Returns ``bleu`` (0-100), ``bleu_signature`` (as the CLI prints it),
    ``precisions`` (1..4-gram, 0-100), ``brevity_penalty``, ``sys_len`` and ``ref_len``.
    """
    from sacrebleu.metrics import BLEU

    _check_pairs(predictions, references, "bleu")
    metric = BLEU()
    score = metric.corpus_score(list(predictions), _ref_streams(references, "bleu"))
    return {"bleu": score.score, "bleu_signature": str(metric.get_signature()),
            "precisions": list(score.precisions), "brevity_penalty": score.bp,
            "sys_len": score.sys_len, "ref_len": score.ref_len}


def chrf(predictions: Sequence[str], references: References) -> dict[str, Any]:
    """Corpus chrF2 (sacrebleu defaults: 6 char n-grams, no word n-grams, beta 2).

    Same ``references`` shapes as :func:`bleu`. Returns ``chrf`` (0-100) and ``chrf_signature``.
    """
    from sacrebleu.metrics import CHRF

    _check_pairs(predictions, references, "chrf")
    metric = CHRF()
    score = metric.corpus_score(list(predictions), _ref_streams(references, "chrf"))
    return {"chrf": score.score, "chrf_signature": str(metric.get_signature())}


def translation_scores(predictions: Sequence[str], references: References) -> dict[str, Any]:
    """:func:`bleu` and :func:`chrf` merged into one dict."""
    return {**bleu(predictions, references), **chrf(predictions, references)}


# ------------------------------------------------------------------------------------- ROUGE
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: Sequence[str], references: References) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure x 100 (rouge_score, Porter stemmer on).

    * ``rougeLsum`` is summary-level LCS over sentences, and rouge_score splits sentences on
      ``"\\n"`` only. Following the Hugging Face convention, the caller puts one sentence per
      line (e.g. ``"\\n".join(nltk.sent_tokenize(text))``) in both predictions and references;
      text without newlines gives ``rougeLsum == rougeL``.
    * Several references per prediction: each ROUGE type takes, per example, the best
      F-measure over the references (as ``RougeScorer.score_multi`` and HF ``evaluate`` do).
    * The result is the exact mean over examples, not the bootstrap "mid" that HF ``evaluate``
      reports by default (``use_aggregator=True``), which can differ slightly.
    """
    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score logs "Using default tokenizer." each time
    _check_pairs(predictions, references, "rouge")
    per_example = _refs_per_example(references, "rouge")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, refs in zip(predictions, per_example):
        scores = [scorer.score(ref, pred) for ref in refs]  # rouge_score takes (target, prediction)
        for key in ROUGE_TYPES:
            totals[key] += max(s[key].fmeasure for s in scores)
    return {key: 100.0 * total / len(predictions) for key, total in totals.items()}


# ----------------------------------------------------------------------------------- SQuAD v1.1
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Official SQuAD v1.1 normalisation: lower-case, drop ASCII punctuation, drop the articles
    a/an/the (whole words), collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1(prediction: str, ground_truth: str) -> float:
    """Token-overlap F1 (0..1) of the normalised strings, as in the official script (no common
    token, including either side normalising to nothing, gives 0)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred_tokens), num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """SQuAD v1.1 ``exact_match`` and ``f1`` x 100: per question the max over its gold answers,
    then the mean over questions. ``references[i]`` is the list of gold answers (a bare string
    is taken as a single answer)."""
    _check_pairs(predictions, references, "squad_scores")
    golds = _refs_per_example(references, "squad_scores")
    em = sum(max(exact_match(p, g) for g in gs) for p, gs in zip(predictions, golds))
    f = sum(max(f1(p, g) for g in gs) for p, gs in zip(predictions, golds))
    return {"exact_match": 100.0 * em / len(predictions), "f1": 100.0 * f / len(predictions)}


# ---------------------------------------------------------------------------- classification
def _label_order(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> list:
    seen = list(dict.fromkeys([*references, *predictions]))
    try:
        return sorted(seen)
    except TypeError:  # mixed, unorderable label types: keep first-seen order
        return seen


def _safe_div(num: float, den: float) -> float:
    return num / den if den else 0.0


def classification_scores(predictions: Sequence[Hashable], references: Sequence[Hashable],
                          labels: Sequence[Hashable] | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support, all x 100 (support is a count).

    ``labels`` fixes the classes (and their order) that per-class scores and the macro average
    cover; by default every label seen in either list, sorted. Accuracy counts all examples, so a
    prediction outside ``labels`` is simply wrong. A 0/0 ratio (a class never predicted, or never
    present) is 0, as sklearn's ``zero_division=0``.
    """
    _check_pairs(predictions, references, "classification_scores")
    classes = list(labels) if labels is not None else _label_order(predictions, references)
    if not classes:
        raise UserError("classification_scores: labels must not be empty")
    pairs = list(zip(predictions, references))
    per_class = {}
    for c in classes:
        tp = sum(1 for p, r in pairs if p == c and r == c)
        n_pred = sum(1 for p, _ in pairs if p == c)
        n_true = sum(1 for _, r in pairs if r == c)
        precision, recall = _safe_div(tp, n_pred), _safe_div(tp, n_true)
        per_class[c] = {"precision": 100.0 * precision, "recall": 100.0 * recall,
                        "f1": 100.0 * _safe_div(2 * precision * recall, precision + recall),
                        "support": n_true}
    accuracy = sum(1 for p, r in pairs if p == r) / len(pairs)
    macro_f1 = sum(v["f1"] for v in per_class.values()) / len(classes)
    return {"accuracy": 100.0 * accuracy, "macro_f1": macro_f1, "per_class": per_class}


# -------------------------------------------------------------------------------- perplexity
def perplexity_from_nll(total_nll: float, n_tokens: int) -> float:
    """``exp(total_nll / n_tokens)``, with the NLL in nats summed over ``n_tokens`` predicted
    tokens. Returns ``inf`` when the exponent overflows. (The model-side sliding window that
    produces the sums lives with the model code.)"""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens <= 0:
        raise UserError(f"perplexity_from_nll: n_tokens must be a positive integer, got {n_tokens!r}")
    if not math.isfinite(total_nll) or total_nll < 0:
        raise UserError(f"perplexity_from_nll: total_nll must be finite and >= 0, got {total_nll!r}")
    try:
        return math.exp(total_nll / n_tokens)
    except OverflowError:
        return math.inf


# --------------------------------------------------------------------------------- bootstrap
def bootstrap_ci(metric_fn: Callable[[list, list], Any], predictions: Sequence[Any],
                 references: Sequence[Any], n: int = 1000, seed: int = 0, alpha: float = 0.05,
                 key: str | None = None) -> tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` interval of a corpus-level metric.

    Each of the ``n`` resamples draws ``len(predictions)`` example indices with replacement from
    ``numpy.random.default_rng(seed)`` and calls ``metric_fn(preds, refs)`` on them. If the
    metric returns a dict (as the functions here do), ``key`` names the figure to use, e.g.
    ``bootstrap_ci(bleu, hyps, refs, key="bleu")``.
    """
    import numpy as np

    _check_pairs(predictions, references, "bootstrap_ci")
    if not isinstance(n, int) or n < 1:
        raise UserError(f"bootstrap_ci: n must be a positive integer, got {n!r}")
    if not 0.0 < alpha < 1.0:
        raise UserError(f"bootstrap_ci: alpha must be in (0, 1), got {alpha!r}")
    rng = np.random.default_rng(seed)
    size = len(predictions)
    values = []
    for _ in range(n):
        idx = rng.integers(0, size, size=size)
        result = metric_fn([predictions[i] for i in idx], [references[i] for i in idx])
        if isinstance(result, dict):
            if key is None or key not in result:
                raise UserError(f"bootstrap_ci: metric returned keys {sorted(result)}; "
                                f"pass key= naming one of them")
            result = result[key]
        values.append(float(result))
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
