"""Encoder-decoder (T5/BART-style) bases for translate and summarize: they learn, their loss ignores padding,
LoRA merges, `gptkit eval` and `gptkit generate` load them, and the tasks they cannot do say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_user_error, run_cli
from tasks_helpers import (classify_rows, finetune_recipe, learned_mapping, preprocess_capped, read_test_metrics,
                           seq2seq_base, splits, summarize_rows, translate_rows)

@pytest.fixture(scope="module")
def bart(tmp_path_factory) -> Path:
    return seq2seq_base(tmp_path_factory.mktemp("bart") / "base", "bart")


@pytest.fixture(scope="module")
def t5(tmp_path_factory) -> Path:
    return seq2seq_base(tmp_path_factory.mktemp("t5") / "base", "t5")


@pytest.fixture(scope="module")
def translated(tmp_path_factory, bart) -> Path:
    """A full fine-tune of the tiny BART on the word-mapping translation (default prompt), with a test split. A
    randomly initialised BART learns it in a sudden drop whose timing depends on the init: at 600 steps test BLEU
    was 6.9-96.5 over 3 seeds; at 1,200 it is 95-99 over 4."""
    tmp = tmp_path_factory.mktemp("tr")
    recipe = finetune_recipe(tmp, "tr", "translate", bart, splits(tmp, translate_rows),
                             train={"max_steps": 1200, "eval_every": 400, "save_every": 400})
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    return tmp / "tr"


def test_seq2seq_translate_learns_a_word_mapping(translated):
    from transformers import AutoConfig

    scores = read_test_metrics(translated)
    assert learned_mapping(scores), scores
    assert AutoConfig.from_pretrained(translated / "best").architectures == ["BartForConditionalGeneration"]


def _model(base: Path):
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(str(base)).eval()


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_seq2seq_loss_is_padding_correct(tmp_path, arch, request):
    """A padded batch's summed loss is the sum of each example's alone, which is the model's own token-mean loss
    times its target tokens; the encoder reads the prompt, the labels are the target + EOS only."""
    import torch

    from gptkit import trained
    from gptkit.recipe import load_recipe
    from gptkit.tasks import summarize

    base = request.getfixturevalue(arch)
    rows = summarize_rows(5, 9)
    rows[0]["document"] += " red red red"  # both sides of the batch need padding
    rows[1]["summary"] += " blue blue"
    recipe = load_recipe(finetune_recipe(tmp_path, "p", "summarize", base, splits(tmp_path, summarize_rows, 20)))
    tok = trained.tokenizer_of(recipe.model.init_from)
    model = summarize.build_model(recipe, tok, rows).eval()
    data = summarize.preprocess(recipe, tok, rows, "train")
    assert len({len(r["input_ids"]) for r in data.rows}) > 1 and len({len(r["labels"]) for r in data.rows}) > 1
    batch = data.batch(list(range(5)))
    assert batch["input_ids"].shape[1] != batch["labels"].shape[1]  # each side padded to its own width
    with torch.no_grad():
        batched = summarize.loss(model, batch)
        alone = [summarize.loss(model, data.batch([i])) for i in range(5)]
        reference = [model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss
                     * len(r["labels"]) for r in data.rows]
        per_example = summarize.loss(model, batch, per="example") / summarize.count(batch, per="example")
    assert summarize.count(batch) == sum(len(r["labels"]) for r in data.rows)
    assert torch.allclose(batched, torch.stack(alone).sum(), atol=1e-4), (batched, alone)
    assert torch.allclose(torch.stack(alone), torch.stack(reference), atol=1e-4)  # decoder inputs shifted right
    means = torch.stack([a / len(r["labels"]) for a, r in zip(alone, data.rows)]).mean()
    assert torch.allclose(per_example, means, atol=1e-5)
    first = data.rows[0]
    assert first["labels"] == tok(rows[0]["summary"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert first["input_ids"] == tok(summarize.PROMPT.format(**rows[0]))["input_ids"]  # as generation encodes it


def test_seq2seq_truncation_is_counted(tmp_path, bart, caplog):
    rows = translate_rows(4, 5)
    rows[0]["source"] = " ".join([rows[0]["source"]] * 10)
    rows[1]["target"] = " ".join([rows[1]["target"]] * 10)
    data, tok = preprocess_capped(tmp_path, "translate", bart, rows, translate_rows, 24, caplog)
    assert "2 of 4 examples longer than 24 tokens were truncated" in caplog.text
    assert max(len(r["input_ids"]) for r in data.rows) == 24 and max(len(r["labels"]) for r in data.rows) == 24
    assert data.rows[0]["input_ids"][-1] == tok.eos_token_id  # the source is cut, its special token kept


def test_seq2seq_lora_merges_into_a_plain_seq2seq_model(tmp_path, bart):
    from transformers import AutoModelForSeq2SeqLM

    from gptkit import trained
    from gptkit.generation import DecodingOptions, generate_batch
    from gptkit.recipe import load_recipe

    recipe = finetune_recipe(tmp_path, "lora", "translate", bart, splits(tmp_path, translate_rows, 100),
                             finetune={"method": "lora", "lora_r": 4, "eval_examples": 10, "max_new_tokens": 8},
                             train={"max_steps": 30, "eval_every": 30, "save_every": 30, "lr": 1e-2})
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    run = tmp_path / "lora"
    assert json.loads((run / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    code, _, err = run_cli("export", str(run), "--merge")
    assert code == 0, err
    merged = AutoModelForSeq2SeqLM.from_pretrained(str(run / "merged")).eval()
    base = _model(bart)
    changed = [k for k, v in merged.state_dict().items() if not (v == base.state_dict()[k]).all()]
    assert {k.split(".")[-2] for k in changed} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}, changed
    adapter = trained.load_model(run, "translate", load_recipe(run / "recipe.yaml")).eval()
    tok = trained.tokenizer_of(load_recipe(run / "recipe.yaml").model.init_from)
    prompts = [f"{r['source']} =>" for r in translate_rows(6, 4)]
    opts = DecodingOptions(max_new_tokens=8)
    expected = generate_batch(adapter, tok, prompts, opts)
    assert generate_batch(merged, tok, prompts, opts) == expected
    assert generate_batch(base, tok, prompts, opts) != expected  # the adapters changed what it says


def test_eval_and_generate_load_the_seq2seq_run(translated):
    """`gptkit eval` rescores the best checkpoint as finetune did; `gptkit generate` prints what plain
    transformers' greedy decoding gives, and nothing else."""
    import torch
    from transformers import AutoTokenizer

    from gptkit.tasks import translate

    code, _, err = run_cli("eval", "--model", str(translated / "best"), "--split", "test", "--out",
                           str(translated / "ev"))
    assert code == 0, err
    got = json.loads((translated / "ev" / "metrics.json").read_text())["metrics"]
    test = read_test_metrics(translated)
    assert got["bleu"] == pytest.approx(test["test_bleu"]) and got["chrf"] == pytest.approx(test["test_chrf"])

    prompt = translate.PROMPT.format(source="red small fast white")
    code, out, err = run_cli("generate", str(translated), "--prompt", prompt, "--max-new-tokens", "12")
    assert code == 0, err
    tok, model = AutoTokenizer.from_pretrained(str(translated)), _model(translated)
    with torch.no_grad():
        ids = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=12, do_sample=False, num_beams=1)
    expected = tok.decode(ids[0], skip_special_tokens=True)
    assert out == expected + "\n"
    assert expected.strip() == "rot klein schnell weiss"


def test_validate_describes_an_encoder_decoder_base(tmp_path, bart):
    recipe = finetune_recipe(tmp_path, "v", "translate", bart, splits(tmp_path, translate_rows, 20))
    code, out, err = run_cli("validate", str(recipe))
    assert code == 0, err
    n = sum(p.numel() for p in _model(bart).parameters())
    assert f"base model: bart (encoder-decoder), {n:,} parameters" in out


def test_multitask_on_a_seq2seq_base_runs(tmp_path, t5):
    import yaml

    (tmp_path / "tr").mkdir()
    (tmp_path / "su").mkdir()
    tr, su = splits(tmp_path / "tr", translate_rows, 40), splits(tmp_path / "su", summarize_rows, 40)
    tasks = [{"task": t, **{f"{k}_files": [str(s[split])] for k, split in
                            (("train", "train"), ("val", "validation"), ("test", "test"))}}
             for t, s in (("translate", tr), ("summarize", su))]
    recipe = {"task": "multitask", "model": {"init_from": str(t5)},
              "finetune": {"eval_examples": 5, "max_new_tokens": 4, "tasks": tasks},
              "train": {"max_steps": 4, "batch_size": 8, "eval_every": 4, "save_every": 4, "warmup_steps": 1},
              "output": {"dir": str(tmp_path / "mt")}}
    (tmp_path / "mt.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli("finetune", str(tmp_path / "mt.yaml"))
    assert code == 0, err
    assert {"test_translate_bleu", "test_summarize_rougeL", "test_score"} <= set(read_test_metrics(tmp_path / "mt"))


@pytest.mark.parametrize("task", ["classify", "qa"])
def test_tasks_that_need_a_decoder_only_base_say_so(tmp_path, bart, task):
    recipe = finetune_recipe(tmp_path, "bad", task, bart, splits(tmp_path, classify_rows, 20),
                             data={"columns": {"text": "sentence"}} if task == "classify" else {})
    code, _, err = run_cli("finetune", str(recipe))
    assert_user_error(code, err, f"model.init_from: {bart} is an encoder-decoder (bart)",
                      f"task {task} needs a decoder-only base")
    assert not (tmp_path / "bad").exists()


def test_seq2seq_model_refuses_perplexity_and_few_shot(tmp_path, bart):
    text = tmp_path / "t.txt"
    text.write_text("red blue green\n" * 20)
    code, _, err = run_cli("eval", "--model", str(bart), "--task", "lm", "--data", str(text))
    assert_user_error(code, err, "--task lm: perplexity needs a decoder-only model", "encoder-decoder (bart)")
    s = splits(tmp_path, translate_rows, 20)
    code, _, err = run_cli("eval", "--model", str(bart), "--task", "translate", "--data", str(s["test"]),
                           "--few-shot", "2", "--train", str(s["train"]), "--out", str(tmp_path / "ev"))
    assert_user_error(code, err, "--few-shot: demonstrations need a decoder-only model")
    assert not (tmp_path / "ev").exists()


def test_pretrain_refuses_an_encoder_decoder_base(tmp_path, corpus, bart):
    from conftest import tiny_recipe

    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run", model={"init_from": str(bart)},
                         tokenizer={"kind": "pretrained", "path": str(bart)})
    code, _, err = run_cli("pretrain", str(recipe))
    assert_user_error(code, err, f"model.init_from: {bart} is an encoder-decoder (bart)", "decoder-only")
    assert not (tmp_path / "run").exists()


def test_bart_style_targets_start_with_the_bos_that_generation_forces(tmp_path, caplog):
    """facebook/bart-* checkpoints force <s> as the first generated token: training targets carry it too
    (tokenizer(text_target=...)), so the decoder is fine-tuned on the prefix it decodes from."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    base = seq2seq_base(tmp_path / "bart-bos", "bart", bos=True)
    data, tok = preprocess_capped(tmp_path, "translate", base, translate_rows(3, 1), translate_rows, 64, caplog)
    batch = data.batch([0])
    assert batch["labels"][0, 0] == tok.bos_token_id and batch["labels"][0, -1] == tok.eos_token_id
    model = AutoModelForSeq2SeqLM.from_pretrained(str(base)).eval()
    with torch.no_grad():
        out = model.generate(input_ids=batch["input_ids"], max_new_tokens=3, do_sample=False, num_beams=1)
    assert out[0, :2].tolist() == batch["decoder_input_ids"][0, :2].tolist() == [2, tok.bos_token_id]



def _init_recipe(tmp_path: Path, arch: str, train: Path, **model) -> Path:
    import yaml

    recipe = {"tokenizer": {"kind": "bpe", "vocab_size": 300},
              "model": {"arch": arch, "n_layer": 2, "n_head": 4, "n_embd": 64, "intermediate_size": 128,
                        "context": 64, **model},
              "data": {"train_files": [str(train)], "text_column": ["source", "target"]},
              "output": {"dir": str(tmp_path / f"{arch}-init")}}
    path = tmp_path / f"{arch}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_init_builds_an_untrained_encoder_decoder_that_finetune_trains_from_nothing(tmp_path):
    """`gptkit init` with arch bart: a BART and its BPE tokenizer trained on the pairs (a pad token apart from EOS,
    the decoder starting from EOS) that plain transformers loads; fine-tuned, it learns the word mapping. T5: the
    decoder starts from pad. The encoder-decoder arches are refused by pretrain, init refuses a base."""
    import yaml
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    files = splits(tmp_path, translate_rows)
    assert run_cli("init", str(_init_recipe(tmp_path, "bart", files["train"])))[0] == 0
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "bart-init")
    tok = AutoTokenizer.from_pretrained(tmp_path / "bart-init")
    assert type(model).__name__ == "BartForConditionalGeneration" and model.config.encoder_layers == 2
    assert tok.pad_token_id not in (None, tok.eos_token_id) and model.config.pad_token_id == tok.pad_token_id
    assert model.config.decoder_start_token_id == tok.eos_token_id and model.config.vocab_size == len(tok)
    code, out, err = run_cli("validate", str(tmp_path / "bart.yaml"))  # describes what init builds, names init
    assert code == 0, err
    assert f"model: bart, {sum(p.numel() for p in model.parameters()):,} parameters" in out, out
    assert f"run: gptkit init {tmp_path / 'bart.yaml'}" in out, out
    reuse = yaml.safe_load((tmp_path / "bart.yaml").read_text())  # a tokenizer that already pads apart from EOS
    reuse["tokenizer"] = {"kind": "pretrained", "path": str(tmp_path / "bart-init")}
    (tmp_path / "reuse.yaml").write_text(yaml.safe_dump(reuse))
    code, out, err = run_cli("validate", str(tmp_path / "reuse.yaml"))  # ... keeps its vocabulary as it is
    assert code == 0 and f"model: bart, {sum(p.numel() for p in model.parameters()):,} parameters" in out, out
    recipe = finetune_recipe(tmp_path, "tr", "translate", tmp_path / "bart-init", files,
                             train={"max_steps": 1200, "eval_every": 600, "save_every": 600})
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    scores = read_test_metrics(tmp_path / "tr")
    assert learned_mapping(scores), scores

    assert run_cli("init", str(_init_recipe(tmp_path, "t5", files["train"])))[0] == 0
    t5 = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "t5-init")
    assert type(t5).__name__ == "T5ForConditionalGeneration"
    assert t5.config.decoder_start_token_id == t5.config.pad_token_id != t5.config.eos_token_id
    code, _, err = run_cli("pretrain", str(_init_recipe(tmp_path, "bart", files["train"])))
    assert_user_error(code, err, "model.arch", "encoder-decoder", "gptkit init")
    code, _, err = run_cli("init", str(_init_recipe(tmp_path, "t5", files["train"], init_from=str(tmp_path / "t5-init"))))
    assert_user_error(code, err, "model.init_from", "new model")
