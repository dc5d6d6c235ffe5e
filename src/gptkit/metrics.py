"""Evaluation metrics: thin wrappers over the reference implementations.

Every score is on a 0-100 scale (like sacreBLEU), except :func:`perplexity_from_nll`. Every
public function that takes ``predictions`` and ``references`` raises :class:`UserError` with a
one-line message when they are empty or differ in length.

* BLEU / chrF: ``sacrebleu.metrics.BLEU`` / ``CHRF`` with their defaults (13a tokenizer, exp
  smoothing; chrF2 with 6 char n-grams), so the numbers and signature strings equal the
  ``sacrebleu`` command-line tool's.
* ROUGE: ``rouge_score.rouge_scorer.RougeScorer(use_stemmer=True)``, one sentence per line for
  ROUGE-Lsum (:func:`split_sentences`). Its default tokenizer lower-cases and keeps only
  ``[a-z0-9]``, so text in a non-Latin script scores 0: ``tokenizer="unicode"`` keeps every script.
* SQuAD v1.1 and v2.0: transcriptions of the official evaluation scripts (v2.0 when a question has no answer).
* Classification: plain Python (no sklearn), same conventions as sklearn with ``zero_division=0``;
  macro averages run over the labels present in the references or the predictions (sklearn's default).
* :func:`task_scores` is the one scoring path: fine-tuning validation and test, and `gptkit eval`, call it,
  so a metric name means the same number everywhere.

Library imports (sacrebleu, rouge_score, numpy) happen inside the functions that need them.
"""

from __future__ import annotations

import logging

import math
import re
import string
import unicodedata
from collections import Counter
from typing import Any, Callable, Hashable, Sequence

import regex

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


SCORE_CHUNK = 10_000  # sentences whose n-grams sacrebleu holds at once


def sufficient_stats(metric, predictions: Sequence[str], streams: list[list[str | None]]) -> list:
    """sacrebleu's per-sentence statistics (BLEU: lengths and n-gram matches; chrF: character n-gram counts),
    extracted :data:`SCORE_CHUNK` sentences at a time: its ``corpus_score`` caches the n-grams of every reference
    first (2.6 GB for chrF on 100k sentences). The signature's ``nrefs`` is the corpus's, as corpus_score sets it."""
    out, counts, force = [], set(), metric._force
    metric._force = True  # its "tokenized period" warning is given once below, for the whole corpus
    try:
        for lo in range(0, len(predictions), SCORE_CHUNK):
            out += metric._extract_corpus_statistics(list(predictions[lo : lo + SCORE_CHUNK]),
                                                     [s[lo : lo + SCORE_CHUNK] for s in streams])
            counts.add(metric.num_refs)
    finally:
        metric._force = force
    metric.num_refs = counts.pop() if len(counts) == 1 else -1
    tokenized = sum(p.endswith(" .") for p in predictions)
    if not force and tokenized >= 100:
        logging.getLogger(__name__).warning(
            "%s: %d predictions end in a tokenized period (' .'); sacrebleu expects detokenized text, or the score "
            "is lower", type(metric).__name__, tokenized)
    return out


def _corpus_score(metric, predictions: Sequence[str], references: References, what: str):
    """``metric.corpus_score`` with the statistics summed chunk by chunk (:func:`sufficient_stats`): equal numbers,
    memory bounded by one chunk's n-grams plus a few integers per sentence."""
    streams = _ref_streams(references, what)
    metric._check_corpus_score_args(predictions, streams)
    stats = sufficient_stats(metric, predictions, streams)
    return metric._compute_score_from_stats([sum(col) for col in zip(*stats)])


def bleu(predictions: Sequence[str], references: References) -> dict[str, Any]:
    """Corpus sacreBLEU with default settings (tokenizer 13a, mixed case, exp smoothing).

    ``references`` holds one string per prediction, or a list of strings per prediction
    (multi-reference). Returns ``bleu`` (0-100), ``bleu_signature`` (as the CLI prints it),
    ``precisions`` (1..4-gram, 0-100), ``brevity_penalty``, ``sys_len`` and ``ref_len``.
    """
    from sacrebleu.metrics import BLEU

    _check_pairs(predictions, references, "bleu")
    metric = BLEU()
    score = _corpus_score(metric, predictions, references, "bleu")
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
    score = _corpus_score(metric, predictions, references, "chrf")
    return {"chrf": score.score, "chrf_signature": str(metric.get_signature())}


def translation_scores(predictions: Sequence[str], references: References) -> dict[str, Any]:
    """:func:`bleu` and :func:`chrf` merged into one dict."""
    return {**bleu(predictions, references), **chrf(predictions, references)}


# ------------------------------------------------------------------------------------- ROUGE
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_TOKENIZERS = ("default", "unicode")

_ABBREVIATIONS = frozenset("mr mrs ms dr prof sr jr st vs etc fig figs eq eqs al e.g i.e cf vol pp ca approx "
                           "inc ltd co corp dept univ jan feb mar apr jun jul aug sep sept oct nov dec".split())
_SENTENCE_END = re.compile(r"""(?<=[.!?])["'”’)\]]*\s+|(?<=[。！？])["'”’」』)\]]*\s*""")  # CJK: no space needed
_ACRONYM = re.compile(r"(?:[a-z]\.)+[a-z]")  # u.s, e.g (the final period is stripped before matching)


def split_sentences(text: str) -> list[str]:
    """Rule-based sentence splitter (no model download): existing line breaks, then after ``. ! ?`` (and CJK
    full stops) followed by whitespace, unless the word before the period is a common abbreviation (Dr., e.g.,
    Fig.) an initial or a dotted acronym (J., U.S.). Used to put one sentence per line before ROUGE-Lsum, as nltk's
    ``sent_tokenize`` does in the Hugging Face summarization examples."""
    out: list[str] = []
    for line in text.splitlines():
        start = 0
        for m in _SENTENCE_END.finditer(line):
            words = line[start : m.start()].split()
            last = words[-1].rstrip(".!?\"'”’)]").lower() if words else ""
            initial = len(last) == 1 and last.isalpha() and last != "i" or _ACRONYM.fullmatch(last)  # J. R. / U.S.
            if line[m.start() - 1] == "." and (last in _ABBREVIATIONS or initial):
                continue
            out.append(line[start : m.start()].strip())
            start = m.end()
        out.append(line[start:].strip())
    return [s for s in out if s]


class UnicodeTokenizer:
    """A rouge_score tokenizer for any script: lower-cased runs of Unicode letters, combining marks and digits,
    in NFC form, each CJK ideograph or kana on its own (those scripts do not separate words). Marks belong to
    their words: Devanagari "हिन्दी" and "हिन्दू" differ only in them (``\\w`` leaves marks out), and a decomposed
    "café" is the composed one. With ``use_stemmer``, ASCII words longer than 3 letters go through the Porter
    stemmer, as rouge_score's default tokenizer does."""

    _CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    _TOKEN = regex.compile(f"[{_CJK}]|[[\\p{{L}}\\p{{M}}\\p{{N}}]--[{_CJK}]]+", regex.V1)

    def __init__(self, use_stemmer: bool = False):
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        tokens = self._TOKEN.findall(unicodedata.normalize("NFC", text).lower())
        if self._stemmer is None:
            return tokens
        return [self._stemmer.stem(t) if len(t) > 3 and t.isascii() else t for t in tokens]


def rouge(predictions: Sequence[str], references: References, *,
          sentence_splitter: Callable[[str], list[str]] | None = split_sentences,
          tokenizer: str = "default") -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure x 100 (rouge_score, Porter stemmer on).

    * ``rougeLsum`` is summary-level LCS over sentences; rouge_score finds sentences at line breaks only, so
      predictions and references are first put one sentence per line by ``sentence_splitter`` (default
      :func:`split_sentences`, rule-based, offline; ``None`` keeps the text's own lines). ROUGE-1/2/L do not
      see line breaks, so they are unchanged by it.
    * ``tokenizer``: ``"default"`` is rouge_score's (lower-case, keeps only ``[a-z0-9]``: text in a
      non-Latin script scores 0; use it for English, as papers do); ``"unicode"`` is :class:`UnicodeTokenizer`.
    * Several references per prediction: each ROUGE type takes, per example, the best F-measure over the
      references (as ``RougeScorer.score_multi`` and HF ``evaluate`` do).
    * The result is the exact mean over examples, not the bootstrap "mid" that HF ``evaluate`` reports by
      default (``use_aggregator=True``), which can differ slightly.
    """
    each = rouge_per_example(predictions, references, sentence_splitter=sentence_splitter, tokenizer=tokenizer)
    return {key: sum(values) / len(values) for key, values in each.items()}


def rouge_per_example(predictions: Sequence[str], references: References, *,
                      sentence_splitter: Callable[[str], list[str]] | None = split_sentences,
                      tokenizer: str = "default") -> dict[str, list[float]]:
    """Per example, each ROUGE type's F-measure x 100 (best over its references); :func:`rouge` is their mean."""
    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score logs "Using default tokenizer." each time
    _check_pairs(predictions, references, "rouge")
    if tokenizer not in ROUGE_TOKENIZERS:
        raise UserError(f"rouge: tokenizer must be one of {', '.join(ROUGE_TOKENIZERS)}, got {tokenizer!r}")
    per_example = _refs_per_example(references, "rouge")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True,
                                      tokenizer=UnicodeTokenizer(use_stemmer=True) if tokenizer == "unicode" else None)
    lines = (lambda t: "\n".join(sentence_splitter(t))) if sentence_splitter else (lambda t: t)
    out: dict[str, list[float]] = {key: [] for key in ROUGE_TYPES}
    for pred, refs in zip(predictions, per_example):
        scores = [scorer.score(lines(ref), lines(pred)) for ref in refs]  # rouge_score takes (target, prediction)
        for key in ROUGE_TYPES:
            out[key].append(100.0 * max(s[key].fmeasure for s in scores))
    return out


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
    _refs_per_example(references, "squad_scores")  # every question has an answer (else squad_v2_scores)
    return {k: sum(v) / len(v) for k, v in squad_per_example(predictions, references).items()}


def no_answer_data(references: Sequence) -> bool:
    """SQuAD v2 data: some question has no gold answer (an empty list)."""
    return any(not isinstance(r, str) and len(r) == 0 for r in references)


def squad_per_example(predictions: Sequence[str], references: Sequence[Sequence[str]], v2: bool = False
                      ) -> dict[str, list[float]]:
    """Per question ``exact_match`` and ``f1`` x 100, the max over its gold answers: SQuAD v1.1's, or with ``v2``
    or when some question has no answer (:func:`no_answer_data`) the official SQuAD v2.0 script's — a question with
    no gold answer, or only answers that normalise to nothing, has the one gold ``""``, so the empty prediction
    scores 100 there and 0 elsewhere (F1 is 100 only when neither side has a token)."""
    _check_pairs(predictions, references, "squad_scores")
    if not (v2 or no_answer_data(references)):
        golds = _refs_per_example(references, "squad_scores")
        return {"exact_match": [100.0 * max(exact_match(p, g) for g in gs) for p, gs in zip(predictions, golds)],
                "f1": [100.0 * max(f1(p, g) for g in gs) for p, gs in zip(predictions, golds)]}
    references = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    for i, ref in enumerate(references):
        if not all(isinstance(r, str) for r in ref):
            raise UserError(f"squad_scores: references[{i}] must be a string or a list of strings (empty: no answer)")

    def f1_v2(pred: str, gold: str) -> float:
        p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
        return float(p == g) if not p or not g else f1(pred, gold)

    golds = [[g for g in refs if normalize_answer(g)] or [""] for refs in references]
    return {"exact_match": [100.0 * max(exact_match(p, g) for g in gs) for p, gs in zip(predictions, golds)],
            "f1": [100.0 * max(f1_v2(p, g) for g in gs) for p, gs in zip(predictions, golds)]}


def squad_v2_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """The official SQuAD v2.0 script's figures x 100 (without its no-answer probabilities: "" is the abstention):
    ``exact_match`` and ``f1`` over every question (:func:`squad_per_example`), then ``HasAns_*`` and ``NoAns_*``
    over the questions that have a gold answer or not (each where there is one)."""
    each = squad_per_example(predictions, references, v2=True)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    out = {k: mean(v) for k, v in each.items()}
    for name, has in (("HasAns", True), ("NoAns", False)):
        idx = [i for i, r in enumerate(references) if bool(r) == has]
        if idx:
            out[f"{name}_exact"] = mean([each["exact_match"][i] for i in idx])
            out[f"{name}_f1"] = mean([each["f1"][i] for i in idx])
    return out


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

    ``labels=None`` (what gptkit always uses): the classes are every label present in the references
    or the predictions, sorted — scikit-learn's default for ``f1_score(average="macro")``, so a class
    that is predicted but never true counts with F1 0. Given ``labels`` fixes the classes (and their
    order) that per-class scores and the macro average cover. Accuracy counts all examples. A 0/0
    ratio (a class never predicted, or never present) is 0, as sklearn's ``zero_division=0``.
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


# ------------------------------------------------------------------------------ the task figures
PER_CLASS_UP_TO = 20  # classes whose precision/recall/F1 are reported one by one (beyond: accuracy, macro-F1)
TASK_METRICS = {"translate": ("bleu", "chrf"), "summarize": ROUGE_TYPES, "qa": ("exact_match", "f1"),
                "classify": ("accuracy", "macro_f1")}
SQUAD_V2_METRICS = ("HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1")  # qa, with questions without an answer


def label_keys(labels) -> dict[str, str]:
    """Each class label as part of a metric name (letters, digits, - and _), distinct: labels that read the same
    once cleaned (``:)`` and ``:(``) are told apart by a counter (``_``, ``_2``)."""
    keys: dict[str, str] = {}
    for label in labels:
        key = stem = re.sub(r"[^A-Za-z0-9_-]+", "_", str(label)).strip("_") or "_"
        n = 1
        while key in keys.values():
            n += 1
            key = f"{stem}_{n}"
        keys[label] = key
    return keys


def task_scores(task: str, predictions: Sequence, references: Sequence, *, rouge_tokenizer: str = "default",
                no_answer: bool = False) -> dict[str, float]:
    """The figures of a task, as fine-tuning validation/test and `gptkit eval` report them: translate: bleu, chrf;
    summarize: rouge1/2/L/Lsum; qa: exact_match, f1 (``references``: lists of gold answers; when one is empty, the
    SQuAD v2.0 figures, HasAns_/NoAns_ too); classify: accuracy,
    macro_f1 (labels present in references or predictions) and, up to 20 classes, precision_/recall_/f1_<label>."""
    if task == "translate":
        out = translation_scores(predictions, references)
    elif task == "summarize":
        out = rouge(predictions, references, tokenizer=rouge_tokenizer)
    elif task == "qa":
        if no_answer or no_answer_data(references):  # SQuAD v2: some have no answer (or the model was taught so)
            return squad_v2_scores(predictions, references)
        out = squad_scores(predictions, references)
    elif task == "classify":
        full = classification_scores([str(p) for p in predictions], [str(r) for r in references])
        per_class = full["per_class"] if len(full["per_class"]) <= PER_CLASS_UP_TO else {}
        keys = label_keys(per_class)
        return {"accuracy": full["accuracy"], "macro_f1": full["macro_f1"],
                **{f"{k}_{keys[c]}": m[k] for c, m in per_class.items() for k in ("precision", "recall", "f1")}}
    else:
        raise UserError(f"task_scores: unknown task {task!r}; expected one of {', '.join(TASK_METRICS)}")
    return {k: out[k] for k in TASK_METRICS[task]}


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
