"""gptkit.metrics equals the reference tools: the sacrebleu CLI, rouge_score, the SQuAD v1.1
script's definitions (hand-computed) and hand-computed classification scores."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from rouge_score import rouge_scorer

from gptkit import metrics
from gptkit.errors import UserError

# Targets of the first lines of Multi30k en-de validation (copied here: tests must not read
# /work/shared), with hand-made "system outputs" and a second, paraphrased reference.
TARGETS = [
    "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen",
    "Ein Mann schläft in einem grünen Raum auf einem Sofa.",
    "Ein Junge mit Kopfhörern sitzt auf den Schultern einer Frau.",
    "Zwei Männer bauen eine blaue Eisfischerhütte auf einem zugefrorenen See auf",
    "Ein Mann mit beginnender Glatze, der eine rote Rettungsweste trägt, sitzt in einem kleinen Boot.",
    "Ein brauner Hund rennt dem schwarzen Hund hinterher.",
]
HYPOTHESES = [
    "Eine Gruppe Männer lädt Baumwolle auf einen LKW",
    "Ein Mann schläft auf einem Sofa in einem grünen Zimmer.",
    "Ein Junge mit Kopfhörern sitzt auf den Schultern einer Frau.",
    "Zwei Männer bauen eine blaue Hütte auf einem gefrorenen See",
    "Ein Mann mit Glatze sitzt in einem kleinen Boot.",
    "Ein Hund rennt.",
]
SECOND_REFS = [
    "Mehrere Männer laden Baumwolle auf einen LKW",
    "Ein Mann schläft auf einem Sofa in einem grünen Zimmer.",
    "Ein Junge mit Kopfhörern sitzt auf den Schultern einer Frau.",
    "Zwei Männer errichten eine blaue Hütte zum Eisfischen auf einem gefrorenen See",
    "Ein kahl werdender Mann in roter Schwimmweste sitzt in einem kleinen Boot.",
    "Ein brauner Hund läuft hinter einem schwarzen Hund her.",
]


# ------------------------------------------------------------------------- sacrebleu CLI oracle
def sacrebleu_cli(tmp_path, hyps: list[str], ref_streams: list[list[str]]) -> dict[str, dict]:
    """Run the sacrebleu command-line tool on files; return {"BLEU": {...}, "chrF2": {...}}."""
    hyp_file = tmp_path / "hyp.txt"
    hyp_file.write_text("\n".join(hyps) + "\n", encoding="utf-8")
    ref_files = []
    for k, stream in enumerate(ref_streams):
        ref_files.append(tmp_path / f"ref{k}.txt")
        ref_files[-1].write_text("\n".join(stream) + "\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "sacrebleu", *map(str, ref_files), "-i", str(hyp_file),
           "-m", "bleu", "chrf", "-w", "6", "--format", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return {entry["name"]: entry for entry in json.loads(out)}


def cli_lengths(entry: dict) -> tuple[int, int]:
    m = re.search(r"hyp_len = (\d+) ref_len = (\d+)", entry["verbose_score"])
    return int(m.group(1)), int(m.group(2))


def assert_matches_cli(ours: dict, cli: dict) -> None:
    assert ours["bleu"] == pytest.approx(cli["BLEU"]["score"], abs=1e-5)
    assert ours["bleu_signature"] == cli["BLEU"]["signature"]
    assert (ours["sys_len"], ours["ref_len"]) == cli_lengths(cli["BLEU"])
    assert ours["chrf"] == pytest.approx(cli["chrF2"]["score"], abs=1e-5)
    assert ours["chrf_signature"] == cli["chrF2"]["signature"]


def test_bleu_chrf_single_reference_equal_cli(tmp_path):
    ours = metrics.translation_scores(HYPOTHESES, TARGETS)
    cli = sacrebleu_cli(tmp_path, HYPOTHESES, [TARGETS])
    assert_matches_cli(ours, cli)
    assert "nrefs:1|" in ours["bleu_signature"] and "tok:13a" in ours["bleu_signature"]
    assert 0 < ours["bleu"] < 100 and 0 < ours["chrf"] < 100
    # Same figures from the separate functions, and list-of-one references are the same thing.
    assert metrics.bleu(HYPOTHESES, [[t] for t in TARGETS])["bleu"] == ours["bleu"]
    assert metrics.chrf(HYPOTHESES, TARGETS)["chrf"] == ours["chrf"]


def test_bleu_chrf_multi_reference_equal_cli(tmp_path):
    refs = [[a, b] for a, b in zip(TARGETS, SECOND_REFS)]
    ours = metrics.translation_scores(HYPOTHESES, refs)
    assert_matches_cli(ours, sacrebleu_cli(tmp_path, HYPOTHESES, [TARGETS, SECOND_REFS]))
    assert "nrefs:2|" in ours["bleu_signature"]
    # The second reference helps, so a wrong transpose (streams = examples) could not match.
    assert ours["bleu"] > metrics.bleu(HYPOTHESES, TARGETS)["bleu"]


def test_bleu_variable_number_of_references(tmp_path):
    # Last example has one reference only; its hypothesis is short and the reference long, so
    # padding with "" (an empty reference is the closest length) would change ref_len and BLEU.
    refs = [[a, b] for a, b in zip(TARGETS[:-1], SECOND_REFS[:-1])] + [[TARGETS[-1]]]
    ours = metrics.translation_scores(HYPOTHESES, refs)
    assert "nrefs:var|" in ours["bleu_signature"]
    # Repeating an example's reference changes neither BLEU nor chrF: compare with the CLI on
    # two full streams, then only the nrefs field of the signature differs.
    cli = sacrebleu_cli(tmp_path, HYPOTHESES, [TARGETS, SECOND_REFS[:-1] + [TARGETS[-1]]])
    for name in ("BLEU", "chrF2"):
        cli[name]["signature"] = cli[name]["signature"].replace("nrefs:2|", "nrefs:var|")
    assert_matches_cli(ours, cli)


def test_bleu_chrf_in_chunks_equal_cli_and_hold_less(tmp_path, monkeypatch):
    # Statistics summed chunk by chunk (chunks of 4 here) give the CLI's numbers, with a variable number of
    # references changing between chunks; and the corpus's reference n-grams are never held at once.
    import tracemalloc

    monkeypatch.setattr(metrics, "SCORE_CHUNK", 4)
    hyps = HYPOTHESES * 3
    refs = [[t, s] for t, s in zip(TARGETS, SECOND_REFS)] + [[t] for t in TARGETS] * 2
    ours = metrics.translation_scores(hyps, refs)
    assert "nrefs:var|" in ours["bleu_signature"]
    cli = sacrebleu_cli(tmp_path, hyps, [[r[0] for r in refs], [r[-1] for r in refs]])
    for name in ("BLEU", "chrF2"):
        cli[name]["signature"] = cli[name]["signature"].replace("nrefs:2|", "nrefs:var|")
    assert_matches_cli(ours, cli)

    from sacrebleu.metrics import CHRF

    many = [f"{t} {i}" for i in range(300) for t in TARGETS]
    monkeypatch.setattr(metrics, "SCORE_CHUNK", 100)
    peaks = []
    for score in (lambda: metrics.chrf(many[::-1], many)["chrf"], lambda: CHRF().corpus_score(many[::-1], [many]).score):
        tracemalloc.start()
        value = score()
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert value == pytest.approx(metrics.chrf(many[::-1], many)["chrf"], abs=1e-9)
    assert peaks[0] < 0.25 * peaks[1], peaks


def test_bleu_perfect_and_disjoint():
    assert metrics.bleu(TARGETS, TARGETS)["bleu"] == pytest.approx(100.0)
    assert metrics.bleu(["xyz qqq"], ["abc def"])["bleu"] == pytest.approx(0.0)


# ------------------------------------------------------------------------------------- ROUGE
def reference_rouge(preds, refs, use_stemmer=True):
    scorer = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), use_stemmer=use_stemmer)
    scores = [scorer.score(r, p) for p, r in zip(preds, refs)]
    return {k: 100 * float(np.mean([s[k].fmeasure for s in scores])) for k in metrics.ROUGE_TYPES}


ROUGE_PREDS = [
    "the cat is running in the garden",
    "police arrested three men on friday after a long chase",
    "the dog barked loudly.\nthe cat sat on the mat.",
]
ROUGE_REFS = [
    "a cat runs through the garden",
    "three men were arrested by police after a chase on friday",
    "the cat sat on a mat.\nthe dog barked.\nthe bird sang.",
]


def test_rouge_equals_rouge_score():
    ours = metrics.rouge(ROUGE_PREDS, ROUGE_REFS)
    assert set(ours) == set(metrics.ROUGE_TYPES)
    for key, value in reference_rouge(ROUGE_PREDS, ROUGE_REFS).items():
        assert ours[key] == pytest.approx(value, abs=1e-9)


def test_rouge_uses_stemmer():
    pred, ref = ["the cat is running"], ["the cat runs"]
    ours = metrics.rouge(pred, ref)
    # the/cat/run match after Porter stemming: P = 3/4, R = 3/3.
    assert ours["rouge1"] == pytest.approx(100 * 6 / 7)
    assert ours["rouge1"] == pytest.approx(reference_rouge(pred, ref)["rouge1"])
    assert ours["rouge1"] != pytest.approx(reference_rouge(pred, ref, use_stemmer=False)["rouge1"])


def test_rouge_lsum_splits_sentences_on_newlines():
    pred, ref = [ROUGE_PREDS[2]], [ROUGE_REFS[2]]
    ours = metrics.rouge(pred, ref)
    assert ours["rougeLsum"] == pytest.approx(reference_rouge(pred, ref)["rougeLsum"])
    assert ours["rougeLsum"] > ours["rougeL"]  # sentence order swapped: summary-level LCS wins
    flat = metrics.rouge([pred[0].replace("\n", " ")], [ref[0].replace("\n", " ")], sentence_splitter=None)
    assert flat["rougeLsum"] == pytest.approx(flat["rougeL"]) == pytest.approx(ours["rougeL"])


def test_rouge_lsum_splits_running_text_into_sentences():
    """Summaries as models write them (sentences on one line): Lsum is computed over the sentences found, as
    rouge_score computes it when given one sentence per line; ROUGE-1/2/L do not change."""
    pred = ["The dog barked loudly. The cat sat on the mat."]
    ref = ["The cat sat on a mat. The dog barked! Dr. Smith saw it, e.g. from the U.S. embassy."]
    ours = metrics.rouge(pred, ref)
    lines = ["The dog barked loudly.\nThe cat sat on the mat.",
             "The cat sat on a mat.\nThe dog barked!\nDr. Smith saw it, e.g. from the U.S. embassy."]
    assert metrics.split_sentences(ref[0]) == lines[1].split("\n")
    direct = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True).score(lines[1], lines[0])["rougeLsum"]
    assert ours["rougeLsum"] == pytest.approx(100 * direct.fmeasure, abs=1e-9)
    assert ours["rougeLsum"] > ours["rougeL"]
    for key in ("rouge1", "rouge2", "rougeL"):
        assert ours[key] == pytest.approx(reference_rouge(pred, ref)[key], abs=1e-9)


def test_rouge_multi_reference_takes_best_per_example():
    preds = ROUGE_PREDS[:2]
    refs = [[ROUGE_REFS[1], ROUGE_REFS[0]], [ROUGE_REFS[1], "unrelated words only"]]
    ours = metrics.rouge(preds, refs)
    # The best reference of each example is its matching one.
    for key, value in reference_rouge(preds, ROUGE_REFS[:2]).items():
        assert ours[key] == pytest.approx(value)
    scorer = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), use_stemmer=True)
    multi = [scorer.score_multi(r, p) for p, r in zip(preds, refs)]
    for key in metrics.ROUGE_TYPES:
        assert ours[key] == pytest.approx(100 * np.mean([m[key].fmeasure for m in multi]))


def test_rouge_tokenizer_drops_non_ascii_unless_unicode():
    # Documented rouge_score behaviour: only [a-z0-9] survive its default tokenisation.
    assert metrics.rouge(["Хорошо сказано"], ["Хорошо сказано"])["rouge1"] == 0.0

    class Whitespace:  # what any-script tokenisation must give on lower-case, punctuation-free text
        def tokenize(self, text):
            return text.lower().split()

    pred, ref = "кошка сидит на ковре", "кошка сидела на ковре утром"
    ours = metrics.rouge([pred], [ref], tokenizer="unicode")
    direct = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), tokenizer=Whitespace()).score(ref, pred)
    for key in metrics.ROUGE_TYPES:
        assert ours[key] == pytest.approx(100 * direct[key].fmeasure, abs=1e-9) and ours[key] > 0
    # English text scores as with rouge_score's own tokenizer (same stemming of ASCII words)
    assert metrics.rouge(ROUGE_PREDS, ROUGE_REFS, tokenizer="unicode") == pytest.approx(metrics.rouge(ROUGE_PREDS, ROUGE_REFS))
    assert metrics.UnicodeTokenizer().tokenize("猫が座った") == ["猫", "が", "座", "っ", "た"]
    # combining marks belong to their words (Devanagari vowel signs, viramas; decomposed accents)
    pred, ref = "यह एक अच्छा दिन है", "यह अच्छा दिन था"
    ours = metrics.rouge([pred], [ref], tokenizer="unicode")
    direct = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), tokenizer=Whitespace()).score(ref, pred)
    assert all(ours[key] == pytest.approx(100 * direct[key].fmeasure, abs=1e-9) for key in metrics.ROUGE_TYPES)
    assert metrics.rouge(["हिन्दी"], ["हिन्दू"], tokenizer="unicode")["rouge1"] == 0.0  # "Hindi" is not "Hindu"
    assert metrics.rouge(["cafe\u0301 noir"], ["café noir"], tokenizer="unicode")["rouge2"] == 100.0


# ----------------------------------------------------------------------------------- SQuAD v1.1
@pytest.mark.parametrize("raw, expected", [
    ("The  Quick, Brown FOX.", "quick brown fox"),
    ("an apple a day", "apple day"),
    ("theatre another thesis", "theatre another thesis"),  # articles only as whole words
    ("A-ha!", "aha"),  # punctuation goes before articles are looked for
    ("  \tNew\nYork ", "new york"),
    ("the", ""),
])
def test_normalize_answer(raw, expected):
    assert metrics.normalize_answer(raw) == expected


def test_exact_match_and_f1_by_hand():
    assert metrics.exact_match("the Eiffel Tower!", "Eiffel tower") == 1.0
    assert metrics.exact_match("in Paris, France", "Paris") == 0.0
    assert metrics.f1("in Paris, France", "Paris") == pytest.approx(0.5)  # P 1/3, R 1
    assert metrics.f1("the cat cat cat", "cat sat") == pytest.approx(0.4)  # 1 shared: P 1/3, R 1/2
    assert metrics.f1("a", "the") == 0.0  # both normalise to nothing


def test_squad_scores_max_over_gold_answers():
    preds = ["Paris France", "in Paris, France", "Denver Broncos"]
    golds = [["Paris", "Paris, France"], ["Paris"], ["Carolina Panthers", "Panthers"]]
    scores = metrics.squad_scores(preds, golds)
    assert scores["exact_match"] == pytest.approx(100 * 1 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)


def _official_v2(dataset: list[tuple[str, list[str]]], preds: list[str]) -> dict:
    """The SQuAD v2.0 script's get_raw_scores + make_eval_dict (na_prob 0: no threshold applies), as written there."""
    import collections
    import re
    import string

    def normalize_answer(s):
        s = s.lower()
        s = "".join(ch for ch in s if ch not in set(string.punctuation))
        s = re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", s)
        return " ".join(s.split())

    def get_tokens(s):
        return normalize_answer(s).split() if s else []

    def compute_exact(a_gold, a_pred):
        return int(normalize_answer(a_gold) == normalize_answer(a_pred))

    def compute_f1(a_gold, a_pred):
        gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
        common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
        num_same = sum(common.values())
        if len(gold_toks) == 0 or len(pred_toks) == 0:
            return int(gold_toks == pred_toks)
        if num_same == 0:
            return 0
        precision, recall = 1.0 * num_same / len(pred_toks), 1.0 * num_same / len(gold_toks)
        return (2 * precision * recall) / (precision + recall)

    exact, f1, has = {}, {}, {}
    for qid, ((_, answers), a_pred) in enumerate(zip(dataset, preds)):
        gold_answers = [a for a in answers if normalize_answer(a)] or [""]
        exact[qid] = max(compute_exact(a, a_pred) for a in gold_answers)
        f1[qid] = max(compute_f1(a, a_pred) for a in gold_answers)
        has[qid] = bool(answers)
    out = {"exact": 100.0 * sum(exact.values()) / len(exact), "f1": 100.0 * sum(f1.values()) / len(f1)}
    for name, value in (("HasAns", True), ("NoAns", False)):
        ids = [k for k in has if has[k] == value]
        if ids:
            out[f"{name}_exact"] = 100.0 * sum(exact[k] for k in ids) / len(ids)
            out[f"{name}_f1"] = 100.0 * sum(f1[k] for k in ids) / len(ids)
    return out


def test_squad_v2_equals_the_official_script():
    """Questions without an answer: "" is right there and wrong elsewhere; a gold that normalises to nothing counts
    as no answer (but the question still counts as HasAns, as in the script)."""
    data = [("q", ["Paris", "Paris, France"]), ("q", []), ("q", []), ("q", ["Denver Broncos"]), ("q", ["the"]),
            ("q", ["in 1990"]), ("q", [])]
    preds = ["Paris France", "", "Chicago", "", "", "1990", "the"]
    ours, official = metrics.squad_v2_scores(preds, [a for _, a in data]), _official_v2(data, preds)
    assert ours == pytest.approx({("exact_match" if k == "exact" else k): v for k, v in official.items()})
    assert ours["NoAns_exact"] == pytest.approx(200 / 3) and ours["HasAns_exact"] == pytest.approx(50.0)  # "Paris France", "the"
    # the task's one scoring path switches to v2 when a question has no answer; v1 data scores as before
    assert metrics.task_scores("qa", preds, [a for _, a in data]) == ours
    assert metrics.task_scores("qa", ["Paris"], [["Paris"]]) == {"exact_match": 100.0, "f1": 100.0}
    assert metrics.task_scores("qa", ["Ada", ""], ["Ada", []])["exact_match"] == 100.0  # a bare string: one answer


# ------------------------------------------------------------------------------ classification
def test_classification_by_hand_with_never_predicted_class():
    refs = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "a", "a"]
    s = metrics.classification_scores(preds, refs)
    assert s["accuracy"] == pytest.approx(50.0)
    pc = s["per_class"]
    assert list(pc) == ["a", "b", "c"]
    assert (pc["a"]["precision"], pc["a"]["recall"]) == (pytest.approx(50.0), pytest.approx(200 / 3))
    assert pc["a"]["f1"] == pytest.approx(400 / 7)
    assert pc["b"] == {"precision": 50.0, "recall": 50.0, "f1": 50.0, "support": 2}
    assert pc["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert s["macro_f1"] == pytest.approx(100 * (4 / 7 + 1 / 2 + 0) / 3)


def test_classification_explicit_labels():
    refs, preds = [0, 0, 1, 1], [0, 1, 1, 7]  # 7 is outside labels: just a wrong prediction
    s = metrics.classification_scores(preds, refs, labels=[1, 0, 2])
    assert list(s["per_class"]) == [1, 0, 2]
    assert s["accuracy"] == pytest.approx(50.0)
    # class 0: P 1/1 R 1/2 F 2/3; class 1: P 1/2 R 1/2 F 1/2; class 2: absent, 0.
    assert s["macro_f1"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 0) / 3)
    assert s["per_class"][2]["support"] == 0


def test_per_class_metric_names_stay_distinct():
    """Labels that clean to the same metric name (``:(`` and ``:)``, in label order) keep one figure each."""
    s = metrics.task_scores("classify", [":)", ":(", ":(", "pos"], [":)", ":)", ":(", "pos"])
    assert (s["precision__"], s["recall__"], s["precision___2"], s["recall___2"]) == (50.0, 100.0, 100.0, 50.0), s
    assert s["f1_pos"] == 100.0 and len(s) == 2 + 3 * 3


# ------------------------------------------------------------------- perplexity and bootstrap
def test_perplexity_from_nll():
    assert metrics.perplexity_from_nll(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert metrics.perplexity_from_nll(0.0, 3) == 1.0
    assert metrics.perplexity_from_nll(1e6, 1) == math.inf
    for bad in [(1.0, 0), (1.0, -2), (float("nan"), 3), (-1.0, 3)]:
        with pytest.raises(UserError):
            metrics.perplexity_from_nll(*bad)


def test_bootstrap_ci_is_seeded_resampling_of_examples():
    preds = [float(x) for x in np.random.default_rng(123).normal(size=40)]
    refs = [0.0] * 40

    def mean_abs_error(p, r):
        return sum(abs(a - b) for a, b in zip(p, r)) / len(p)

    low, high = metrics.bootstrap_ci(mean_abs_error, preds, refs, n=200, seed=3)
    rng = np.random.default_rng(3)
    values = []
    for _ in range(200):
        idx = rng.integers(0, len(preds), size=len(preds))
        values.append(mean_abs_error([preds[i] for i in idx], [refs[i] for i in idx]))
    assert (low, high) == tuple(np.quantile(values, [0.025, 0.975]))
    assert low < mean_abs_error(preds, refs) < high
    assert metrics.bootstrap_ci(mean_abs_error, preds, refs, n=200, seed=4) != (low, high)
    narrow = metrics.bootstrap_ci(mean_abs_error, preds, refs, n=200, seed=3, alpha=0.5)
    assert low < narrow[0] < narrow[1] < high


def test_bootstrap_ci_dict_metric_needs_key():
    preds, refs = list("aabbaabbab"), list("aaaabbbbbb")

    def accuracy(p, r):
        return metrics.classification_scores(p, r)["accuracy"]

    via_key = metrics.bootstrap_ci(metrics.classification_scores, preds, refs, n=100, seed=1,
                                   key="accuracy")
    assert via_key == metrics.bootstrap_ci(accuracy, preds, refs, n=100, seed=1)
    with pytest.raises(UserError, match="key="):
        metrics.bootstrap_ci(metrics.classification_scores, preds, refs, n=5)


def test_bootstrap_ci_on_bleu():
    low, high = metrics.bootstrap_ci(metrics.bleu, HYPOTHESES, TARGETS, n=50, key="bleu")
    assert low <= metrics.bleu(HYPOTHESES, TARGETS)["bleu"] <= high


# ------------------------------------------------------------------------------------ errors
PAIRED = [metrics.bleu, metrics.chrf, metrics.translation_scores, metrics.rouge,
          metrics.squad_scores, metrics.classification_scores,
          lambda p, r: metrics.bootstrap_ci(lambda a, b: 0.0, p, r, n=2)]


@pytest.mark.parametrize("fn", PAIRED)
@pytest.mark.parametrize("preds, refs, message", [
    (["a", "b"], [["a"]], "2 predictions but 1 references"),
    ([], [], "non-empty"),
    (["a"], [], "non-empty"),
    ("abc", ["a", "b", "c"], "must be a list"),
])
def test_bad_inputs_raise_user_error(fn, preds, refs, message):
    with pytest.raises(UserError, match=message):
        fn(preds, refs)


def test_empty_reference_list_for_an_example_raises():
    for fn in (metrics.bleu, metrics.rouge, metrics.squad_scores):
        with pytest.raises(UserError, match=r"references\[1\]"):
            fn(["a", "b"], [["a"], []])


def test_sentence_splitter_edge_cases_and_cjk_tokens():
    assert metrics.split_sentences("The value was 3.5. Next one. I said no. He left.") == [
        "The value was 3.5.", "Next one.", "I said no.", "He left."]
    assert metrics.split_sentences("今天天气很好。我们去公园！好吗？") == ["今天天气很好。", "我们去公园！", "好吗？"]
    # CJK characters are tokens of their own even beside digits and Latin letters
    assert metrics.UnicodeTokenizer().tokenize("2023年5月 GPT模型") == ["2023", "年", "5", "月", "gpt", "模", "型"]
