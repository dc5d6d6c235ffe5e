"""gptkit quantize: GPT-2's Conv1D projections rewritten exactly as nn.Linear (GPTBigCode) and really quantized by
torchao; the folder loads with plain transformers and in gptkit eval/generate; bad input is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchao")
import torch  # noqa: E402

from conftest import assert_user_error, run_cli  # noqa: E402
from tasks_helpers import finetune_recipe, pretrained_base, splits, tiny_bart_with, translate_rows  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return pretrained_base(tmp_path_factory.mktemp("quantize"))


def test_gpt2_rewritten_as_linear_layers_gives_the_same_logits():
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptkit.quantize import gpt2_to_bigcode

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=32)).eval()
    with torch.no_grad():  # sharpen attention, so a wrong q/k/v order could not hide behind uniform weights
        for block in gpt2.transformer.h:
            block.attn.c_attn.weight.mul_(8)
    bigcode = gpt2_to_bigcode(gpt2)
    ids = torch.randint(0, 300, (3, 20))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    with torch.no_grad():
        a = gpt2(ids, attention_mask=mask).logits
        b = bigcode(ids, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max() < 1e-4
    linear = sum(isinstance(m, torch.nn.Linear) for m in bigcode.transformer.modules())
    assert linear == 2 * 4  # c_attn, c_proj, c_fc, mlp c_proj per block


def test_a_bf16_gpt2_is_rewritten_and_stays_bf16():
    """The rewrite is checked in fp32: a bf16 original against the fp32 copy differed by ~1e-2 and was refused."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptkit.quantize import gpt2_to_bigcode

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=32))
    bigcode = gpt2_to_bigcode(gpt2.to(torch.bfloat16))
    assert bigcode.dtype == torch.bfloat16 and gpt2.dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_folder_loads_in_transformers_and_gptkit(base, tmp_path, method):
    from transformers import AutoModelForCausalLM

    from gptkit import trained
    from gptkit.quantize import count_quantized

    out = tmp_path / f"q-{method}"
    code, _, err = run_cli("quantize", str(base), "--method", method, "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "quantize.json").read_text())
    n_layer = json.loads((base / "config.json").read_text())["n_layer"]
    assert record["converted_from_gpt2"] and record["quantized_layers"] == 4 * n_layer  # every projection
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    assert count_quantized(model) == 4 * n_layer
    if method == "int8":  # the projections shrink 4x; this model's untied embeddings (42% of it) stay float
        assert record["bytes_after"] < 0.55 * record["bytes_before"]
    original, tok = trained.load_lm(base)
    ids = tok("red blue green", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        p, q = original(ids).logits.log_softmax(-1), model(ids).logits.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl < (0.01 if method == "int8" else 0.2), kl  # close to the float model
    code, out_text, err = run_cli("generate", str(out), "--prompt", "red", "--max-new-tokens", "5")
    assert code == 0 and out_text.startswith("red"), err
    code, _, err = run_cli("eval", "--model", str(out), "--task", "lm", "--data", str(base.parent / "base.txt"),
                           "--out", str(tmp_path / "ev"))
    assert code == 0, err


def test_a_translate_run_keeps_its_prompt_and_scores_alike(base, tmp_path):
    """A fine-tuned run quantized: gptkit eval reads its recipe in the quantized folder; int8 barely moves BLEU."""
    recipe = finetune_recipe(tmp_path, "run", "translate", base, splits(tmp_path, translate_rows, 300),
                             train={"max_steps": 150, "eval_every": 150, "save_every": 150},
                             finetune={"eval_examples": 20, "max_new_tokens": 8})
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    code, _, err = run_cli("quantize", str(tmp_path / "run"), "--out", str(tmp_path / "q"))
    assert code == 0, err
    scores = {}
    for name in ("run", "q"):
        code, _, err = run_cli("eval", "--model", str(tmp_path / name), "--split", "test", "--out",
                               str(tmp_path / f"ev-{name}"))
        assert code == 0, err
        scores[name] = json.loads((tmp_path / f"ev-{name}" / "metrics.json").read_text())["metrics"]["bleu"]
    assert scores["run"] > 20 and abs(scores["q"] - scores["run"]) < 5, scores


def test_a_lora_run_counts_the_merged_model_before_quantizing(base, tmp_path):
    """bytes_before was the adapter file's size alone, though the merged base is what is quantized."""
    recipe = finetune_recipe(tmp_path, "run", "translate", base, splits(tmp_path, translate_rows, 40),
                             train={"max_steps": 2, "eval_every": 2, "save_every": 2},
                             finetune={"method": "lora", "eval_examples": 2, "max_new_tokens": 2})
    assert run_cli("finetune", str(recipe))[0] == 0
    code, _, err = run_cli("quantize", str(tmp_path / "run"), "--out", str(tmp_path / "q"))
    assert code == 0, err
    record = json.loads((tmp_path / "q" / "quantize.json").read_text())
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert record["bytes_before"] > 0.9 * base_bytes and record["bytes_after"] < record["bytes_before"], record


def test_bad_quantize_input_is_one_line(base, tmp_path, monkeypatch):
    code, _, err = run_cli("quantize", str(base), "--method", "int3", "--out", str(tmp_path / "a"))
    assert_user_error(code, err, "--method", "int8, int4")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code, _, err = run_cli("quantize", str(base), "--out", str(tmp_path / "full"))
    assert_user_error(code, err, "--out", "not empty")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_cli("quantize", str(base), "--out", str(tmp_path / "notes.txt"))
    assert_user_error(code, err, "--out", "notes.txt", "not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    code, _, err = run_cli("quantize", str(tmp_path / "missing"), "--out", str(tmp_path / "b"))
    assert_user_error(code, err, "missing")
    monkeypatch.setitem(sys.modules, "torchao", None)
    code, _, err = run_cli("quantize", str(base), "--out", str(tmp_path / "c"))
    assert_user_error(code, err, "pip install 'gptkit[quantize]'")


def test_int4_of_a_width_that_is_not_a_multiple_of_32_is_one_line(base, tmp_path):
    """n_embd 80: torchao's int4 groups of 32 failed with an AssertionError traceback."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptkit import trained

    tok = trained.load_lm(base)[1]
    folder = tmp_path / "w80"
    GPT2LMHeadModel(GPT2Config(n_embd=80, n_layer=1, n_head=4, vocab_size=len(tok), n_positions=32)).save_pretrained(
        folder)
    tok.save_pretrained(folder)
    code, _, err = run_cli("quantize", str(folder), "--method", "int4", "--out", str(tmp_path / "q"))
    assert_user_error(code, err, "--method int4", "80 inputs", "group size 32", "--method int8")
    assert not (tmp_path / "q").exists()


def test_a_model_whose_quantized_folder_does_not_load_back_is_one_line(base, tmp_path):
    """A BART quantizes, but transformers cannot deserialize its torchao weights: that was reported as success."""
    folder = tiny_bart_with(base, tmp_path / "bart", width=32)
    (tmp_path / "out").mkdir()
    code, _, err = run_cli("quantize", str(folder), "--out", str(tmp_path / "out" / "new" / "q"))
    assert_user_error(code, err, "RUN", "bart", "does not load back", "nothing was written")
    assert list((tmp_path / "out").iterdir()) == []  # no half folder, no staging folder, not the folder it made


def test_serve_answers_from_a_quantized_model(base, tmp_path):
    pytest.importorskip("fastapi")
    import httpx

    from test_serve import server

    out = tmp_path / "q"
    assert run_cli("quantize", str(base), "--out", str(out))[0] == 0
    from gptkit import generation, trained

    model, tok = trained.load_lm(out)
    want = generation.generate_batch(model, tok, ["red blue"], generation.DecodingOptions(max_new_tokens=6))[0][0]
    with server(out) as proc:
        r = httpx.post(f"{proc.url}/v1/completions", json={"prompt": "red blue", "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want


def test_a_system_folder_is_never_an_out_folder(base):
    """A run as root wrote eval, quantize and prune output into /etc: --out is refused there as output.dir is."""
    code, _, err = run_cli("quantize", str(base), "--out", "/usr/gptkit-q")
    assert_user_error(code, err, "--out", "/usr/gptkit-q", "system folder")
    assert not Path("/usr/gptkit-q").exists()
