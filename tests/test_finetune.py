"""`gptkit finetune`: each task learns a deterministic mapping on held-out examples, scored by its real metric."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import assert_user_error, run_cli
from tasks_helpers import (SEED, classify_rows, finetune_recipe, learned_mapping, llama_base, lora_test_metrics,
                           preprocess_capped, pretrained_base, read_test_metrics, splits, summarize_rows, translate_rows,
                           write_jsonl)


# What LoRA (defaults: every linear layer, r 16; the recipe's lr and steps) reaches, as a share of the full
# fine-tune's figure on the same held-out data. The tiny bases are barely pretrained, so LoRA, which cannot move
# their embeddings, starts far behind; on a real base the gap is much smaller.
# Measured (seeds 1337 and 1, 1-2 threads): translate BLEU 20-33 of 88-95 (0.22+), summarize ROUGE-L 30-32 of
# 100, classify accuracy 100 of 100, multitask score 13.6-16.4 of ~98; the bounds leave room for other CPUs.
LORA_SHARE = {"translate": 0.1, "summarize": 0.15, "classify": 0.9, "multitask": 0.08}  # multitask: 0.14-0.17


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A barely pretrained 2-layer GPT with a BPE tokenizer that knows the task words."""
    return pretrained_base(tmp_path_factory.mktemp("base"))


@pytest.mark.slow
def test_translate_learns_a_word_mapping(tmp_path, base):
    recipe = finetune_recipe(tmp_path, "tr", "translate", base, splits(tmp_path, translate_rows),
                             train={"max_steps": 1200, "eval_every": 400, "save_every": 400})
    code, out, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    scores = read_test_metrics(tmp_path / "tr")
    assert learned_mapping(scores), scores
    assert (tmp_path / "tr" / "best" / "config.json").is_file()
    lora = lora_test_metrics(recipe, tmp_path / "tr-lora")
    assert lora["test_bleu"] >= LORA_SHARE["translate"] * scores["test_bleu"], (lora, scores)


@pytest.mark.slow
def test_summarize_learns_what_to_keep(tmp_path, base):
    recipe = finetune_recipe(tmp_path, "sum", "summarize", base, splits(tmp_path, summarize_rows),
                             finetune={"prompt": "{document} tldr", "eval_examples": 50, "max_new_tokens": 8})
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    full = read_test_metrics(tmp_path / "sum")["test_rougeL"]
    assert full >= 90
    lora = lora_test_metrics(recipe, tmp_path / "sum-lora")
    assert lora["test_rougeL"] >= LORA_SHARE["summarize"] * full, lora


@pytest.mark.slow
def test_classify_head_learns_the_rule(tmp_path, base):
    recipe = finetune_recipe(tmp_path, "cls", "classify", base, splits(tmp_path, classify_rows),
                             data={"columns": {"text": "sentence"}}, train={"max_steps": 150, "eval_every": 50})
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    scores = read_test_metrics(tmp_path / "cls")
    assert scores["test_accuracy"] >= 90 and min(scores["test_f1_warm"], scores["test_f1_cold"]) >= 85, scores
    assert scores["test_macro_f1"] == pytest.approx((scores["test_f1_warm"] + scores["test_f1_cold"]) / 2)
    config = json.loads((tmp_path / "cls" / "config.json").read_text())
    assert set(config["id2label"].values()) == {"warm", "cold"}
    logged = [json.loads(line) for line in (tmp_path / "cls" / "metrics.jsonl").read_text().splitlines()]
    validated = [r for r in logged if "val_loss" in r]
    assert validated and not any("val_perplexity" in r for r in logged)  # a head's loss is no perplexity
    code, _, err = run_cli("validate", str(recipe), "finetune.metric=val_perplexity")
    assert code == 2 and "'val_perplexity' is not a validation metric of classify" in err
    code, _, err = run_cli("generate", str(tmp_path / "cls"), "--prompt", "hello")
    assert code == 2 and "task head" in err and "Traceback" not in err, err
    lora = lora_test_metrics(recipe, tmp_path / "cls-lora")
    assert lora["test_accuracy"] >= LORA_SHARE["classify"] * scores["test_accuracy"], lora


@pytest.mark.slow
def test_llama_base_encodes_prompts_as_generation_does_and_learns(tmp_path):
    """A Llama-style tokenizer adds <s>: training examples start with it exactly as generation's prompts do, and
    the fine-tuned model translates held-out rows as a GPT-2 base does."""
    from gptkit import trained
    from gptkit.generation import DecodingOptions, _encode_prompts
    from gptkit.recipe import load_recipe
    from gptkit.tasks import translate

    base = llama_base(tmp_path / "llama")
    recipe = finetune_recipe(tmp_path, "ll", "translate", base, splits(tmp_path, translate_rows),
                             train={"max_steps": 1200, "eval_every": 400, "save_every": 400})
    tok = trained.tokenizer_of(base)
    rows = translate_rows(3, 7)
    data = translate.preprocess(load_recipe(recipe), tok, rows, "train")
    model = translate.build_model(load_recipe(recipe), tok, rows)
    for row, ex in zip(rows, data.rows):
        prompt = _encode_prompts(model, tok, [translate.PROMPT.format(**row)], DecodingOptions(max_new_tokens=8))[0]
        assert prompt[0] == tok.bos_token_id and ex["input_ids"][: len(prompt)] == prompt
        assert ex["labels"][: len(prompt)] == [-100] * len(prompt) and ex["input_ids"][-1] == tok.eos_token_id
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    assert learned_mapping(read_test_metrics(tmp_path / "ll"))


def test_llama_classifier_scores_as_a_plain_transformers_pipeline(tmp_path):
    """A Llama-style tokenizer adds <s>: classify trains and scores texts with it, so the merged export gives in a
    plain transformers pipeline the probabilities gptkit gives (training and scoring without <s> disagreed)."""
    from transformers import AutoModelForSequenceClassification, pipeline

    from gptkit import trained
    from gptkit.recipe import load_recipe
    from gptkit.tasks import classify

    base = llama_base(tmp_path / "llama")
    recipe = finetune_recipe(tmp_path, "cl", "classify", base, splits(tmp_path, classify_rows, 64),
                             data={"columns": {"text": "sentence"}},
                             train={"max_steps": 12, "eval_every": 12, "save_every": 12, "warmup_steps": 2})
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    code, _, err = run_cli("export", str(tmp_path / "cl"), "--merge")
    assert code == 0, err
    merged = tmp_path / "cl" / "merged"
    model = AutoModelForSequenceClassification.from_pretrained(str(merged)).eval()
    tok = trained.tokenizer_of(merged)
    rows = [{"text": r["sentence"], "label": r["label"]} for r in classify_rows(20, 3)]
    ours = classify.probabilities(model, tok, rows, load_recipe(merged / "recipe.yaml"))
    theirs = pipeline("text-classification", model=model, tokenizer=tok, top_k=None)([r["text"] for r in rows])
    for mine, other in zip(ours, theirs):
        assert mine == pytest.approx({o["label"]: o["score"] for o in other}, abs=1e-5), (mine, other)
    examples = classify.preprocess(load_recipe(recipe), tok, rows, "train", model).rows  # what training reads
    assert [ex["input_ids"] for ex in examples] == tok([r["text"] for r in rows])["input_ids"]


def test_prompt_masked_loss_is_padding_correct(tmp_path, base):
    """The summed loss of a padded batch equals the sum of each example's loss computed alone (per token and per
    example), and its count the target tokens (answer + EOS)."""
    import torch

    from gptkit import trained
    from gptkit.recipe import load_recipe
    from gptkit.tasks import translate

    rows = translate_rows(5, 9)
    rows[0]["source"] += " red red red"  # lengths differ, so the batch needs padding
    recipe = load_recipe(finetune_recipe(tmp_path, "p", "translate", base, splits(tmp_path, translate_rows, 20)))
    tok = trained.tokenizer_of(recipe.model.init_from)
    model = translate.build_model(recipe, tok, rows).eval()
    data = translate.preprocess(recipe, tok, rows, "train")
    assert len({len(r["input_ids"]) for r in data.rows}) > 1
    with torch.no_grad():
        for per in ("token", "example"):
            batched = translate.loss(model, data.batch(list(range(5))), per)
            alone = torch.stack([translate.loss(model, data.batch([i]), per) for i in range(5)]).sum()
            assert torch.allclose(batched, alone, atol=1e-4), (per, batched, alone)
    assert translate.count(data.batch(list(range(5)))) == sum(len(r["labels"]) - r["labels"].count(-100)
                                                               for r in data.rows)
    assert translate.count(data.batch(list(range(5))), per="example") == 5
    first = data.rows[0]
    n_prompt = first["labels"].count(-100)
    assert first["labels"][n_prompt:] == first["input_ids"][n_prompt:]  # loss on the target only...
    assert first["input_ids"][-1] == tok.eos_token_id  # ...which ends with EOS


@pytest.mark.parametrize("per", ["token", "example"])
def test_accumulated_micro_batches_give_the_whole_batch_gradient(tmp_path, base, per):
    """One step over 8 examples of different lengths: the gradient is the same whole, or in 4 micro-batches of
    2 (each divided by the step's items, not averaged per micro-batch)."""
    import torch
    from accelerate import Accelerator

    from gptkit import engine, trained
    from gptkit.recipe import load_recipe
    from gptkit.tasks import translate

    rows = translate_rows(8, 5)
    for i in range(0, 8, 3):
        rows[i]["target"] += " rot blau gruen"  # uneven target lengths, so per-micro-batch means would differ
    recipe = load_recipe(finetune_recipe(tmp_path, "g", "translate", base, splits(tmp_path, translate_rows, 20)))
    tok = trained.tokenizer_of(recipe.model.init_from)
    model = translate.build_model(recipe, tok, rows).eval()
    data = translate.preprocess(recipe, tok, rows, "train")
    acc = Accelerator(cpu=True)
    grads = []
    for parts in ([list(range(8))], [[0, 1], [2, 3], [4, 5], [6, 7]]):
        model.zero_grad()
        engine.backward_step(model, [data.batch(p) for p in parts], lambda m, b: translate.loss(m, b, per),
                             lambda b: translate.count(b, per), acc)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4), (grads[0] - grads[1]).abs().max()
    model.zero_grad()
    whole = data.batch(list(range(8)))
    (translate.loss(model, whole, per) / translate.count(whole, per)).backward()
    mean = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(grads[0], mean, atol=1e-6, rtol=1e-4)


def test_lora_trains_adapters_and_exports_a_merged_model(tmp_path, base):
    from transformers import AutoModelForCausalLM

    recipe = finetune_recipe(tmp_path, "lora", "translate", base, splits(tmp_path, translate_rows, 100),
                             finetune={"method": "lora", "lora_r": 4, "eval_examples": 10},
                             train={"max_steps": 10, "eval_every": 10, "save_every": 10})
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    run = tmp_path / "lora"
    assert (run / "adapter_config.json").is_file() and (run / "adapter_model.safetensors").is_file()
    (tmp_path / "afile").write_text("mine")
    code, out, err = run_cli("export", str(run), "--merge", "--out", str(tmp_path / "afile"))
    assert_user_error(code, err, "--out:", "is a file, not a folder")
    code, out, err = run_cli("export", str(run), "--merge")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(str(run / "merged"))
    base_model = AutoModelForCausalLM.from_pretrained(str(base))
    changed = [k for k, v in merged.state_dict().items() if not (v == base_model.state_dict()[k]).all()]
    # every linear layer of the blocks is adapted (attention and MLP); embeddings and the LM head are not
    assert {k.split(".")[-2] for k in changed} == {"c_attn", "c_proj", "c_fc"}, changed
    assert all(k.startswith("transformer.h.") for k in changed), changed
    # gptkit generate takes the LoRA run itself (adapters on its base) and agrees with the merged model
    said = [run_cli("generate", str(d), "--prompt", "red big =>", "--max-new-tokens", "8") for d in (run, run / "merged")]
    assert said[0][0] == 0 and said[0][1] == said[1][1] and said[0][1].strip(), said


def test_lora_on_a_bfloat16_base(tmp_path, base):
    """model.dtype: bfloat16 loads the base in bf16 (a 7B base never materialises in fp32); LoRA adapters train in
    fp32 on it; the run reloads the same way, and validate estimates the memory of each method."""
    import torch

    from gptkit import trained
    from gptkit.recipe import load_recipe

    recipe = finetune_recipe(tmp_path, "bf", "translate", base, splits(tmp_path, translate_rows, 40),
                             model={"dtype": "bfloat16"}, finetune={"method": "lora", "eval_examples": 4},
                             train={"max_steps": 6, "eval_every": 6, "save_every": 6, "batch_size": 8})
    code, out, err = run_cli("validate", str(recipe))
    assert code == 0 and "model.dtype bfloat16" in out and "LoRA" in out and "sharded over 8" in out, out
    assert "activations of 8 x 256 tokens" in out, out
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "bf" / "metrics.jsonl").read_text().splitlines()
              if "train_loss" in line]
    assert losses and all(loss == loss and loss < 20 for loss in losses)  # finite
    model = trained.load_model(tmp_path / "bf", "translate", load_recipe(tmp_path / "bf" / "recipe.yaml"))
    dtypes = {next((k for k in ("lora_A", "lora_B") if k in name), "base"): p.dtype for name, p in model.named_parameters()}
    assert dtypes["base"] == torch.bfloat16 and dtypes["lora_A"] == dtypes["lora_B"] == torch.float32, dtypes


@pytest.mark.parametrize(
    "case, sections, needles",
    [
        ("missing column", {"data": {"columns": {"source": "src"}}}, ["no column src", "columns found"]),
        ("bad lora target", {"finetune": {"method": "lora", "lora_targets": ["nope"]}}, ["finetune.lora_targets"]),
        ("no base", {"model": {"init_from": None}}, ["model.init_from"]),
        ("misspelled metric", {"finetune": {"metric": "val_blue"}},
         ["finetune.metric: 'val_blue' is not a validation metric of translate; expected one of", "val_bleu"]),
    ],
)
def test_bad_finetune_input(tmp_path, base, case, sections, needles):
    recipe = finetune_recipe(tmp_path, "bad", "translate", base, splits(tmp_path, translate_rows, 20), **sections)
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 2 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("prompt", ["Translate {source} to {}:", "{source =>", "{source.x} =>", "{0}", "a } {source}"])
def test_a_prompt_with_stray_braces_is_one_line_in_validate_and_finetune(tmp_path, base, prompt):
    """A brace str.format cannot read (IndexError, ValueError, AttributeError from it before) names finetune.prompt
    and how to write a literal brace: in `gptkit validate` as in finetune, before anything is written; a doubled
    brace is a literal one."""
    import yaml

    s = splits(tmp_path, translate_rows, 20)
    recipe = finetune_recipe(tmp_path, "bad", "translate", base, s, finetune={"prompt": prompt})
    for command in ("validate", "finetune"):
        code, _, err = run_cli(command, str(recipe))
        assert_user_error(code, err, f"finetune.prompt: {prompt!r} is not a valid template", "{source}", "{{ }}")
    assert not (tmp_path / "bad").exists()
    code, _, err = run_cli("validate", str(recipe), "finetune.prompt={{{source}}} =>")
    assert code == 0, err
    multi = {"task": "multitask", "model": {"init_from": str(base)}, "output": {"dir": str(tmp_path / "bad")},
             "finetune": {"max_new_tokens": 16,  # (the default 64 is the test base's whole context: refused first)
                          "tasks": [{"task": "translate", "train_files": [str(s["train"])]},
                                    {"task": "translate", "train_files": [str(s["train"])], "prompt": prompt}]}}
    (tmp_path / "mt.yaml").write_text(yaml.safe_dump(multi))
    code, _, err = run_cli("validate", str(tmp_path / "mt.yaml"))
    assert_user_error(code, err, "finetune.tasks[1].prompt: ")


def test_lora_is_refused_on_a_tied_embedding():
    """An adapter on GPT-2's wte would also shift the tied output layer once merged (export --merge would score
    differently from the run): refused in one line; untied, or on the blocks only, it is allowed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptkit import finetune as ft
    from gptkit.errors import UserError
    from gptkit.recipe import Recipe

    def lora(targets, tie=True):
        model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=8,
                                           tie_word_embeddings=tie))
        recipe = Recipe.model_validate({"task": "translate", "finetune": {"method": "lora", "lora_targets": targets}})
        return ft._lora(recipe, model, "translate")

    with pytest.raises(UserError, match="finetune.lora_targets: 'transformer.wte' shares its weight with the output"):
        lora(["wte", "c_attn"])
    with pytest.raises(UserError, match="'lm_head' shares its weight with the input embedding"):
        lora(["lm_head"])
    assert lora(["c_attn"]) is not None and lora(["wte", "c_attn"], tie=False) is not None


def test_classify_examples_fit_the_model_and_keep_the_pair(base):
    """finetune.max_length (default 256) is capped by the model's positions (an IndexError mid-training before), and a
    long first text loses its end before the pair does (longest first)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from gptkit import trained
    from gptkit.recipe import Recipe
    from gptkit.tasks import classify

    tok = trained.tokenizer_of(str(base))
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=16, n_layer=1,
                                                     n_head=2, num_labels=1, label2id={"a": 0}, id2label={0: "a"}))
    recipe = Recipe.model_validate({"task": "classify"})
    long = " ".join(["red"] * 40)
    rows = [{"text": long, "text_pair": "blue sky", "label": "a"}, {"text": long, "label": "a"},
            {"text": "red", "text_pair": long, "label": "a"}]
    data = classify.preprocess(recipe, tok, rows, "train", model)
    ids = [data.batch([i])["input_ids"][0].tolist() for i in range(3)]
    assert [len(x) for x in ids] == [16, 16, 16]
    assert tok.decode(ids[0]).endswith(classify.SEP + "blue sky") and tok.decode(ids[2]).startswith("red" + classify.SEP)


def test_classify_from_a_classifier_keeps_or_reinitialises_its_head(tmp_path, base, caplog):
    """A classifier as the base: with other labels of another count its head is re-initialised and that is logged
    (a RuntimeError traceback before); with its own labels each keeps its row of the head, in the base's order
    (not re-sorted, which swapped what the rows meant)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from gptkit import trained
    from gptkit.recipe import Recipe
    from gptkit.tasks import classify

    tok = trained.tokenizer_of(str(base))
    first = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2, id2label={0: "warm", 1: "cold"},
                                                               label2id={"warm": 0, "cold": 1})
    first.config.pad_token_id = tok.pad_token_id
    first.save_pretrained(tmp_path / "cls")
    tok.save_pretrained(tmp_path / "cls")
    recipe = Recipe.model_validate({"task": "classify", "model": {"init_from": str(tmp_path / "cls")}})
    with caplog.at_level("WARNING"):
        three = classify.build_model(recipe, tok, [{"label": x} for x in ("a", "b", "c")])
    assert three.score.weight.shape[0] == 3 and three.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert "is a classifier with 2 labels, the training split has 3: its head (score.weight) is re-initialised" \
        in caplog.text, caplog.text
    assert torch.equal(three.transformer.wte.weight, first.transformer.wte.weight)
    same = classify.build_model(recipe, tok, [{"label": x} for x in ("cold", "warm")])
    assert same.config.id2label == {0: "warm", 1: "cold"} and torch.equal(same.score.weight, first.score.weight)


def test_splits_are_read_on_demand_and_tokenized_in_chunks_compactly(tmp_path, base, monkeypatch):
    """Rows come from the Arrow table as they are read (a slice, an index, iteration give the file's rows under
    the task's field names); tokenizing in chunks gives the examples one call for all gives; token ids are kept as
    uint16 or int32 arrays (a Python list of ints costs ~9-18x as much)."""
    import numpy as np

    from gptkit import data as data_mod
    from gptkit import trained
    from gptkit.recipe import load_recipe
    from gptkit.tasks import classify, generative, translate

    s = splits(tmp_path, classify_rows, 23)
    rows = data_mod.load_rows([str(s["train"])], "data.train_files", classify.FIELDS, classify.OPTIONAL,
                              {"text": "sentence"})
    given = [json.loads(line) for line in s["train"].read_text().splitlines()]
    expect = [{"text": g["sentence"], "label": g["label"]} for g in given]
    assert len(rows) == 23 and list(rows) == expect and rows[3:7] == expect[3:7] and rows[-1] == expect[-1]
    assert rows[::5] == expect[::5] and rows[30:] == []
    with pytest.raises(IndexError):
        rows[23]

    recipe = load_recipe(finetune_recipe(tmp_path, "c", "classify", base, s, data={"columns": {"text": "sentence"}}))
    tok = trained.tokenizer_of(recipe.model.init_from)
    model = classify.build_model(recipe, tok, rows)
    t_recipe = load_recipe(finetune_recipe(tmp_path, "t", "translate", base, splits(tmp_path, translate_rows, 20)))
    t_rows = translate_rows(23, 4)
    def both():
        return [classify.preprocess(recipe, tok, rows, "train", model), translate.preprocess(t_recipe, tok, t_rows, "train")]

    whole = both()
    monkeypatch.setattr(generative, "CHUNK", 4)
    chunked = both()
    for a, b in zip(whole, chunked):
        assert len(a) == len(b) == 23 and list(a.rows) == list(b.rows)
        for key in a.batch([0]):
            assert a.batch(list(range(23)))[key].equal(b.batch(list(range(23)))[key]), key
    flat, offsets = chunked[1].rows.cols["input_ids"]  # a 300-token vocabulary: 2 bytes a token
    assert flat.dtype == np.uint16 and offsets[-1] == len(flat) == sum(len(r["input_ids"]) for r in chunked[1].rows)
    prompts = chunked[1].rows.cols["labels"].prompt  # labels = the ids with the prompt masked: its length suffices
    assert prompts.shape == (23,) and [r["labels"].count(-100) for r in chunked[1].rows] == prompts.tolist()
    mixed = generative.Rows.concat([chunked[1].rows, generative.Rows([{"input_ids": [5, 6], "labels": [6, -100]}])])
    assert list(mixed) == [*chunked[1].rows, {"input_ids": [5, 6], "labels": [6, -100]}]
    assert chunked[1].rows[0]["labels"].count(-100) > 0 and isinstance(chunked[0].rows[5]["label"], int)


def test_plain_ids_equal_the_tokenizer_call(tmp_path, base):
    """The batch encode gptkit calls straight on the Rust tokenizer gives tokenizer(texts, add_special_tokens=False):
    byte-level BPE, a Llama-style tokenizer (BOS added only with special tokens), a SentencePiece-style one
    (Metaspace), text holding special tokens, and after a truncating call left its setting on the backend."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gptkit import trained
    from gptkit.tokenizer import plain_ids, prompts_ids

    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    sp.train_from_iterator([" ".join(translate_rows(1, 0)[0].values())] * 50,
                           trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    spm = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    texts = ["red blue <|endoftext|> sky", "  two  spaces", "", "</s> the <s> end", "über 😀 x"]
    for tok in (trained.tokenizer_of(str(base)), trained.tokenizer_of(str(llama_base(tmp_path / "llama"))), spm):
        want = tok(texts, add_special_tokens=False)["input_ids"]
        assert plain_ids(tok, texts) == want
        tok("red blue sky", truncation=True, max_length=2)  # a setting left on the Rust tokenizer
        assert plain_ids(tok, texts) == want
        bos = [tok.bos_token_id] if tok("a")["input_ids"][0] == tok.bos_token_id != tok("a", add_special_tokens=False)[
            "input_ids"][0] else []
        assert prompts_ids(tok, texts) == [bos + w for w in want]  # Llama-style: <s> first, as generation encodes


def test_a_row_without_a_value_is_refused(tmp_path, base):
    """A blank csv cell or a missing jsonl key is one line naming the file, row and column (not the label or
    target "None"), in training data as in the test split checked before training."""
    s = splits(tmp_path, classify_rows, 40)
    write_jsonl(s["train"], classify_rows(40, 1) + [{"sentence": "red red red"}])
    recipe = finetune_recipe(tmp_path, "bad", "classify", base, s, data={"columns": {"text": "sentence"}})
    code, _, err = run_cli("finetune", str(recipe))
    assert_user_error(code, err, f"data.train_files: {s['train']}: row 40 (from 0) has no value for column 'label'")
    s = splits(tmp_path, translate_rows, 20)
    s["test"].write_text(s["test"].read_text() + '{"source": "a man without a target"}\n')
    recipe = finetune_recipe(tmp_path, "bad", "translate", base, s)
    code, _, err = run_cli("finetune", str(recipe))
    assert_user_error(code, err, "data.test_files", "has no value for column 'target'")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("content, needle", [
    (b'{"text": "caf\xe9", "label": "pos"}\n', "line 41: not valid UTF-8 text"),  # Arrow keeps such bytes: read lazily
    (b"\n  \n", "no rows (the file holds only blank lines)"),
    (b"text,label\nred,pos\n", "line 1: invalid JSON"),  # a csv named .jsonl
])
def test_a_split_file_that_is_not_jsonl_text_is_one_line_in_validate_and_finetune(tmp_path, base, content, needle,
                                                                                  capfd):
    s = splits(tmp_path, classify_rows, 40)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes((s["train"].read_bytes() if b"caf" in content else b"") + content)
    recipe = finetune_recipe(tmp_path, "bad", "classify", base, {**s, "train": bad})
    for command in ("validate", "finetune"):
        code, _, err = run_cli(command, str(recipe))
        assert_user_error(code, err, f"data.train_files: {bad}: {needle}")
    assert "Failed to" not in capfd.readouterr().err  # datasets' own log line no longer comes first
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("split, value, kind", [("train", {"a": 1}, "an object"), ("test", ["b"], "an array"),
                                                ("train", 5, "a number (5)"), ("validation", True, "a boolean (true)")])
def test_a_text_field_that_is_not_a_string_is_refused(tmp_path, base, split, value, kind):
    """{"source": {"a": 1}} trained on the prompt "{'a': 1} =>": a JSON value that is not a string in a text field is
    one line naming the file, row and column (as pretraining refuses one), in validate and before training, a
    multi-task recipe's files too; a csv cell is text whatever it reads as."""
    import yaml

    s = splits(tmp_path, translate_rows, 20)
    rows = translate_rows(20, 1)
    rows[3]["source"] = value
    write_jsonl(s[split], rows)
    where = {"train": "data.train_files", "validation": "data.val_files", "test": "data.test_files"}[split]
    recipe = finetune_recipe(tmp_path, "bad", "translate", base, s)
    for command in ("validate", "finetune"):
        code, _, err = run_cli(command, str(recipe))
        assert_user_error(code, err, f"{where}: {s[split]}: row 3 (from 0): column 'source': expected a string, got {kind}")
    multi = {"task": "multitask", "model": {"init_from": str(base)}, "output": {"dir": str(tmp_path / "bad")},
             "finetune": {"max_new_tokens": 16,  # (the default 64 is the test base's whole context: refused first)
                          "tasks": [{"task": "translate", "train_files": [str(s[split])]}]}}
    (tmp_path / "mt.yaml").write_text(yaml.safe_dump(multi))
    code, _, err = run_cli("validate", str(tmp_path / "mt.yaml"))
    assert_user_error(code, err, f"finetune.tasks[0].train_files: {s[split]}: row 3 (from 0): column 'source'")
    assert not (tmp_path / "bad").exists()
    csv = tmp_path / "train.csv"
    csv.write_text("source,target\n" + "".join(f"{k},{r['target']}\n" for k, r in enumerate(translate_rows(20, 1))))
    code, _, err = run_cli("validate", str(finetune_recipe(tmp_path, "ok", "translate", base, dict.fromkeys(s, csv))))
    assert code == 0, err


def test_the_done_line_reports_the_kept_checkpoint_not_the_last_step(tmp_path, base):
    """The run's model is its best checkpoint (as the Trainer's load_best_model_at_end): the final line gives that
    step and its validation figures beside the test figures of the same model, not the last step's. The metric and
    direction chosen here pick the highest validation loss: the best is whichever evaluation had it."""
    s = splits(tmp_path, classify_rows, 64)
    recipe = finetune_recipe(tmp_path, "best", "classify", base, s, data={"columns": {"text": "sentence"}},
                             train={"max_steps": 12, "eval_every": 4, "save_every": 4, "batch_size": 8},
                             finetune={"metric": "val_loss", "metric_higher_is_better": True})
    code, out, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "best" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    best = max(evals, key=evals.get)
    done = next(line for line in out.splitlines() if line.startswith("done: "))
    assert f"the best checkpoint, step {best}: " in done and f"val_loss {evals[best]:.4f}" in done, (done, evals)
    assert "test_accuracy" in done


def test_a_resume_drops_a_best_model_written_after_its_checkpoint(tmp_path, base, caplog):
    """best/ newer than the checkpoint a resume starts from (the interrupted run evaluated, saved best/, then died
    before its next checkpoint): it is not the checkpoint's best, and a resumed run that never beat that best kept
    it while reporting another step. It goes; the resumed run's own evaluations pick the best, and the final line,
    best/ and the run folder agree on the step."""
    import shutil

    s = splits(tmp_path, classify_rows, 64)
    recipe = finetune_recipe(tmp_path, "run", "classify", base, s, data={"columns": {"text": "sentence"}},
                             train={"max_steps": 12, "eval_every": 4, "save_every": 8, "batch_size": 8})
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    marker = tmp_path / "run" / "best" / "gptkit_best.json"
    marker.write_text(json.dumps({"step": 12}))  # as if step 12 had been the best, then the run died before saving
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000012")
    with caplog.at_level("WARNING", logger="gptkit"):
        code, out, err = run_cli("finetune", str(recipe), "--resume")
    assert code == 0, err
    assert "best/ holds step 12's model, written after the checkpoint this run resumes from" in caplog.text
    done = next(line for line in out.splitlines() if line.startswith("done: "))
    assert "the best checkpoint, step 12: " in done and json.loads(marker.read_text())["step"] == 12, done


def test_unseen_labels_and_unknown_task(tmp_path, base):
    s = splits(tmp_path, classify_rows, 40)
    write_jsonl(s["validation"], [{"sentence": "red red red", "label": "tepid"}])
    recipe = finetune_recipe(tmp_path, "bad", "classify", base, s, data={"columns": {"text": "sentence"}})
    for command in ("validate", "finetune"):  # validate checks what fine-tuning refuses
        code, _, err = run_cli(command, str(recipe))
        assert code == 2 and "never seen in training" in err and "tepid" in err, err
    code, _, err = run_cli("finetune", str(recipe), "--task", "poetry")
    assert code == 2 and "not a fine-tuning task" in err
    s = splits(tmp_path, classify_rows, 40)  # the test split is checked before training, not after it
    write_jsonl(s["test"], [{"sentence": "red red red", "label": "lukewarm"}])
    recipe = finetune_recipe(tmp_path, "bad", "classify", base, s, data={"columns": {"text": "sentence"}})
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 2 and "test split has labels never seen in training" in err and "lukewarm" in err, err
    assert not (tmp_path / "bad").exists()


def test_a_classifier_needs_two_labels(tmp_path, base):
    """A training split with one label trained to loss 0 and accuracy 100 (and num_labels 1 is regression to
    transformers): one line naming data.train_files and the label's column, in validate as in finetune."""
    s = splits(tmp_path, classify_rows, 40)
    recipe = finetune_recipe(tmp_path, "bad", "classify", base, s, data={"columns": {"text": "sentence", "label": "y"}})
    for split, path in s.items():  # the label column named y; the training split all "warm"
        write_jsonl(path, [{"sentence": r["sentence"], "y": "warm" if split == "train" else r["label"]}
                           for r in classify_rows(20, 1)])
    for command in ("validate", "finetune"):
        code, _, err = run_cli(command, str(recipe))
        assert_user_error(code, err, "data.train_files: every row has the label 'warm' (column 'y')", "at least 2")
    assert not (tmp_path / "bad").exists()


def test_every_bundled_finetune_recipe_validates(base):
    """Each bundled fine-tuning recipe resolves, finds its files and columns, sees the base model, and its batch
    fits its training data."""
    from gptkit import finetune as ft
    from gptkit.cli import bundled_recipes_dir
    from gptkit.recipe import load_recipe

    paths = sorted(p for p in bundled_recipes_dir().rglob("*.yaml") if p.parent.name not in ("pretrain", "accelerate"))
    assert {p.parent.name for p in paths} >= {"translate", "classify", "summarize"}
    for path in paths:  # (the test base has 64 positions, the bundled ones' bases more: the answer's room fits it)
        recipe = load_recipe(path, [f"model.init_from={base}", "finetune.max_new_tokens=16"])
        lines = ft.describe(recipe, recipe.task)
        assert "rows per split: train" in lines[0], (path, lines)


@pytest.mark.slow
def test_multitask_learns_both_tasks_in_one_model(tmp_path, base):
    """translate and summarize share one model, sampled 1:1; each is scored with its own metric."""
    import yaml

    (tmp_path / "tr").mkdir()
    (tmp_path / "su").mkdir()
    tr, su = splits(tmp_path / "tr", translate_rows), splits(tmp_path / "su", summarize_rows)
    recipe = {
        "task": "multitask",
        "model": {"init_from": str(base)},
        "finetune": {"eval_examples": 100, "max_new_tokens": 16, "tasks": [
            {"task": "translate", "weight": 1.0, **{f"{k}_files": [str(v)] for k, v in
                                                    (("train", tr["train"]), ("val", tr["validation"]), ("test", tr["test"]))}},
            {"task": "summarize", "weight": 1.0, "prompt": "{document} tldr",
             **{f"{k}_files": [str(v)] for k, v in (("train", su["train"]), ("val", su["validation"]), ("test", su["test"]))}},
        ]},
        "train": {"max_steps": 800, "batch_size": 16, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20,
                  "eval_every": 400, "save_every": 400, "log_every": 50, "weight_decay": 0.0, "seed": SEED},
        "output": {"dir": str(tmp_path / "mt")},
    }
    path = tmp_path / "mt.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli("finetune", str(path))
    assert code == 0, err
    scores = read_test_metrics(tmp_path / "mt")
    assert learned_mapping(scores, "test_translate_") and scores["test_summarize_rougeL"] >= 90, scores
    lora = lora_test_metrics(path, tmp_path / "mt-lora")
    assert lora["test_score"] >= LORA_SHARE["multitask"] * scores["test_score"], lora
    assert scores["test_score"] == pytest.approx((scores["test_translate_bleu"] + scores["test_summarize_rougeL"]) / 2)
    code, _, err = run_cli("eval", "--model", str(tmp_path / "mt"), "--batch-size", "0")
    assert code == 2 and "--batch-size" in err and "Traceback" not in err, err  # checked before any task runs
    # gptkit eval scores the run as a whole (each task on its own test files, with its own prompt), or one task
    code, out, err = run_cli("eval", "--model", str(tmp_path / "mt" / "best"), "--split", "test")
    assert code == 0, err
    whole = json.loads((tmp_path / "mt" / "eval-multitask" / "metrics.json").read_text())["metrics"]
    assert {f"test_{k}": v for k, v in whole.items()} == pytest.approx(scores) and "score" in out
    assert (tmp_path / "mt" / "eval-multitask" / "summarize" / "predictions.jsonl").is_file()
    code, _, err = run_cli("eval", "--model", str(tmp_path / "mt" / "best"), "--task", "summarize", "--out",
                           str(tmp_path / "one"))
    assert code == 0, err
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())["metrics"]
    assert one["rougeL"] == pytest.approx(scores["test_summarize_rougeL"])  # the task's own prompt, not the default


@pytest.mark.distributed
def test_two_process_finetune_with_validation_matches_one_process(tmp_path, base):
    """torchrun with 2 processes x batch 4 == 1 process x batch 8: validation generation is split between the
    processes, best/ and early stopping are decided once, and the run scores its test split as 1 process does."""
    import os
    import subprocess
    import sys

    s = splits(tmp_path, translate_rows, 200)
    runs = {}
    for name, batch in (("two", 4), ("one", 8)):
        recipe = finetune_recipe(tmp_path, name, "translate", base, s, finetune={"eval_examples": 11, "patience": 2,
                                                                                "max_new_tokens": 8},
                                 train={"max_steps": 60, "eval_every": 10, "save_every": 30, "batch_size": batch,
                                        "lr": 1e-4, "min_lr": 1e-4, "warmup_steps": 0, "schedule": "constant"})
        launch = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"] if name == "two" \
            else []
        res = subprocess.run([sys.executable, *launch, "-m", "gptkit", "finetune", str(recipe)], capture_output=True,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = ([r for r in lines if "val_bleu" in r], read_test_metrics(tmp_path / name))
    (val2, test2), (val1, test1) = runs["two"], runs["one"]
    # a small learning rate keeps the two runs' weights equal to float rounding, so any difference in what they
    # generate would come from splitting validation between processes; the flat score stops both early at step 30
    assert [r["step"] for r in val2] == [r["step"] for r in val1] == [10, 20, 30]
    for r1, r2 in zip(val1, val2):
        assert r2["val_loss"] == pytest.approx(r1["val_loss"], rel=2e-3)  # float sums differ in order only
        assert r2["val_bleu"] == pytest.approx(r1["val_bleu"], abs=1e-6)
    assert test2 == pytest.approx(test1, abs=1e-6)
    before = (tmp_path / "one" / "metrics.jsonl").read_text()
    code, _, err = run_cli("finetune", str(recipe), "--resume")  # an early-stopped run is finished: no more steps
    assert code == 0 and (tmp_path / "one" / "metrics.jsonl").read_text() == before, err
    assert not (tmp_path / "one" / "checkpoints" / "step-00000040").exists()


def test_a_full_disk_at_best_is_one_line(tmp_path, base, monkeypatch):
    """best/ that cannot be written stops the run (exit 3) in one line naming the disk; no half-written folder."""
    from gptkit import engine

    recipe = finetune_recipe(tmp_path, "tr", "translate", base, splits(tmp_path, translate_rows, 40),
                             finetune={"eval_examples": 4, "max_new_tokens": 4},
                             train={"max_steps": 4, "eval_every": 2, "save_every": 2})
    real = engine.write_model

    def full(raw, folder, *args):
        if folder.name == ".best.tmp":
            folder.mkdir()
            raise OSError(28, "No space left on device")
        return real(raw, folder, *args)

    monkeypatch.setattr(engine, "write_model", full)
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 3 and "Traceback" not in err, err
    assert f"could not write {tmp_path / 'tr' / 'best'} (step 2's model, the best so far): No space left" in err
    assert "there is no earlier checkpoint" in err and not (tmp_path / "tr" / ".best.tmp").exists()


def test_multitask_eval_scores_the_tasks_that_have_the_split(tmp_path, base):
    """As the run's test_metrics.json: a task without test files is not scored (never its validation files under a
    test label); a split no task has is one line before anything is scored or written."""
    import yaml

    (tmp_path / "tr").mkdir()
    (tmp_path / "su").mkdir()
    tr, su = splits(tmp_path / "tr", translate_rows, 8), splits(tmp_path / "su", summarize_rows, 8)
    recipe = {"task": "multitask", "model": {"init_from": str(base)}, "output": {"dir": str(tmp_path / "mt")},
              "finetune": {"max_new_tokens": 4, "tasks": [
                  {"task": "translate", "train_files": [str(tr["train"])], "test_files": [str(tr["test"])]},
                  {"task": "summarize", "prompt": "{document} tldr", "train_files": [str(su["train"])],
                   "val_files": [str(su["validation"])]}]}}
    path = tmp_path / "mt.yaml"
    path.write_text(yaml.safe_dump(recipe))
    mine = tmp_path / "mine"  # a folder of the user's: its metrics.json and report.md are not overwritten
    mine.mkdir()
    (mine / "metrics.json").write_text("{}")
    (mine / "report.md").write_text("my notes")
    code, _, err = run_cli("eval", str(path), "--limit", "4", "--max-new-tokens", "4", "--out", str(mine))
    assert_user_error(code, err, "not empty and holds no gptkit evaluation")
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.json", "report.md"]
    assert (mine / "report.md").read_text() == "my notes" and (mine / "metrics.json").read_text() == "{}"
    code, _, err = run_cli("eval", str(path), "--limit", "4", "--max-new-tokens", "4", "--out", str(tmp_path / "test"))
    assert code == 0, err
    result = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert result["counts"] == {"translate": 4} and result["metrics"]["score"] == result["metrics"]["translate_bleu"]
    assert not (tmp_path / "test" / "summarize").exists()
    code, _, err = run_cli("eval", str(path), "--limit", "4", "--max-new-tokens", "4", "--split", "validation", "--out",
                           str(tmp_path / "val"))
    assert code == 0 and list(json.loads((tmp_path / "val" / "metrics.json").read_text())["counts"]) == ["summarize"]
    before = (tmp_path / "test" / "metrics.json").read_text()
    code, _, err = run_cli("eval", str(path), "--limit", "4", "--max-new-tokens", "4", "--split", "validation", "--out",
                           str(tmp_path / "test"))  # the folder of the test split's evaluation
    assert_user_error(code, err, "holds an evaluation of something else", "split")
    assert (tmp_path / "test" / "metrics.json").read_text() == before
    recipe["finetune"]["tasks"][1].pop("val_files")
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli("eval", str(path), "--split", "validation", "--out", str(tmp_path / "none"))
    assert_user_error(code, err, "--split: 'validation': no task of this multi-task run has finetune.tasks[].val_files")
    assert not (tmp_path / "none").exists()


def test_multitask_mixing_sees_every_row_equally_often():
    """The bundled Multi30k + SciTLDR mix, scaled down: 1,000 translation and 200 summarization rows at 2:1. Each
    epoch draws 800 translation rows and 400 summaries (each exactly twice); over 5 epochs every translation row is
    seen exactly 4 times (the old first-rows share never saw 200 of them), and the draw is a pure function of (seed, epoch, slot)."""
    from collections import Counter

    from gptkit.tasks.generative import Examples
    from gptkit.tasks.multitask import Mixture

    tr = Examples([{"input_ids": [0, i], "labels": [i]} for i in range(1000)], 0)
    su = Examples([{"input_ids": [1, i], "labels": [i]} for i in range(200)], 0)
    mix = Mixture([(2.0, tr), (1.0, su)], weighted=True, seed=3)
    assert mix.sizes == [800, 400]
    seen: dict[int, Counter] = {0: Counter(), 1: Counter()}
    for epoch in range(5):
        batch = mix.batch(list(range(len(mix))), [epoch] * len(mix))["input_ids"].tolist()
        this = Counter((t, i) for t, i in batch)
        assert sum(this[(0, i)] for i in range(1000)) == 800
        assert epoch > 0 or all(n == 1 for (t, _), n in this.items() if t == 0)  # first pass: no repeats
        assert all(this[(1, i)] == 2 for i in range(200))
        for t, i in batch:
            seen[t][i] += 1
    assert len(seen[0]) == 1000 and set(seen[0].values()) <= {4} and set(seen[1].values()) == {10}
    again = Mixture([(2.0, tr), (1.0, su)], weighted=True, seed=3)
    assert again.batch([5, 900, 1100], [3, 3, 7])["input_ids"].tolist() == mix.batch([5, 900, 1100], [3, 3, 7])["input_ids"].tolist()
    other = Mixture([(2.0, tr), (1.0, su)], weighted=True, seed=4)
    assert other.batch(list(range(50)))["input_ids"].tolist() != mix.batch(list(range(50)))["input_ids"].tolist()


def test_multitask_weights_set_each_tasks_share():
    from gptkit.tasks.generative import Examples
    from gptkit.tasks.multitask import Mixture

    a = Examples([{"input_ids": [1], "labels": [1]}] * 30, 0)
    b = Examples([{"input_ids": [2], "labels": [2]}] * 90, 0)
    mix = Mixture([(3.0, a), (1.0, b)], weighted=True)
    ids = mix.batch(list(range(len(mix))))["input_ids"][:, 0].tolist()
    assert ids.count(1) == 90 and ids.count(2) == 30  # 3:1 by weight, whatever the sizes
    plain = Mixture([(3.0, a), (1.0, b)], weighted=False)
    assert len(plain) == 120  # validation and test: every example once


def test_validate_command_on_a_finetune_recipe(base):
    code, out, err = run_cli("validate", "translate/multi30k-tiny", f"model.init_from={base}")
    assert code == 0, err
    assert "rows per split: train 10000, validation 1014, test 500" in out
    assert "launch: accelerate launch --num_processes 1 -m gptkit finetune translate/multi30k-tiny" in out
    code, out, err = run_cli("validate", "translate/multi30k-tiny", f"model.init_from={base}", "finetune.method=lora")
    assert code == 0, err  # the recipe sets train.lr, so LoRA keeps it; every linear layer of the blocks is adapted
    assert "method: lora (r 16, alpha 32, lr 0.001, on c_attn, c_fc, c_proj)" in out, out


def test_evaluation_runs_outside_the_mixed_precision_wrapper():
    """accelerate wraps a prepared model's forward in autocast; validation and test scoring use the model's
    own forward (fp32 weights, as saved; generation under per-op autocast was 3.9x slower on an H100)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptkit.engine import own_forward

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50, n_positions=16)).eval()
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        reference = model(ids).logits
        AcceleratorState._reset_state(True)  # a singleton: earlier in-process runs fixed its precision
        try:
            prepared = Accelerator(mixed_precision="bf16", cpu=True).prepare_model(model)
        finally:
            AcceleratorState._reset_state(True)
        wrapped = prepared(ids).logits
        with own_forward(prepared):
            own = prepared(ids).logits
        after = prepared(ids).logits
    assert not torch.equal(wrapped, reference)  # autocast was on: bf16 matmuls
    assert torch.equal(own, reference)
    assert torch.equal(after, wrapped)  # the training forward is restored


def test_long_documents_lose_their_end_not_the_instruction(tmp_path, base, caplog):
    """A summarize example too long for finetune.max_length keeps the document's start and the "TL;DR:" cue
    (the document field is shortened), in training and in the prompts generated from."""
    from gptkit.tasks import generative as gen
    from gptkit.tasks import summarize

    rows = summarize_rows(3, 4)
    rows[0]["document"] = " ".join([rows[0]["document"]] * 20)
    data, tok = preprocess_capped(tmp_path, "summarize", base, rows, summarize_rows, 40, caplog)
    assert "1 of 3 examples longer than 40 tokens were truncated" in caplog.text
    long = data.rows[0]
    n_prompt = long["labels"].count(-100)
    prompt = tok.decode(long["input_ids"][:n_prompt])
    answer = tok(rows[0]["summary"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(long["input_ids"]) <= 40 and long["input_ids"][n_prompt:] == answer  # the whole summary is kept
    assert prompt.endswith("\nTL;DR:") and rows[0]["document"].startswith(prompt[: -len("\nTL;DR:")].rstrip())
    assert tok.decode(data.rows[1]["input_ids"]).startswith(rows[1]["document"])
    text, _, cut = gen.fit_prompt(tok, summarize.PROMPT, rows[0], "document", 24)
    assert cut and text.endswith("\nTL;DR:") and len(tok(text)["input_ids"]) <= 24


def test_empty_split_and_base_without_tokenizer(tmp_path, base):
    import shutil

    s = splits(tmp_path, translate_rows, 20)
    s["validation"].write_text("\n")
    code, _, err = run_cli("finetune", str(finetune_recipe(tmp_path, "bad", "translate", base, s)))
    assert code == 2 and "Traceback" not in err and "data.val_files" in err and "empty" in err, err
    bare = tmp_path / "bare"
    shutil.copytree(base, bare, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*", "special*"))
    s = splits(tmp_path, translate_rows, 20)
    code, _, err = run_cli("finetune", str(finetune_recipe(tmp_path, "bad", "translate", bare, s)))
    assert code == 2 and "model.init_from" in err and "no tokenizer files" in err, err
    assert not (tmp_path / "bad").exists()


def test_decoding_and_class_metric_names():
    """Sampling evaluates without beams unless asked; class labels make safe metric names; the macro average runs
    over the labels in the references or the predictions (scikit-learn's default), in training as in eval."""
    from gptkit.generation import decoding_from
    from gptkit.recipe import FinetuneConfig
    from gptkit.tasks import classify

    assert decoding_from(FinetuneConfig()).num_beams == 4
    assert decoding_from(FinetuneConfig(do_sample=True)).num_beams == 1
    assert decoding_from(FinetuneConfig(do_sample=True, num_beams=3)).num_beams == 3
    rows = [{"label": "very good"}, {"label": "a/b"}]
    got = classify.score(["very good", "something else"], rows)  # a predicted class outside the references
    assert set(got) == {"accuracy", "macro_f1", *(f"{m}_{k}" for m in ("precision", "recall", "f1")
                                                  for k in ("very_good", "a_b", "something_else"))}
    assert got["accuracy"] == 50.0 and got["f1_a_b"] == 0.0 and got["f1_very_good"] == 100.0
    assert got["macro_f1"] == pytest.approx(100 / 3)  # sklearn: f1_score(refs, preds, average="macro") = 0.333
    from gptkit.eval_report import score

    assert score("classify", ["very good", "something else"], ["very good", "a/b"])["metrics"] == got


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bart"])
def test_logits_where_runs_the_output_layer_on_the_scored_positions_only(arch, monkeypatch):
    """The logits and gradients of the kept positions equal the full forward's; a decoder-only model's output layer
    sees only those rows (an encoder-decoder falls back to the full logits)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, BartConfig, GPT2Config, LlamaConfig

    from gptkit import modeling

    torch.manual_seed(0)
    if arch == "gpt2":
        model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    elif arch == "llama":
        model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=2, num_attention_heads=2,
                                                             num_key_value_heads=1, max_position_embeddings=32))
    else:
        model = AutoModelForSeq2SeqLM.from_config(BartConfig(vocab_size=97, d_model=32, encoder_layers=1, decoder_layers=1,
                                                             encoder_attention_heads=2, decoder_attention_heads=2,
                                                             encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32))
    model.eval()  # no dropout: both forwards must be the same function (gradients still flow)
    ids = torch.randint(3, 97, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if arch == "bart":
        inputs |= {"decoder_input_ids": ids[:, :10], "decoder_attention_mask": mask[:, :10]}
    keep = torch.zeros(3, 10 if arch == "bart" else 12, dtype=torch.bool)
    keep[0, 4:8], keep[1, 2:5], keep[2, 7:11 if arch != "bart" else 10] = True, True, True
    rows, widths = [], []

    def seen(module, args, out):
        rows.append(args[0].shape[:-1].numel())
        widths.append(out.shape[-1])

    model.get_output_embeddings().register_forward_hook(seen)

    def grads(logits):
        model.zero_grad()
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full = model(**inputs).logits[keep]
    want = grads(full)
    got = modeling.logits_where(model, keep, **inputs)
    assert got.shape == (int(keep.sum()), 97)
    assert torch.allclose(got, full, atol=1e-5)
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(grads(got), want, strict=True))
    assert rows[-1] == (keep.numel() if arch == "bart" else int(keep.sum()))
    assert model.get_output_embeddings()(torch.ones(1, 32)).shape == (1, 97)  # the head is itself again
    # the summed cross-entropy, fused with the output layer and cut into chunks of 4 rows (the last one shorter)
    monkeypatch.setattr(modeling, "_chunk_rows", lambda *args: 4)
    targets = torch.randint(0, 97, (int(keep.sum()),))
    model.zero_grad()
    plain = torch.nn.functional.cross_entropy(model(**inputs).logits[keep], targets, reduction="sum")
    (plain * 3).backward()
    want = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    fused = modeling.scored_cross_entropy(model, keep, targets, **inputs)
    (fused * 3).backward()
    got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert torch.allclose(fused, plain, rtol=1e-6) and all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want,
                                                                                                     strict=True))
    softmaxes, exp_ = [], torch.Tensor.exp_  # the gradient's softmax is taken in place: counted here
    monkeypatch.setattr(torch.Tensor, "exp_", lambda t: softmaxes.append(t.shape) or exp_(t))
    with torch.no_grad():  # evaluation: the loss alone (its gradients, a vocab x width buffer, were computed too)
        assert torch.allclose(modeling.scored_cross_entropy(model, keep, targets, **inputs), plain, rtol=1e-6)
    assert softmaxes == []
    modeling.scored_cross_entropy(model, keep, targets, **inputs)
    assert bool(softmaxes) == (arch != "bart")  # with grad enabled they are (bart takes the plain path)
    monkeypatch.setattr(torch.Tensor, "exp_", exp_)
    # label smoothing: torch's label_smoothing, loss and gradients (sharper logits, so that smoothing matters)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
        targets = model(**inputs).logits[keep].argmax(-1)  # confident and right: smoothing raises the loss
    plain = torch.nn.functional.cross_entropy(model(**inputs).logits[keep], targets, reduction="sum")
    model.zero_grad()
    reference = torch.nn.functional.cross_entropy(model(**inputs).logits[keep], targets, reduction="sum",
                                                  label_smoothing=0.2)
    reference.backward()
    want = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    smoothed = modeling.scored_cross_entropy(model, keep, targets, smoothing=0.2, **inputs)
    smoothed.backward()
    assert reference > 2 * plain
    assert torch.allclose(smoothed, reference, rtol=1e-6) and all(torch.allclose(p.grad, w, atol=1e-5) for p, w in zip(
        (p for p in model.parameters() if p.grad is not None), want, strict=True))
    calls = len(rows)
    modeling.scored_cross_entropy(model, keep, targets, **inputs)
    # one call of the output layer: fused, the passthrough that hands back the hidden states (never a projection)
    assert rows[calls:] == [keep.numel()] and widths[calls:] == [97 if arch == "bart" else 32]


def test_a_second_run_reuses_the_tokenized_examples(tmp_path, base, caplog, monkeypatch):
    """Tokenized examples are cached by files, tokenizer, model config and the preprocessing fields: a run that
    differs in training settings only (a sweep's next trial, a resume, another output.dir, LoRA) loads them, repeats
    what making them logged (the truncation count) and trains exactly as the first; another max_length or an edited
    file tokenizes again."""
    import logging

    monkeypatch.setenv("GPTKIT_CACHE", str(tmp_path / "cache"))
    s = splits(tmp_path, translate_rows, 40)
    recipe = finetune_recipe(tmp_path, "a", "translate", base, s,
                             finetune={"max_length": 12, "eval_examples": 4, "max_new_tokens": 4},
                             train={"max_steps": 3, "eval_every": 3, "save_every": 3, "log_every": 1, "batch_size": 8})

    def run(*overrides: str) -> str:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gptkit"):
            code, _, err = run_cli("finetune", str(recipe), *overrides)
        assert code == 0, err
        return caplog.text

    def losses(run_dir: str) -> list:
        return [r["train_loss"] for r in map(json.loads, (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines())
                if "train_loss" in r]

    first = run()
    assert "using cached examples" not in first and "examples longer than 12 tokens were truncated" in first
    again = run(f"output.dir={tmp_path / 'b'}")
    assert again.count("using cached examples") == 3  # train, validation, test
    assert "examples longer than 12 tokens were truncated" in again
    assert losses("b") == losses("a") and len(losses("a")) == 3
    trial = run(f"output.dir={tmp_path / 'c'}", "train.lr=1e-3", "finetune.method=lora", "finetune.num_beams=1")
    assert trial.count("using cached examples") == 3
    longer = run(f"output.dir={tmp_path / 'd'}", "finetune.max_length=14")
    assert "using cached examples" not in longer
    s["validation"].write_text(s["validation"].read_text() + json.dumps(translate_rows(1, 9)[0]) + "\n")
    edited = run(f"output.dir={tmp_path / 'e'}")
    assert "using cached examples" not in edited  # every split's key covers every file of the recipe


def test_cached_examples_are_mapped_from_the_cache_file_and_a_torn_file_is_made_again(tmp_path, base, caplog,
                                                                                        monkeypatch):
    """The examples a run trains on are read-only views of the cache file (the page cache holds the token ids, not
    the process), equal to those made in memory; a torn cache file is a warning and the examples are made again."""
    import logging

    import numpy as np

    from gptkit import data as data_mod
    from gptkit import trained
    from gptkit.errors import UserError
    from gptkit.recipe import load_recipe
    from gptkit.tasks import translate

    monkeypatch.setenv("GPTKIT_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(finetune_recipe(tmp_path, "t", "translate", base, splits(tmp_path, translate_rows, 30)))
    tok = trained.tokenizer_of(recipe.model.init_from)
    rows = translate_rows(30, 1)
    fresh = translate.preprocess(recipe, tok, rows, "train")
    made = []

    def make():
        made.append(1)
        return translate.preprocess(recipe, tok, rows, "train")

    first = data_mod.cached_examples(recipe, tok, None, "train", make)
    again = data_mod.cached_examples(recipe, tok, None, "train", make)
    assert len(made) == 1
    for got in (first, again):
        flat = got.rows.cols["input_ids"][0]
        assert not flat.flags.writeable and not flat.flags.owndata  # a view of the mapped file
        assert list(got.rows) == list(fresh.rows)
        assert all(got.batch([0, 7, 29])[k].equal(v) for k, v in fresh.batch([0, 7, 29]).items())
    (cached,) = (tmp_path / "cache" / "examples").glob("*.examples")
    assert sorted(p.name for p in cached.parent.iterdir()) == sorted([cached.name, f".{cached.stem}.lock"])
    cached.write_bytes(cached.read_bytes()[:100])
    killed = [cached.parent / f".{cached.stem}.4999999.parts", cached.parent / f".{cached.stem}.4999999.tmp"]
    killed[0].mkdir()  # what a writer killed mid-way (no such process now) left
    (killed[0] / "1.bin").write_bytes(b"ids")
    killed[1].write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="gptkit"):
        torn = data_mod.cached_examples(recipe, tok, None, "train", make)
    assert len(made) == 2 and "unreadable" in caplog.text and list(torn.rows) == list(fresh.rows)
    assert not any(p.exists() for p in killed)

    def refused():  # bad data found half-way through a split: nothing of it is left in the cache folder
        translate.preprocess(recipe, tok, rows, "train")
        raise UserError("data: bad row")

    cached.unlink()
    with pytest.raises(UserError):
        data_mod.cached_examples(recipe, tok, None, "train", refused)
    assert [p.name for p in cached.parent.iterdir()] == [f".{cached.stem}.lock"]


def test_spilled_examples_equal_those_joined_in_memory_and_never_pile_up(tmp_path):
    """Under the examples cache, each chunk of tokenized examples goes to disk as it is made (generative.Spill): the
    joined examples equal the in-memory join — dtypes promoted alike (uint16 and int32 parts), prompt-masked labels in
    all, some or none of the parts, seq2seq labels, a list column — mapped back read-only, with no file left over;
    and the chunks are not held: joining 20 MB of token ids peaks at a few MB of traced memory instead of twice 20."""
    import tracemalloc

    import numpy as np

    from gptkit.tasks.generative import Rows, Spill, _Masked

    rng = np.random.default_rng(0)

    def part(n: int, big: bool, kind: str) -> Rows:
        out = []
        for _ in range(n):
            p, a = int(rng.integers(0, 5)), int(rng.integers(1, 6))
            ids = rng.integers(0, 70000 if big else 500, p + a).tolist()
            labels = rng.integers(0, 500, a).tolist() if kind == "seq2seq" else [-100] * p + ids[p:]
            if kind == "unmasked":
                labels[-1] = -100
            out.append({"input_ids": ids, "labels": labels, "row": int(rng.integers(0, 9)), "spans": [None, p]})
        return Rows(out)

    def columns(rows: Rows) -> list:
        out = []
        for key, col in rows.cols.items():
            arrays = col if isinstance(col, tuple) else (col.prompt,) if isinstance(col, _Masked) else (col,)
            out.append((key, type(col), [(a.dtype, a.tolist()) if isinstance(a, np.ndarray) else a for a in arrays]))
        return out

    seen = set()
    for trial in range(40):
        kinds = ["seq2seq"] * 3 if trial % 4 == 0 else [("unmasked", "masked", "masked")[i % 3] for i in
                                                        rng.permutation(3)[: rng.integers(1, 4)]]
        parts = [part(int(rng.integers(0, 4)), bool(rng.integers(0, 2)), k) for k in kinds]
        folder = tmp_path / f"spill{trial}"
        folder.mkdir()
        with Spill(folder).active() as spill:
            got = Rows.concat(iter(parts))
        want = Rows.concat(parts)
        assert columns(got) == columns(want) and [got[i] for i in range(len(got))] == [want[i] for i in
                                                                                        range(len(want))]
        assert set(folder.iterdir()) == set(spill.files.values())  # every file left is one an array maps
        flat = got.cols["input_ids"][0] if len(got) else None
        assert flat is None or not flat.flags.writeable and not flat.flags.owndata
        dtypes = {p.cols["input_ids"][0].dtype for p in parts if len(p)}
        seen |= {"promoted"} if len(dtypes) > 1 else set()
        seen |= {type(got.cols["labels"]).__name__ + str(len({type(p.cols["labels"]) for p in parts if len(p)}))
                 } if len(got) else set()
    assert seen == {"promoted", "_Masked1", "tuple1", "tuple2"}, seen  # (tuple2: masked and unmasked parts)

    def chunks():  # 200 chunks of 1,000 examples, 50k uint16 token ids each: 20 MB in all
        for _ in range(200):
            rows = Rows()
            rows.n = 1000
            rows.cols = {"input_ids": (np.ones(50_000, np.uint16), np.arange(0, 50_001, 50, dtype=np.int64)),
                         "labels": _Masked(np.full(1000, 10, np.int64))}
            yield rows

    peaks = {}
    for spilled in (False, True):
        folder = tmp_path / f"big{spilled}"
        folder.mkdir()
        tracemalloc.start()
        with Spill(folder).active() if spilled else open(os.devnull):
            joined = Rows.concat(chunks())
        peaks[spilled] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(joined) == 200_000 and joined[199_999]["labels"] == [-100] * 10 + [1] * 40
    assert peaks[True] < 5e6 and peaks[False] > 35e6, peaks


def test_the_answers_room_is_checked_up_front_and_a_prompt_it_cuts_is_reported(tmp_path, base, caplog):
    """finetune.max_new_tokens >= the base's context was found at the first validation, after training up to it
    with nothing saved; and a room held back for the answer that cuts most prompts' inputs (multi30k-scratch: 996
    of 1000 test sources lost their end) went unsaid."""
    from gptkit import tasks, trained
    from gptkit.recipe import load_recipe

    data = splits(tmp_path, translate_rows, n_train=40)
    recipe = finetune_recipe(tmp_path, "tr", "translate", base, data, finetune={"max_new_tokens": 64})
    code, _, err = run_cli("validate", str(recipe))
    assert_user_error(code, err, "finetune.max_new_tokens: 64 must be < the base's context of 64 tokens")
    code, _, err = run_cli("finetune", str(recipe))
    assert_user_error(code, err, "finetune.max_new_tokens")
    assert not (tmp_path / "tr").exists()
    model, tok = trained.load_lm(base)
    rows = translate_rows(20, 3)
    for room_for_answer, warned in ((58, True), (16, False)):
        caplog.clear()
        loaded = load_recipe(recipe, [f"finetune.max_new_tokens={room_for_answer}", "finetune.num_beams=1"])
        with caplog.at_level("WARNING"):
            out = tasks.load("translate").predict(model, tok, rows, loaded)
        assert len(out) == 20
        assert ("20 of 20 prompts lost the end of their source" in caplog.text) is warned, caplog.text
