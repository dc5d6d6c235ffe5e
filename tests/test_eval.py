"""`gptkit eval`: scores equal the reference tools, predictions stream and resume, perplexity is the
strided sliding window, bad input is one line. Tiny models are built in code (random weights, char
tokenizer); nothing is downloaded."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import assert_user_error, run_cli
from tasks_helpers import translate_rows, write_jsonl

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'\n0123456789:;=>"))
VENV_BIN = Path(sys.executable).parent

HYPS = ["The cat sat on the mat.", "A quick brown fox jumps over the dog.", "I like green eggs and ham",
        "Hello there, general Kenobi!", "the weather is nice today", "We will meet at noon tomorrow.",
        "Nothing in common here", "Der Hund bellt laut."]
REFS = ["The cat is sitting on the mat.", "The quick brown fox jumps over the lazy dog.", "I do like green eggs and ham.",
        "Hello there, General Kenobi!", "The weather is lovely today.", "We meet tomorrow at noon.",
        "Completely different sentence", "Der Hund bellt sehr laut."]


# ------------------------------------------------------------------------------------------ helpers
def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


def gpt2_config(**overrides):
    from transformers import GPT2Config

    cfg = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(CHARS) + 1, bos_token_id=0,
               eos_token_id=0, pad_token_id=0, initializer_range=0.2)
    return GPT2Config(**{**cfg, **overrides})


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """A random-weight 2-layer GPT-2 with a character tokenizer, saved like any local checkpoint."""
    from transformers import GPT2LMHeadModel

    path = tmp_path_factory.mktemp("lm") / "model"
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config()).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def test_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "test.jsonl", translate_rows(20, 3))


def ok(*args: str) -> str:
    code, out, err = run_cli(*args)
    assert code == 0, err
    return out


def score_files(tmp: Path, task: str, preds: list, refs: list[dict], *extra: str) -> dict:
    p = write_jsonl(tmp / f"{task}-pred.jsonl", [{"prediction": x} for x in preds])
    r = write_jsonl(tmp / f"{task}-ref.jsonl", refs)
    ok("eval", "--task", task, "--predictions", str(p), "--references", str(r), "--out", str(tmp / task), *extra)
    return json.loads((tmp / task / "metrics.json").read_text())


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ------------------------------------------------------------------------- predictions mode = tools
def test_bleu_and_chrf_equal_the_sacrebleu_cli(tmp_path):
    (tmp_path / "hyp.txt").write_text("\n".join(HYPS) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(REFS) + "\n")
    result = score_files(tmp_path, "translate", HYPS, [{"target": r} for r in REFS])
    for name in ("bleu", "chrf"):
        cli = subprocess.run([str(VENV_BIN / "sacrebleu"), str(tmp_path / "ref.txt"), "-i", str(tmp_path / "hyp.txt"),
                              "-m", name, "-w", "4"], capture_output=True, text=True, check=True)
        reference = json.loads(cli.stdout)
        assert f"{result['metrics'][name]:.4f}" == f"{reference['score']:.4f}", (result, reference)
        assert result["signatures"][name] == reference["signature"]
    assert 10 < result["metrics"]["bleu"] < 90  # a non-trivial case


def test_rouge_equals_rouge_score(tmp_path):
    from rouge_score import rouge_scorer

    result = score_files(tmp_path, "summarize", HYPS, [{"summary": r} for r in REFS])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    direct = [scorer.score(r, h) for h, r in zip(HYPS, REFS)]
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        expected = 100 * sum(s[key].fmeasure for s in direct) / len(direct)
        assert result["metrics"][key] == pytest.approx(expected, abs=1e-9)


def test_squad_exact_match_and_f1_on_known_cases(tmp_path):
    refs = [{"answers": {"text": ["Eiffel Tower"], "answer_start": [0]}},  # articles and case ignored: EM 1
            {"answers": ["Paris"]},                                       # 1 of 3 tokens: F1 0.5, EM 0
            {"answers": {"text": ["Paris", "london"]}},                   # best of several golds: EM 1
            {"answers": "blue"}]                                          # nothing in common: 0
    result = score_files(tmp_path, "qa", ["the Eiffel tower.", "in Paris France", "London", "red"], refs)
    assert result["metrics"]["exact_match"] == pytest.approx(50.0)
    assert result["metrics"]["f1"] == pytest.approx(100 * (1 + 0.5 + 1 + 0) / 4)


def test_squad_v2_files_score_with_the_v2_script_and_bootstrap(tmp_path):
    """A question without an answer ({"text": []}) makes the file SQuAD v2: "" is right there; HasAns_/NoAns_ too,
    and the bootstrap resamples the v2 per-question scores."""
    from gptkit import metrics

    golds = [["Eiffel Tower"], [], ["Paris"], []]
    refs = [{"answers": {"text": g, "answer_start": [0] * len(g)}} for g in golds]
    preds = ["the Eiffel tower.", "", "", "London"]
    result = score_files(tmp_path, "qa", preds, refs, "--bootstrap", "50")
    assert result["metrics"] == pytest.approx(metrics.squad_v2_scores(preds, golds))
    assert (result["metrics"]["exact_match"], result["metrics"]["NoAns_exact"]) == (50.0, 50.0)
    assert "SQuAD v2.0" in result["signatures"]["squad"]
    low, high = result["ci95"]["exact_match"]
    assert 0.0 <= low < 50.0 < high <= 100.0


def test_classification_accuracy_and_macro_f1(tmp_path):
    refs = [{"label": x} for x in (1, 0, 1, 1, 0)]  # integer labels in the file, string predictions
    result = score_files(tmp_path, "classify", ["1", "0", "0", "1", "1"], refs)
    assert result["metrics"]["accuracy"] == pytest.approx(60.0)
    f1_0, f1_1 = 2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) * (2 / 3) / (4 / 3)
    assert result["metrics"]["macro_f1"] == pytest.approx(100 * (f1_0 + f1_1) / 2)


def test_ids_pair_predictions_in_any_order(tmp_path):
    refs = [{"id": f"s{i}", "target": r} for i, r in enumerate(REFS)]
    preds = [{"id": f"s{i}", "prediction": h} for i, h in enumerate(HYPS)][::-1]
    in_order = score_files(tmp_path, "translate", HYPS, [{"target": r} for r in REFS])
    p, r = write_jsonl(tmp_path / "p.jsonl", preds), write_jsonl(tmp_path / "r.jsonl", refs)
    ok("eval", "--task", "translate", "--predictions", str(p), "--references", str(r), "--out", str(tmp_path / "ids"))
    assert json.loads((tmp_path / "ids" / "metrics.json").read_text())["metrics"] == in_order["metrics"]


def test_bootstrap_intervals_equal_metrics_bootstrap_ci(tmp_path):
    from gptkit import metrics

    tr = score_files(tmp_path, "translate", HYPS, [{"target": r} for r in REFS], "--bootstrap", "30", "--seed", "3")
    assert tr["ci95"]["bleu"] == pytest.approx(list(metrics.bootstrap_ci(metrics.bleu, HYPS, REFS, 30, 3, key="bleu")))
    assert tr["ci95"]["chrf"] == pytest.approx(list(metrics.bootstrap_ci(metrics.chrf, HYPS, REFS, 30, 3, key="chrf")))
    lo, hi = tr["ci95"]["bleu"]
    assert lo <= tr["metrics"]["bleu"] <= hi and lo < hi
    su = score_files(tmp_path, "summarize", HYPS, [{"summary": r} for r in REFS], "--bootstrap", "30")
    assert su["ci95"]["rougeL"] == pytest.approx(list(metrics.bootstrap_ci(metrics.rouge, HYPS, REFS, 30, 0,
                                                                             key="rougeL")))


def test_report_lists_best_and_worst_and_stdout_has_the_table(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prediction": h} for h in HYPS])
    r = write_jsonl(tmp_path / "r.jsonl", [{"source": f"src {i}", "target": t} for i, t in enumerate(REFS)])
    out = ok("eval", "--task", "translate", "--predictions", str(p), "--references", str(r), "--out", str(tmp_path / "o"))
    assert "bleu" in out and "chrf" in out and "8 examples" in out
    report = (tmp_path / "o" / "report.md").read_text()
    best, worst = report.split("## 5 best")[1].split("## 5 worst")
    assert "Hello there, General Kenobi!" in best and "src 3" in best  # the exact match (up to case) ranks first
    assert "Completely different sentence" in worst and "Completely different" not in best
    assert "| bleu |" in report and "nrefs:1|case:mixed" in report


# ------------------------------------------------------------------------------------- model mode
def eval_model(lm_dir: Path, data: Path, out: Path, *extra: str) -> dict:
    ok("eval", "--model", str(lm_dir), "--task", "translate", "--data", str(data), "--out", str(out),
       "--max-new-tokens", "8", *extra)
    return json.loads((out / "metrics.json").read_text())


def test_batch_size_does_not_change_predictions(tmp_path, lm_dir, test_file):
    one = eval_model(lm_dir, test_file, tmp_path / "b1", "--batch-size", "1")
    eight = eval_model(lm_dir, test_file, tmp_path / "b8", "--batch-size", "8")
    assert (tmp_path / "b1" / "predictions.jsonl").read_bytes() == (tmp_path / "b8" / "predictions.jsonl").read_bytes()
    assert one["metrics"] == eight["metrics"] and one["counts"] == {"examples": 20}
    preds = lines(tmp_path / "b8" / "predictions.jsonl")
    assert [p["index"] for p in preds] == list(range(20)) and len({p["prediction"] for p in preds}) > 5
    assert one["model"]["files"]["model.safetensors"] and one["data"] == {str(test_file): eight["data"][str(test_file)]}


def test_every_decoding_option_reaches_generation(tmp_path, lm_dir, test_file):
    """Seeded sampling is reproducible and differs from greedy; the options are recorded in metrics.json."""
    greedy = eval_model(lm_dir, test_file, tmp_path / "g")
    args = ("--temperature", "1.5", "--top-k", "20", "--top-p", "0.95", "--repetition-penalty", "1.2", "--seed", "3")
    a = eval_model(lm_dir, test_file, tmp_path / "a", *args)
    eval_model(lm_dir, test_file, tmp_path / "b", *args)
    read = lambda d: [p["prediction"] for p in lines(tmp_path / d / "predictions.jsonl")]  # noqa: E731
    assert read("a") == read("b") != read("g")
    assert a["settings"]["decoding"]["do_sample"] and a["settings"]["decoding"]["top_k"] == 20
    assert not greedy["settings"]["decoding"]["do_sample"]


def test_the_checkpoints_own_generation_settings_apply_and_are_recorded(tmp_path, lm_dir, test_file):
    """Settings of generation_config.json that gptkit's options do not make (no_repeat_ngram_size here) apply as in
    transformers' generate, and metrics.json records them: two checkpoints' figures say why they decode apart."""
    import shutil

    plain = eval_model(lm_dir, test_file, tmp_path / "plain")
    tuned = tmp_path / "tuned"
    shutil.copytree(lm_dir, tuned)
    config = json.loads((tuned / "generation_config.json").read_text())
    (tuned / "generation_config.json").write_text(json.dumps({**config, "no_repeat_ngram_size": 1}))
    got = eval_model(tuned, test_file, tmp_path / "t")
    assert plain["settings"]["generation_config"] == {} and got["settings"]["generation_config"] == {
        "no_repeat_ngram_size": 1}
    for p in lines(tmp_path / "t" / "predictions.jsonl"):  # no token twice (the tiny model repeats without it)
        assert len(set(p["prediction"].split())) == len(p["prediction"].split())
    assert [p["prediction"] for p in lines(tmp_path / "t" / "predictions.jsonl")] != [
        p["prediction"] for p in lines(tmp_path / "plain" / "predictions.jsonl")]


def test_predictions_stream_and_resume_after_a_crash(tmp_path, lm_dir, test_file, monkeypatch):
    from gptkit import generation

    full = eval_model(lm_dir, test_file, tmp_path / "full", "--batch-size", "8")
    real, calls = generation.generate_batch, []

    def crash_after_first_batch(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) > 1:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_batch", crash_after_first_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        eval_model(lm_dir, test_file, tmp_path / "crash", "--batch-size", "8")
    written = (tmp_path / "crash" / "predictions.jsonl").read_text()
    assert written.splitlines() == (tmp_path / "full" / "predictions.jsonl").read_text().splitlines()[:8]
    assert not (tmp_path / "crash" / "metrics.json").exists()
    (tmp_path / "crash" / "predictions.jsonl").write_text(written + '{"index": 8, "predic')  # a torn last line
    calls.clear()
    monkeypatch.setattr(generation, "generate_batch", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    resumed = eval_model(lm_dir, test_file, tmp_path / "crash", "--batch-size", "5", "--resume")
    assert calls == [5, 5, 2]  # only the 12 missing examples were generated
    assert (tmp_path / "crash" / "predictions.jsonl").read_bytes() == (tmp_path / "full" / "predictions.jsonl").read_bytes()
    assert resumed["metrics"] == full["metrics"]


def test_out_folder_is_refused_unless_it_holds_the_same_evaluation(tmp_path, lm_dir, test_file):
    first = eval_model(lm_dir, test_file, tmp_path / "o", "--limit", "4")
    again = eval_model(lm_dir, test_file, tmp_path / "o", "--limit", "4", "--batch-size", "3")  # same thing: redone
    assert again["metrics"] == first["metrics"] and again["counts"] == {"examples": 4}
    other = write_jsonl(tmp_path / "other.jsonl", translate_rows(4, 9))
    code, _, err = run_cli("eval", "--model", str(lm_dir), "--task", "translate", "--data", str(other),
                           "--out", str(tmp_path / "o"), "--max-new-tokens", "8")
    assert_user_error(code, err, "holds an evaluation of something else", "data")
    assert json.loads((tmp_path / "o" / "metrics.json").read_text()) == again  # left untouched
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    code, _, err = run_cli("eval", "--model", str(lm_dir), "--task", "translate", "--data", str(other),
                           "--out", str(tmp_path / "junk"), "--max-new-tokens", "8")
    assert_user_error(code, err, "not empty")
    assert [p.name for p in (tmp_path / "junk").iterdir()] == ["notes.txt"]
    for torn in ('{"identity": {"mode": "mod', "[1, 2]", '{"identity": 3}'):  # a crash mid-write, or not ours
        (tmp_path / "o" / "eval.json").write_text(torn)
        code, _, err = run_cli("eval", "--model", str(lm_dir), "--task", "translate", "--data", str(test_file),
                               "--out", str(tmp_path / "o"), "--limit", "4", "--max-new-tokens", "8")
        assert_user_error(code, err, str(tmp_path / "o" / "eval.json"), "is not a gptkit evaluation manifest")
        assert (tmp_path / "o" / "eval.json").read_text() == torn and (tmp_path / "o" / "metrics.json").is_file()


def test_an_error_of_the_first_batch_leaves_no_out_folder(tmp_path, lm_dir, test_file, monkeypatch):
    """max_new_tokens past the context, a prompt naming a missing field, qa windows with no room: refused before
    eval.json is written, so the corrected command runs; any other error before a prediction removes the folder."""
    from transformers import GPT2ForQuestionAnswering

    from gptkit import evaluate

    out = tmp_path / "o"
    code, _, err = run_cli("eval", "--model", str(lm_dir), "--task", "translate", "--data", str(test_file),
                           "--out", str(out), "--max-new-tokens", "64")
    assert_user_error(code, err, "max_new_tokens=64", "context size (64 tokens)")
    assert not out.exists()
    assert eval_model(lm_dir, test_file, out, "--limit", "2")["counts"] == {"examples": 2}  # the corrected run
    run = tmp_path / "run"
    for name in ("config.json", "model.safetensors"):
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_bytes((lm_dir / name).read_bytes())
    make_tokenizer().save_pretrained(run)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"task": "translate", "model": {"init_from": str(lm_dir)},
                                                     "finetune": {"prompt": "{src} =>", "max_new_tokens": 8}}))
    code, _, err = run_cli("eval", "--model", str(run), "--data", str(test_file), "--out", str(tmp_path / "p"))
    assert_user_error(code, err, "{src}")
    assert not (tmp_path / "p").exists()
    qa_run = tmp_path / "qa"
    torch.manual_seed(0)
    GPT2ForQuestionAnswering(gpt2_config(n_positions=3)).save_pretrained(qa_run)  # 3-token windows
    make_tokenizer().save_pretrained(qa_run)
    (qa_run / "recipe.yaml").write_text(yaml.safe_dump({"task": "qa", "model": {"init_from": str(lm_dir)}}))
    rows = [{"question": "q?", "context": "a b c", "answers": {"text": ["b"], "answer_start": [2]}}]
    code, _, err = run_cli("eval", "--model", str(qa_run), "--data", str(write_jsonl(tmp_path / "qa.jsonl", rows)),
                           "--out", str(tmp_path / "q"))
    assert_user_error(code, err, "finetune.max_length", "no room")
    assert not (tmp_path / "q").exists()

    def fail(*a):
        raise evaluate.UserError("prompt 0 is empty and the tokenizer has no bos/eos token to start from")

    monkeypatch.setattr(evaluate, "predict_batch", fail)
    code, _, err = run_cli("eval", "--model", str(lm_dir), "--task", "translate", "--data", str(test_file),
                           "--out", str(tmp_path / "f"), "--max-new-tokens", "8")
    assert_user_error(code, err, "prompt 0 is empty")
    assert not (tmp_path / "f").exists()
    code, _, err = run_cli("eval", "--model", str(lm_dir), "--task", "translate", "--data", str(test_file),
                           "--out", str(out), "--limit", "2", "--max-new-tokens", "8")  # not created by it: kept
    assert_user_error(code, err, "prompt 0 is empty")
    assert (out / "eval.json").is_file()


def test_default_out_is_inside_the_model_dir_and_recipe_mode_uses_test_then_val(tmp_path, lm_dir, test_file):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lm_dir, run)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"task": "translate", "model": {"init_from": str(lm_dir)},
                                                     "finetune": {"max_new_tokens": 8}, "output": {"dir": str(run)}}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"task": "translate", "data": {"test_files": [str(test_file)]},
                                      "output": {"dir": str(run)}}))
    ok("eval", str(recipe))
    by_recipe = json.loads((run / "eval-translate" / "metrics.json").read_text())
    assert by_recipe["settings"]["decoding"]["max_new_tokens"] == 8  # the run's own finetune settings
    direct = eval_model(lm_dir, test_file, tmp_path / "direct")
    assert by_recipe["metrics"] == direct["metrics"]
    ok("eval", str(recipe), f"data.val_files=[{test_file}]", "data.test_files=[]", "--limit", "3")
    assert json.loads((run / "eval-translate-validation" / "metrics.json").read_text())["counts"] == {"examples": 3}
    # decoding the recipe sets (its file or its overrides) wins over the run's; it used to be ignored silently
    ok("eval", str(recipe), "finetune.max_new_tokens=3", "finetune.num_beams=1", "--limit", "2",
       "--out", str(tmp_path / "short"))
    decoding = json.loads((tmp_path / "short" / "metrics.json").read_text())["settings"]["decoding"]
    assert decoding["max_new_tokens"] == 3 and decoding["num_beams"] == 1, decoding
    # no run yet: the recipe scores its base with its own prompt and decoding (the baseline before fine-tuning)
    recipe.write_text(yaml.safe_dump({"task": "translate", "data": {"test_files": [str(test_file)]},
                                      "model": {"init_from": str(lm_dir)}, "output": {"dir": str(tmp_path / "none")},
                                      "finetune": {"prompt": "{source} ->", "max_new_tokens": 5}}))
    ok("eval", str(recipe), "--out", str(tmp_path / "base"))
    settings = json.loads((tmp_path / "base" / "metrics.json").read_text())["settings"]
    assert settings["template"] == "{source} ->" and settings["decoding"]["max_new_tokens"] == 5, settings


def test_classifier_run_and_label_likelihood(tmp_path, lm_dir):
    from transformers import AutoModelForCausalLM, GPT2ForSequenceClassification

    from gptkit.tasks import classify

    run = tmp_path / "cls"
    torch.manual_seed(1)
    GPT2ForSequenceClassification(gpt2_config(num_labels=2, id2label={0: "cold", 1: "warm"},
                                              label2id={"cold": 0, "warm": 1})).save_pretrained(run)
    make_tokenizer().save_pretrained(run)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"task": "classify", "model": {"init_from": str(lm_dir)}}))
    rows = [{"text": t, "label": lab} for t, lab in [("red big", "warm"), ("old new", "cold"), ("fast", "cold"),
                                                      ("white small old", "warm"), ("blue", "cold")]]
    data = write_jsonl(tmp_path / "cls.jsonl", rows)
    ok("eval", "--model", str(run), "--data", str(data), "--batch-size", "2")  # task taken from the run
    got = json.loads((run / "eval-classify-cls" / "metrics.json").read_text())  # named for --data
    from gptkit import trained
    from gptkit.recipe import Recipe

    recipe = Recipe.model_validate(yaml.safe_load((run / "recipe.yaml").read_text()))
    expected = classify.predict(trained.load_model(run, "classify", recipe).eval(), make_tokenizer(), rows, recipe)
    assert [p["prediction"] for p in lines(run / "eval-classify-cls" / "predictions.jsonl")] == expected
    assert got["metrics"]["accuracy"] == pytest.approx(100 * sum(e == r["label"] for e, r in zip(expected, rows)) / 5)
    # a plain causal LM classifies by the likelihood of " <label>" after the prompt
    ok("eval", "--model", str(lm_dir), "--task", "classify", "--data", str(data), "--out", str(tmp_path / "ll"))
    model, tok = AutoModelForCausalLM.from_pretrained(lm_dir).eval(), make_tokenizer()

    def logprob(prompt: str, label: str) -> float:
        head, tail = tok(prompt)["input_ids"], tok(" " + label)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([head + tail])).logits.log_softmax(-1)[0]
        return sum(logp[len(head) + k - 1, t].item() for k, t in enumerate(tail))

    liked = [max(["cold", "warm"], key=lambda lab: logprob(f"{r['text']}\nLabel:", lab)) for r in rows]
    assert [p["prediction"] for p in lines(tmp_path / "ll" / "predictions.jsonl")] == liked
    # sentence pairs (MRPC-style): the second text is in the prompt too
    pairs = [{**r, "text_pair": t} for r, t in zip(rows, ["blue", "red", "new old", "big", "fast"])]
    ok("eval", "--model", str(lm_dir), "--task", "classify", "--data", str(write_jsonl(tmp_path / "p.jsonl", pairs)),
       "--out", str(tmp_path / "pairs"))
    liked = [max(["cold", "warm"], key=lambda lab: logprob(f"{r['text']}\n{r['text_pair']}\nLabel:", lab))
             for r in pairs]
    assert [p["prediction"] for p in lines(tmp_path / "pairs" / "predictions.jsonl")] == liked
    assert json.loads((tmp_path / "pairs" / "metrics.json").read_text())["settings"]["template"].count("{") == 2


def test_label_likelihood_runs_the_output_layer_on_label_tokens_only(lm_dir):
    """The same choice as full log-softmax scores; batch-size sequences per forward and logits only at the positions
    that predict a label token (not batch x labels x length x vocabulary)."""
    from transformers import AutoModelForCausalLM

    from gptkit import evaluate, modeling

    model, tok = AutoModelForCausalLM.from_pretrained(lm_dir).eval(), make_tokenizer()
    labels = ["cold", "warm", "mild"]
    prompts = [f"{t}\nLabel:" for t in ("red big", "old new fast", "b", "white small old blue", "blue")]

    def full(prompt: str, label: str) -> float:  # every position's log-softmax, one sequence at a time
        head, tail = tok(prompt)["input_ids"], tok(" " + label)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([head + tail])).logits.log_softmax(-1)[0]
        return sum(logp[len(head) + k - 1, t].item() for k, t in enumerate(tail))

    expected = [max(labels, key=lambda lab: full(p, lab)) for p in prompts]
    assert len(set(expected)) > 1
    shapes, batches, real = [], [], modeling.logits_where
    model.register_forward_pre_hook(lambda m, a, k: batches.append(k["input_ids"].shape[0]), with_kwargs=True)

    def where(*a, **k):
        out = real(*a, **k)
        shapes.append(tuple(out.shape))
        return out

    ctx = evaluate.Ctx("classify", model, tok, None, evaluate.CLASSIFY_PROMPT, None, labels, [], 0, 0)
    import unittest.mock

    with unittest.mock.patch.object(modeling, "logits_where", where):
        assert evaluate.label_scores(ctx, prompts) == expected
        batches.clear()
        assert evaluate.label_scores(ctx, prompts[:2]) == expected[:2]
    assert max(batches) == 2  # two prompts: two sequences per forward, three labels in three forwards
    label_tokens = sum(len(tok(" " + lab)["input_ids"]) for lab in labels)
    assert shapes[0] == (len(prompts) * 5, model.config.vocab_size) and len(shapes) == 3 + 3  # 5 tokens per label
    assert sum(s[0] for s in shapes[:3]) == len(prompts) * label_tokens


def test_qa_with_a_causal_lm_generates_from_the_qa_prompt(tmp_path, lm_dir, monkeypatch):
    from gptkit import generation
    from gptkit.tasks import qa

    rows = [{"id": f"q{i}", "context": f"the box is {c}.", "question": "what colour is the box?",
             "answers": {"text": [c], "answer_start": [11]}} for i, c in enumerate(["red", "blue", "green"])]
    seen, real = [], generation.generate_batch
    monkeypatch.setattr(generation, "generate_batch", lambda m, t, p, *a, **k: seen.extend(p) or real(m, t, p, *a, **k))
    ok("eval", "--model", str(lm_dir), "--task", "qa", "--data", str(write_jsonl(tmp_path / "qa.jsonl", rows)),
       "--out", str(tmp_path / "qa"), "--max-new-tokens", "5")
    assert seen == [qa.PROMPT.format(**r) for r in rows]
    preds = lines(tmp_path / "qa" / "predictions.jsonl")
    assert [p["id"] for p in preds] == ["q0", "q1", "q2"] and preds[0]["reference"] == ["red"]
    got = json.loads((tmp_path / "qa" / "metrics.json").read_text())
    from gptkit import metrics

    assert got["metrics"] == metrics.squad_scores([p["prediction"] for p in preds], [p["reference"] for p in preds])


@pytest.mark.filterwarnings("ignore:prompt .* tokens; keeping the last")
def test_few_shot_prompts_are_seeded_demonstrations(tmp_path, lm_dir, test_file, monkeypatch):
    from gptkit import generation

    train = write_jsonl(tmp_path / "train.jsonl", translate_rows(30, 1))
    seen = []
    real = generation.generate_batch
    monkeypatch.setattr(generation, "generate_batch", lambda m, t, prompts, *a, **k: seen.extend(prompts) or
                        real(m, t, prompts, *a, **k))
    args = ("--few-shot", "2", "--train", str(train), "--limit", "6", "--max-new-tokens", "4")
    eval_model(lm_dir, test_file, tmp_path / "a", "--batch-size", "4", *args)
    first, seen[:] = list(seen), []
    eval_model(lm_dir, test_file, tmp_path / "b", "--batch-size", "1", *args)
    assert first == seen and len(first) == 6
    demos = {f"{r['source']} => {r['target']}" for r in translate_rows(30, 1)}
    test_rows = translate_rows(20, 3)
    for prompt, row in zip(first, test_rows):
        *shots, query = prompt.split("\n\n")
        assert len(shots) == 2 and set(shots) <= demos and query == f"{row['source']} =>"
    assert len({p.split("\n\n")[0] for p in first}) > 1  # demonstrations vary between examples


def test_label_likelihood_refuses_a_label_that_fills_the_context(tmp_path, lm_dir):
    """A label of context-1 tokens is scored after the prompt's last token; one longer leaves the prompt no room
    (its slice of positions went negative and scored the wrong tokens) and is refused before --out is written."""
    long = "a" * 62  # " " + 62 characters: 63 tokens, the 64-token context less one
    rows = [{"text": "red big", "label": long}, {"text": "old", "label": "cold"}]
    ok("eval", "--model", str(lm_dir), "--task", "classify", "--data", str(write_jsonl(tmp_path / "a.jsonl", rows)),
       "--out", str(tmp_path / "fits"))
    assert len(lines(tmp_path / "fits" / "predictions.jsonl")) == 2
    rows[0]["label"] = long + "a"
    code, _, err = run_cli("eval", "--model", str(lm_dir), "--task", "classify", "--data",
                           str(write_jsonl(tmp_path / "b.jsonl", rows)), "--out", str(tmp_path / "over"))
    assert_user_error(code, err, f"classify label '{long}a' is 64 tokens", "at most 63 tokens")
    assert not (tmp_path / "over").exists()


def test_perplexity_of_a_model_without_position_limit(tmp_path):
    """An attention-free model (Mamba) has no positions: windows span modeling.UNLIMITED_WINDOW tokens."""
    from transformers import MambaConfig, MambaForCausalLM

    from gptkit.modeling import UNLIMITED_WINDOW

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=len(CHARS) + 1, hidden_size=16, num_hidden_layers=1,
                                         state_size=4, pad_token_id=0, bos_token_id=0, eos_token_id=0)).eval()
    model.save_pretrained(tmp_path / "mamba")
    make_tokenizer().save_pretrained(tmp_path / "mamba")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 3)
    got = lm_eval(tmp_path / "mamba", text, tmp_path / "o")
    nll, n = direct_nll(model, make_tokenizer()(text.read_text())["input_ids"])
    assert got["settings"]["context"] == UNLIMITED_WINDOW and got["counts"]["windows"] == 1
    assert got["metrics"]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


# ------------------------------------------------------------------------------------- perplexity
def direct_nll(model, ids: list[int]) -> tuple[float, int]:
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    return loss * (len(ids) - 1), len(ids) - 1


def lm_eval(lm_dir: Path, text_file: Path, out: Path, *extra: str) -> dict:
    ok("eval", "--model", str(lm_dir), "--task", "lm", "--data", str(text_file), "--out", str(out), *extra)
    return json.loads((out / "metrics.json").read_text())


def test_perplexity_of_a_short_text_is_exp_mean_nll(tmp_path, lm_dir):
    from transformers import AutoModelForCausalLM

    text = tmp_path / "short.txt"
    text.write_text("the quick brown fox jumps over")  # 30 tokens < context 64
    got = lm_eval(lm_dir, text, tmp_path / "o")
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    nll, n = direct_nll(model, make_tokenizer()(text.read_text())["input_ids"])
    assert got["counts"] == {"tokens": 30, "scored": 29, "windows": 1}
    assert got["metrics"]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_perplexity_stride_equal_context_is_non_overlapping(tmp_path, lm_dir):
    from transformers import AutoModelForCausalLM

    text = tmp_path / "long.txt"
    text.write_text(("to be or not to be, that is the question. " * 6)[:250])
    ids = make_tokenizer()(text.read_text())["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    parts = [direct_nll(model, ids[i : i + 64]) for i in range(0, len(ids), 64)]
    expected = math.exp(sum(p[0] for p in parts) / sum(p[1] for p in parts))
    for batch in ("1", "3"):
        got = lm_eval(lm_dir, text, tmp_path / f"s{batch}", "--stride", "64", "--batch-size", batch)
        assert got["metrics"]["perplexity"] == pytest.approx(expected, rel=1e-5)
        assert got["counts"] == {"tokens": 250, "scored": 250 - 4, "windows": 4}
        assert got["signatures"]["perplexity"].endswith("non-overlapping: each window's first token unscored")
    strided = lm_eval(lm_dir, text, tmp_path / "half")  # default stride 32: every token after the first once
    assert strided["counts"] == {"tokens": 250, "scored": 249, "windows": 7}
    assert strided["signatures"]["perplexity"].endswith("stride 32, all tokens but the first")
    assert strided["metrics"]["perplexity"] != pytest.approx(expected, rel=1e-4)


def test_perplexity_of_rows_files_reads_their_text_column(tmp_path, lm_dir):
    """A pretraining recipe's jsonl/parquet val files: the text_column cells, one document each, as a text file
    holding them separated by blank lines (never the JSON syntax); a missing column names data.text_column."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["the quick brown fox", "jumps over the lazy dog.", "to be or not to be"]
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(docs))
    expected = lm_eval(lm_dir, text, tmp_path / "t")
    rows = write_jsonl(tmp_path / "docs.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs)])
    pq.write_table(pa.table({"text": docs}), tmp_path / "docs.parquet")
    for path in (rows, tmp_path / "docs.parquet"):
        got = lm_eval(lm_dir, path, tmp_path / path.suffix[1:])
        assert got["counts"] == expected["counts"] and got["metrics"] == pytest.approx(expected["metrics"], rel=1e-6)
    run = tmp_path / "run"  # a pretraining run whose recipe names its column
    shutil.copytree(lm_dir, run)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"data": {"train_files": [str(text)], "text_column": "body"},
                                                     "output": {"dir": str(run)}}))
    body = write_jsonl(tmp_path / "body.jsonl", [{"body": d} for d in docs])
    got = lm_eval(run, body, tmp_path / "body")
    assert got["metrics"] == pytest.approx(expected["metrics"], rel=1e-6)
    code, _, err = run_cli("eval", "--model", str(run), "--task", "lm", "--data", str(rows), "--out", str(tmp_path / "x"))
    assert_user_error(code, err, "data.text_column: column 'body' not found", "docs.jsonl")
    assert not (tmp_path / "x").exists()


def test_windows_score_each_token_once_with_the_longest_context():
    from gptkit.modeling import windows

    for n, context, stride in [(250, 64, 32), (250, 64, 64), (100, 64, 7), (10, 64, 32), (65, 64, 1)]:
        scored = []
        for begin, end, first in windows(n, context, stride):
            assert end - begin <= context and begin < first
            scored += [(t, t - begin) for t in range(first, end)]
        assert [t for t, _ in scored] == list(range(1, n) if stride < context or n <= context else
                                              [t for t in range(1, n) if t % context])
        if stride < context:  # each token sees at least context - stride tokens before it (or all there are)
            assert all(left >= min(t, context - stride) for t, left in scored)


# -------------------------------------------------------------------------------------- bad input
def _bad_cases(tmp: Path, lm_dir: Path, test_file: Path) -> list[tuple[list[str], list[str]]]:
    def f(name: str, content: str | bytes) -> str:
        (tmp / name).write_bytes(content.encode() if isinstance(content, str) else content)
        return str(tmp / name)

    p3 = f("p3.jsonl", "".join(json.dumps({"prediction": "a"}) + "\n" for _ in range(3)))
    r2 = f("r2.jsonl", "".join(json.dumps({"target": "a"}) + "\n" for _ in range(2)))
    p2 = f("p2.jsonl", "".join(json.dumps({"prediction": "a"}) + "\n" for _ in range(2)))
    pid = f("pid.jsonl", '{"id": 1, "prediction": "a"}\n{"id": 2, "prediction": "b"}\n')
    rid = f("rid.jsonl", '{"id": 1, "target": "a"}\n{"id": 7, "target": "b"}\n')
    nopred = f("nopred.jsonl", '{"prediction": "a"}\n{"output": "b"}\n')
    noref = f("noref.jsonl", '{"target": "a"}\n{"tgt": "b"}\n')
    empty = f("empty.jsonl", "\n")
    binary = f("bin.jsonl", b'{"source": "x", "target": "a"}\n{"source": "y", "target": "b\xff\xfe"}\n')
    (tmp / "notok").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp / "notok" / name).write_bytes((lm_dir / name).read_bytes())
    pred = ["eval", "--task", "translate", "--predictions"]
    data = ["eval", "--model", str(lm_dir), "--task", "translate", "--data"]
    return [
        (pred + [p2, "--references", r2, "--out", "/etc/gptkit-eval"], ["--out", "/etc/gptkit-eval", "system folder"]),
        (pred + [p3, "--references", r2], ["has 3 predictions", "has 2 references"]),
        (data + [str(test_file), "--columns", "sorce=source"], ["--columns.sorce", "did you mean 'source'"]),
        (pred + [p2, "--references", r2, "--columns", "targt=target"], ["--columns.targt", "did you mean 'target'"]),
        (pred + [pid, "--references", rid], ["ids do not match", "['2']", "['7']"]),
        (pred + [nopred, "--references", r2], ["nopred.jsonl", "line 2", "'prediction'", "fields found: ['output']"]),
        (pred + [p3, "--references", noref], ["noref.jsonl", "line 2", "'target'", "['tgt']"]),
        (pred + [empty, "--references", r2], ["empty.jsonl", "empty"]),
        (pred + [p3, "--references", binary], ["bin.jsonl", "line 2", "UTF-8"]),
        (data + [binary], ["bin.jsonl", "line 2", "UTF-8"]),
        (data + [f("nodata.jsonl", '{"src": "a", "target": "b"}\n')], ["'source'", "fields found: ['src', 'target']"]),
        (data + [f("e.jsonl", "")], ["e.jsonl", "empty"]),
        (["eval", "--model", str(lm_dir), "--task", "qa", "--data",
          f("badans.jsonl", '{"question": "q", "context": "c", "answers": {"text": [1]}}\n')],
         ["--data: ", "badans.jsonl: line 1: answers must be"]),
        (["eval", "--task", "poetry", "--predictions", p3, "--references", r2], ["poetry", "not an eval task"]),
        (["eval", "--model", str(tmp / "notok"), "--task", "translate", "--data", str(test_file)], ["no tokenizer"]),
        (["eval", "--model", str(tmp / "absent"), "--task", "translate", "--data", str(test_file)], ["neither a local directory nor a Hugging Face hub id"]),
        (data + [str(test_file), "--out", str(tmp / "fresh"), "--resume", "--max-new-tokens", "8"],
         ["--resume", "holds no evaluation to resume"]),
        (["eval", "--model", str(lm_dir), "--task", "lm", "--data", f("t.txt", "abc"), "--stride", "65"], ["--stride"]),
        (["eval", "--model", str(lm_dir), "--task", "lm", "--data", f("bad.txt", b"ok\nok\n\xc3\x28\n")],
         ["bad.txt", "line 3", "UTF-8"]),
        (data + [str(test_file), "--few-shot", "2"], ["--few-shot", "--train"]),
        (["eval", "--model", str(lm_dir), "--task", "classify", "--data",
          f("nl.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n')],
         ["nl.jsonl", "line 2", "field 'label' is null"]),
        (data + [f("ns.jsonl", '{"source": "a", "target": "b"}\n{"source": null, "target": "c"}\n')],
         ["ns.jsonl", "line 2", "field 'source' is null"]),
        (data + [f("ls.jsonl", '{"source": ["a"], "target": "b"}\n')], ["ls.jsonl", "line 1", "'source' is a list"]),
        (["eval", "--model", str(lm_dir), "--task", "lm", "--data", f("l.txt", "abc"), "--limit", "2"],
         ["--limit", "perplexity (lm)"]),
        (["eval", "--model", str(lm_dir), "--task", "lm", "--data", str(tmp / "l.txt"), "--bootstrap", "9"],
         ["--bootstrap", "perplexity (lm)"]),
        (pred + [f("pf.jsonl", '{"prediction": "a"}\n{"prediction": false}\n'), "--references", r2],
         ["pf.jsonl", "line 2", "prediction must be a string, got false"]),
        (["eval", "--task", "translate"], ["--model"]),
        (data + [str(test_file), "--limit", "0"], ["--limit"]),
        (data + [str(test_file), "--num-beams", "0"], ["num_beams must be >= 1"]),
        # decoding where no text is generated: refused, not recorded as if it had been used
        (["eval", "--model", str(lm_dir), "--task", "lm", "--data", str(tmp / "l.txt"), "--num-beams", "3"],
         ["--num-beams: perplexity (lm) generates no text", "decoding options do not apply"]),
        (["eval", "--model", str(lm_dir), "--task", "classify", "--data",
          f("cl.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n'), "--temperature",
          "0.7", "--sample"], ["--temperature: classifying by label likelihood generates no text",
                               "drop --temperature, --sample"]),
        (data + [str(test_file), "--train", str(test_file)], ["--train", "add --few-shot K or drop --train"]),
    ]


def test_bad_input_is_one_error_line(tmp_path, lm_dir, test_file):
    for args, needles in _bad_cases(tmp_path, lm_dir, test_file):
        code, _, err = run_cli(*args)
        assert_user_error(code, err, *needles)
    assert not (tmp_path / "fresh").exists() and not Path("/etc/gptkit-eval").exists()


def test_limit_reads_no_further_than_it_needs(tmp_path, lm_dir):
    """--limit 3 on a big --data file parsed the whole file into dicts first (74 MB of JSON lines: +330 MB); the
    rows past the limit are not read now (classify still sees every row's label, one row per label kept)."""
    import tracemalloc

    big = tmp_path / "big.jsonl"
    with open(big, "w") as fh:
        for i in range(60_000):
            fh.write(json.dumps({"source": f"red big old {i} " + "blue " * 20, "target": "rot", "label": f"l{i % 3}",
                                 "text": "red"}) + "\n")
    tracemalloc.start()
    try:
        eval_model(lm_dir, big, tmp_path / "tr", "--limit", "3", "--num-beams", "1")
        _, peak_translate = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        ok("eval", "--model", str(lm_dir), "--task", "classify", "--data", str(big), "--limit", "3",
           "--out", str(tmp_path / "cl"))
        _, peak_classify = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert json.loads((tmp_path / "tr" / "metrics.json").read_text())["counts"] == {"examples": 3}
    got = json.loads((tmp_path / "cl" / "metrics.json").read_text())
    assert got["counts"] == {"examples": 3} and got["settings"]["labels"] == ["l0", "l1", "l2"]
    assert peak_translate < 20e6 and peak_classify < 20e6, (peak_translate, peak_classify)  # the file is 12 MB
