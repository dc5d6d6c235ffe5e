"""`gptkit finetune` task qa: extractive spans over windows of long contexts, and generative answers."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import assert_user_error, run_cli
from tasks_helpers import (MARKER, QUESTION, WORDS, base_recipe, finetune_recipe, lora_test_metrics, qa_row, qa_rows,
                           read_test_metrics, splits, write_jsonl)

# of the full fine-tune's F1 (see test_finetune.LORA_SHARE): extractive measured 0.98-1.0 (the span head trains
# whole; 0.94-1.0 with the base's one-token words, session 10); generative 0.16-0.18 (F1 15-17: LoRA barely starts
# the copy circuit on this 20-step base; 0.15-0.48 with one-token words)
LORA_SHARE = {"extractive": 0.9, "generative": 0.08}

def qa_splits(tmp: Path, n_train: int = 600) -> dict[str, Path]:
    return splits(tmp, qa_rows, n_train)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A barely pretrained 2-layer GPT whose BPE tokenizer knows the QA words (tasks_helpers' base, own corpus)."""
    tmp = tmp_path_factory.mktemp("qa_base")
    corpus = tmp / "qa_corpus.txt"
    corpus.write_text("".join(f"{r['context']}\nQ: {r['question']}\nA: {r['answers']['text'][0]}\n"
                              for r in qa_rows(400, 0)))
    path = base_recipe(tmp)
    recipe = yaml.safe_load(path.read_text())
    recipe["data"]["train_files"] = [str(corpus)]
    # every word one "Ġword" token (313 merges cover them): at the shared 300, " moon", " tree", " lamp" were split
    # "Ġ" + word, so copying them needed a two-token match after the marker, and on some CPUs (AMD EPYC, session 10)
    # the model confused moon/tree/lamp: test EM 78 with validation at 96
    recipe["tokenizer"]["vocab_size"] = 512
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli("pretrain", str(path))
    assert code == 0, err
    return tmp / "base"


@pytest.mark.slow
def test_extractive_head_learns_the_word_after_the_marker(tmp_path, base):
    recipe = finetune_recipe(tmp_path, "qa", "qa", base, qa_splits(tmp_path), finetune={"doc_stride": 16},
                             train={"max_steps": 200, "eval_every": 100})
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    scores = read_test_metrics(tmp_path / "qa")
    assert scores["test_exact_match"] >= 90, scores
    lora = lora_test_metrics(recipe, tmp_path / "qa-lora")
    assert lora["test_f1"] >= LORA_SHARE["extractive"] * scores["test_f1"], lora
    config = json.loads((tmp_path / "qa" / "best" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForQuestionAnswering"]


@pytest.mark.slow
def test_generative_answers_learn_the_same_task(tmp_path, base):
    """Copying the word after the marker needs an induction-like circuit: more data and steps than a span head.
    At 1,200 steps the circuit was half-formed and test EM ranged 72-94 over seeds (82 on a faster CPU); at 2,400
    steps validation reaches 98-100 and test EM 94-98 (seeds 1337, 1, 2; 1 and 2 threads). With every word one token
    (the base fixture's vocabulary, session 10, AMD EPYC): test EM 98-100 (seeds 1337, 1; 1 and 2 threads)."""
    recipe = finetune_recipe(tmp_path, "gqa", "qa", base, qa_splits(tmp_path, 2000),
                             finetune={"qa_mode": "generative", "max_new_tokens": 4},
                             train={"max_steps": 2400, "eval_every": 600, "save_every": 1200})
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    scores = read_test_metrics(tmp_path / "gqa")
    assert scores["test_exact_match"] >= 90, scores
    lora = lora_test_metrics(recipe, tmp_path / "gqa-lora")
    assert lora["test_f1"] >= LORA_SHARE["generative"] * scores["test_f1"], lora


class SpanStub(torch.nn.Module):
    """A QA 'model' whose logits point at given (start, end) tokens of known windows, and loudest at token 0."""

    def __init__(self, targets: dict[tuple, tuple[int, int]], n_positions: int):
        super().__init__()
        self.config, self.device, self.targets = SimpleNamespace(n_positions=n_positions), torch.device("cpu"), targets

    def forward(self, input_ids, attention_mask):
        start, end = torch.zeros(input_ids.shape), torch.zeros(input_ids.shape)
        start[:, 0] = end[:, 0] = 100.0  # a question token: never a valid answer
        for j, ids in enumerate(input_ids.tolist()):
            s, e = self.targets.get(tuple(ids[: int(attention_mask[j].sum())]), (0, 0))
            start[j, s] += 10.0
            end[j, e] += 10.0
        return SimpleNamespace(start_logits=start, end_logits=end)


def test_long_context_answer_in_a_later_window(tmp_path, base):
    from gptkit import trained
    from gptkit.recipe import load_recipe
    from gptkit.tasks import qa

    rng = random.Random(5)
    words = [rng.choice(WORDS) for _ in range(40)] + [MARKER, "zebra"] + [rng.choice(WORDS) for _ in range(3)]
    rows = [qa_row(words, 41), qa_row(["moon", "lamp", "tree"], 0, "what comes first?"),
            qa_row(["moon", MARKER, "tree"], 1, "what is second?")]  # token " key": its offsets hold the space
    recipe = load_recipe(finetune_recipe(tmp_path, "long", "qa", base, qa_splits(tmp_path, 20),
                                         finetune={"max_length": 32, "doc_stride": 6, "max_answer_tokens": 8}))
    tok = trained.tokenizer_of(recipe.model.init_from)
    stub = SpanStub({}, n_positions=64)
    data = qa.preprocess(recipe, tok, rows, "train", stub)
    long = [w for w in data.rows if w["row"] == 0]
    assert len(long) >= 3 and all(len(w["input_ids"]) <= 32 for w in data.rows)
    wins = [w for w in qa.windows(recipe, tok, rows, 32, "train") if w["row"] == 0]  # the same, with offsets
    assert [w["input_ids"] for w in wins] == [w["input_ids"] for w in long]
    ctx = [[i for i, o in zip(w["input_ids"], w["offsets"]) if o is not None] for w in wins]
    assert all(a[-6:] == b[:6] for a, b in zip(ctx, ctx[1:]))  # consecutive windows overlap by doc_stride
    hits = [k for k, w in enumerate(long) if w["start_positions"] > 0]
    assert hits and hits[0] > 0 and all(long[k]["start_positions"] == 0 == long[k]["end_positions"]
                                        for k in range(hits[0]))
    w = long[hits[-1]]
    s, e = w["start_positions"], w["end_positions"]
    assert e > s and tok.decode(w["input_ids"][s : e + 1]).strip() == "zebra"  # an unseen word: several tokens
    short = next(w for w in data.rows if w["row"] == 1)
    assert tok.decode(short["input_ids"][short["start_positions"] : short["end_positions"] + 1]).strip() == "moon"
    batch = data.batch(list(range(len(data))))
    assert set(batch) == {"input_ids", "attention_mask", "start_positions", "end_positions"}
    assert batch["input_ids"].shape[0] == len(data.rows) == batch["start_positions"].shape[0]

    stub.targets = {tuple(w["input_ids"]): (w["start_positions"], w["end_positions"]) for w in data.rows
                    if w["start_positions"] > 0}
    assert qa.predict(stub, tok, rows, recipe) == ["zebra", "moon", MARKER]
    assert stub.training  # predict restores the mode it found
    assert qa.score(["zebra", "Moon.", MARKER], rows) == {"exact_match": 100.0, "f1": 100.0}

    wordy = qa_row(["moon", MARKER, "lamp"], 2, "which word " * 40 + QUESTION)  # cut to half a window, not an error
    wins = qa.windows(recipe, tok, [wordy], 32, "test")
    assert len(wins) == 1 and len(wins[0]["input_ids"]) <= 32
    assert qa.answer_positions(wins[0], wordy) != (0, 0)


def test_span_loss_ignores_padding(tmp_path, base):
    """A window's span loss is the same alone and right-padded beside a longer one (the softmax ran over the padding
    too), with and without label smoothing; unpadded, it is transformers' cross-entropy."""
    from transformers import AutoModelForQuestionAnswering

    from gptkit import trained
    from gptkit.recipe import load_recipe
    from gptkit.tasks import qa

    recipe = load_recipe(finetune_recipe(tmp_path, "pad", "qa", base, qa_splits(tmp_path, 20)))
    tok = trained.tokenizer_of(recipe.model.init_from)
    model = AutoModelForQuestionAnswering.from_pretrained(str(base)).eval()
    model.config.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    torch.nn.init.normal_(model.qa_outputs.weight, std=0.5)
    data = qa.preprocess(recipe, tok, qa_rows(8, 4), "train", model)
    assert len({len(w["input_ids"]) for w in data.rows}) > 1
    with torch.no_grad():
        for smoothing in (0.0, 0.1):
            alone = [qa.loss(model, data.batch([i]), smoothing=smoothing) for i in range(len(data))]
            batched = qa.loss(model, data.batch(list(range(len(data)))), smoothing=smoothing)
            assert torch.allclose(batched, torch.stack(alone).sum(), atol=1e-4), (smoothing, batched, sum(alone))
        one = data.batch([0])
        out = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"])
        plain = sum(torch.nn.functional.cross_entropy(lg, one[k], label_smoothing=0.1)
                    for lg, k in ((out.start_logits, "start_positions"), (out.end_logits, "end_positions"))) / 2
        assert torch.allclose(qa.loss(model, one, smoothing=0.1), plain, atol=1e-5)


def test_generative_rows_are_read_on_demand(tmp_path, base):
    """Generative qa adds each row's target as it is read, so tokenizing a split held in memory one chunk of rows, not
    the whole split as dicts: the peak (tracemalloc, examples spilled as the cache spills them) stays flat from 2,000
    to 8,000 rows (it grew with them: 3.7 to 8.7 MiB)."""
    import tracemalloc

    from gptkit import data, trained
    from gptkit.recipe import load_recipe
    from gptkit.tasks import generative as gen
    from gptkit.tasks import qa

    recipe = load_recipe(finetune_recipe(tmp_path, "g", "qa", base, qa_splits(tmp_path, 20),
                                         finetune={"qa_mode": "generative"}))
    tok = trained.tokenizer_of(recipe.model.init_from)
    peaks = []
    for n in (2000, 8000):
        rows = data.load_rows([str(write_jsonl(tmp_path / f"{n}.jsonl", qa_rows(n, 5)))], "data.train_files",
                              qa.FIELDS, qa.OPTIONAL)
        (tmp_path / f"spill{n}").mkdir()
        tracemalloc.start()
        with gen.Spill(tmp_path / f"spill{n}").active():
            examples = qa.preprocess(recipe, tok, rows, "train", None)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert len(examples) == n
    assert peaks[1] < 1.3 * peaks[0], [p / 2**20 for p in peaks]
    assert tok.decode(examples.rows[0]["input_ids"]).endswith(qa_rows(1, 5)[0]["answers"]["text"][0] + tok.eos_token)


def test_best_span_respects_order_length_and_context():
    from gptkit.tasks.qa import best_span

    offsets = [None, None, (0, 4), (4, 9), (9, 14), (14, 19)]  # two question tokens, four context tokens
    start = torch.tensor([50.0, 0, 1, 0, 0, 9])
    end = torch.tensor([50.0, 0, 0, 8, 0, 0])
    assert best_span(start, end, offsets, 30)[1:] == (2, 3)  # not (0, 0) in the question, not end before start
    assert best_span(start, end, offsets, 1)[1:] == (5, 5)  # one-token spans only
    assert best_span(start, end, [None] * 6, 30)[0] == float("-inf")


def test_answer_start_that_misses_the_answer_is_one_line_error(tmp_path, base):
    splits = qa_splits(tmp_path, 20)
    rows = qa_rows(20, 1)
    rows[3]["answers"]["answer_start"][0] += 1
    write_jsonl(splits["train"], rows)
    recipe = finetune_recipe(tmp_path, "bad", "qa", base, splits)
    code, _, err = run_cli("finetune", str(recipe))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1, err
    error = next(ln for ln in lines if ln.startswith("error:"))
    assert "data.train_files" in error and "row 3" in error and repr(rows[3]["answers"]["text"][0]) in error, error
    assert not (tmp_path / "bad").exists()


def test_windows_and_answers_of_a_row_do_not_depend_on_the_other_rows(tmp_path, base):
    """A long question lowers the stride of its own row only: eval's batches and fine-tuning's whole test split
    (one predict call) cut every row into the same windows and give the same answers."""
    from transformers import GPT2Config, GPT2ForQuestionAnswering

    from gptkit import trained
    from gptkit.recipe import load_recipe
    from gptkit.tasks import qa

    recipe = load_recipe(finetune_recipe(tmp_path, "w", "qa", base, qa_splits(tmp_path, 20),
                                         finetune={"max_length": 32, "doc_stride": 12}))
    tok = trained.tokenizer_of(recipe.model.init_from)
    rows = qa_rows(6, 7)
    for r in rows:  # long contexts: several windows per row
        r.update(qa_row(r["context"].split() * 6, len(r["context"].split()) * 5 + 1))
    rows[2]["question"] = "which word " * 40 + QUESTION  # cut to half a window: little room left for the context
    alone = [qa.windows(recipe, tok, [r], 32, "test") for r in rows]
    together = qa.windows(recipe, tok, rows, 32, "test")
    assert all(len(a) >= 2 for a in alone)  # overlapping windows: the stride shapes them
    for i, a in enumerate(alone):
        assert [w["input_ids"] for w in a] == [w["input_ids"] for w in together if w["row"] == i]
    torch.manual_seed(0)
    model = GPT2ForQuestionAnswering(GPT2Config(vocab_size=len(tok), n_positions=64, n_layer=1, n_head=2, n_embd=16))
    whole = qa.spans(model, tok, rows, recipe)
    assert whole == [s for r in rows for s in qa.spans(model, tok, [r], recipe)]


# ------------------------------------------------------------------------------ SQuAD v2: no answer
def qa_v2_rows(n: int, seed: int) -> list[dict]:
    """qa_rows, but every other context lacks the marker: that question has no answer (SQuAD v2's empty lists)."""
    rows = qa_rows(n, seed)
    for r in rows[1::2]:
        answer = r["answers"]["text"][0]
        words = r["context"].split()
        k = words.index(MARKER)
        words[k : k + 2] = [answer]  # the marker gone; the word that followed it stays in the context
        r.update(context=" ".join(words), answers={"text": [], "answer_start": []})
    return rows


@pytest.mark.slow
def test_extractive_head_learns_when_there_is_no_answer(tmp_path, base):
    """With finetune.no_answer each window ends in EOS, the no-answer position: the head learns to point there
    when the context has no marker, and to the word after it when it has one; scored by the SQuAD v2 script."""
    s = splits(tmp_path, qa_v2_rows, 600)
    recipe = finetune_recipe(tmp_path, "v2", "qa", base, s, finetune={"doc_stride": 16, "no_answer": True},
                             train={"max_steps": 300, "eval_every": 150})
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    scores = read_test_metrics(tmp_path / "v2")
    # measured (session 17; seeds 1337, 1, 7; 1 and 2 threads): HasAns EM 92-100 (25 questions), NoAns EM 100
    assert scores["test_HasAns_exact"] >= 80 and scores["test_NoAns_exact"] >= 85, scores
    # gptkit eval scores the same split alike, with the v2 figures; a question without an answer is answered ""
    code, _, err = run_cli("eval", "--model", str(tmp_path / "v2"), "--split", "test")
    assert code == 0, err
    out = next((tmp_path / "v2").rglob("eval-qa*"))
    got = json.loads((out / "metrics.json").read_text())["metrics"]
    assert got["NoAns_exact"] == pytest.approx(scores["test_NoAns_exact"])
    assert got["f1"] == pytest.approx(scores["test_f1"])
    preds = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sum(p == "" for p in preds) >= 20  # 25 of the 50 have no answer
    # a model taught to abstain is scored by v2's rules even on rows that all have an answer
    answered = write_jsonl(tmp_path / "answered.jsonl", [r for r in qa_v2_rows(50, 3) if r["answers"]["text"]])
    code, _, err = run_cli("eval", "--model", str(tmp_path / "v2"), "--data", str(answered), "--out",
                           str(tmp_path / "answered"))
    assert code == 0, err
    got = json.loads((tmp_path / "answered" / "metrics.json").read_text())
    assert "HasAns_exact" in got["metrics"] and "SQuAD v2.0" in got["signatures"]["squad"]
    # the recipe given to eval sets the threshold, as it sets decoding: far below, every question is abstained from
    code, _, err = run_cli("eval", str(recipe), "finetune.null_score_diff_threshold=-1000", "--split", "test",
                           "--out", str(tmp_path / "abstain"))
    assert code == 0, err
    assert {json.loads(line)["prediction"] for line in (tmp_path / "abstain" / "predictions.jsonl").open()} == {""}
    # a span head generates no text: decoding flags are refused, not recorded as if they had been used
    code, _, err = run_cli("eval", "--model", str(tmp_path / "v2"), "--split", "test", "--max-new-tokens", "5",
                           "--out", str(tmp_path / "flags"))
    assert_user_error(code, err, "--max-new-tokens: an extractive qa head", "generates no text")


def test_no_answer_windows_end_in_eos_and_point_there(tmp_path, base):
    from gptkit import trained
    from gptkit.recipe import load_recipe
    from gptkit.tasks import qa

    rows = qa_v2_rows(6, 3)
    recipe = load_recipe(finetune_recipe(tmp_path, "w", "qa", base, qa_splits(tmp_path, 20),
                                         finetune={"max_length": 32, "no_answer": True}))
    tok = trained.tokenizer_of(recipe.model.init_from)
    data = qa.preprocess(recipe, tok, rows, "train", SpanStub({}, n_positions=64))
    for w in data.rows:
        ids, row = w["input_ids"], rows[w["row"]]
        assert len(ids) <= 32 and ids[-1] == tok.eos_token_id
        if not row["answers"]["text"]:
            assert w["start_positions"] == w["end_positions"] == len(ids) - 1
        else:
            s, e = w["start_positions"], w["end_positions"]
            assert tok.decode(ids[s : e + 1]).strip() == row["answers"]["text"][0]
    # the v2 figures can pick best/ (validate knows them), only with finetune.no_answer
    v2 = finetune_recipe(tmp_path, "m", "qa", base, qa_splits(tmp_path, 20), finetune={"no_answer": True})
    assert run_cli("validate", str(v2), "finetune.metric=val_NoAns_f1")[0] == 0
    code, _, err = run_cli("validate", str(v2), "finetune.metric=val_NoAns_f1", "finetune.no_answer=false")
    assert code == 2 and "'val_NoAns_f1' is not a validation metric of qa" in err
    # without finetune.no_answer a row without an answer is one line naming the setting
    v1 = finetune_recipe(tmp_path, "v1", "qa", base, splits(tmp_path, qa_v2_rows, 20))
    for command in ("validate", "finetune"):
        code, _, err = run_cli(command, str(v1))
        assert code == 2 and "data.train_files: row 1 (from 0) has no answer" in err and "no_answer: true" in err
    # generative: a question without an answer is trained to stop right after the prompt
    gen = recipe.model_copy(update={"finetune": recipe.finetune.model_copy(update={"qa_mode": "generative"})})
    examples = qa.preprocess(gen, tok, rows[:2], "train", None)
    answered, empty = (examples.batch([i]) for i in (0, 1))
    assert (empty["labels"][0] != -100).sum() == 1 and tok.eos_token_id in empty["labels"][0].tolist()
    assert (answered["labels"][0] != -100).sum() > 1


def test_no_answer_prediction_follows_the_null_score_threshold(tmp_path, base):
    """A row answers "" when its lowest no-answer score (over its windows) beats its best span by more than
    finetune.null_score_diff_threshold."""
    from gptkit import trained
    from gptkit.recipe import load_recipe
    from gptkit.tasks import qa

    row = qa_row(["moon", MARKER, "tree", "lamp"], 2)
    tok = trained.tokenizer_of(base)

    class Null(torch.nn.Module):  # the span "tree" scores 2 + 2; the EOS position 3 + 3
        config, device = SimpleNamespace(n_positions=64), torch.device("cpu")

        def forward(self, input_ids, attention_mask):
            start, end = torch.zeros(input_ids.shape), torch.zeros(input_ids.shape)
            for j, ids in enumerate(input_ids.tolist()):
                n = int(attention_mask[j].sum())
                k = next(i for i in range(n) if tok.decode(ids[i : i + 1]).strip() == "tree")
                start[j, k] = end[j, k] = 2.0
                start[j, n - 1] = end[j, n - 1] = 3.0
            return SimpleNamespace(start_logits=start, end_logits=end)

    for threshold, expected in ((0.0, ""), (1.9, ""), (2.0, "tree"), (5.0, "tree")):
        recipe = load_recipe(finetune_recipe(tmp_path, "t", "qa", base, qa_splits(tmp_path, 20),
                                             finetune={"no_answer": True, "null_score_diff_threshold": threshold}))
        assert qa.predict(Null(), tok, [row], recipe) == [expected], threshold
