"""gptkit prune: removing blocks, heads (Llama-style) or feed-forward neurons gives exactly the model with those parts
silenced, in a smaller checkpoint plain transformers loads; importance picks parts that matter; GPT-2 heads and bad
input are one line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_user_error, run_cli
from tasks_helpers import pretrained_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return pretrained_base(tmp_path_factory.mktemp("prune"))


def _blocks(tok, path, n=4, ctx=32):
    ids = torch.tensor(tok(path.read_text())["input_ids"][: n * 8 * (ctx + 1)])
    blocks = ids.view(-1, ctx + 1)
    return [{"input_ids": b[:, :-1], "labels": b[:, 1:]} for b in blocks.split(8)]


def test_shrinking_equals_silencing_and_importance_matters(base):
    from gptkit import engine, trained
    from gptkit.prune import importance, shrink

    model, tok = trained.load_lm(base)
    batches = _blocks(tok, base.parent / "base.txt")
    scores = importance(model, batches[:2], engine.causal_lm_loss)
    keep = [s.topk(len(s) // 2).indices.sort().values for s in scores]
    smaller = shrink(model, keep)
    silenced = trained.load_lm(base)[0]
    with torch.no_grad():
        for block, idx in zip(silenced.transformer.h, keep):
            drop = torch.ones(block.mlp.c_proj.weight.shape[0], dtype=torch.bool)
            drop[idx] = False
            block.mlp.c_proj.weight[drop] = 0  # Conv1D (in, out): those neurons write nothing
        a, b = smaller(batches[2]["input_ids"]).logits, silenced(batches[2]["input_ids"]).logits
    assert (a - b).abs().max() < 1e-4
    assert smaller.config.n_inner == len(keep[0]) and \
        sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in model.parameters())

    def held_out(m):
        with torch.no_grad():
            return sum(engine.causal_lm_loss(m, b).item() for b in batches[2:])

    worst = shrink(model, [s.topk(len(s) // 2, largest=False).indices.sort().values for s in scores])
    assert held_out(smaller) < held_out(worst)  # keeping the important half beats keeping the other half


def test_prune_command_writes_a_smaller_loadable_model(base, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    code, _, err = run_cli("prune", str(base), "--mlp", "0.5", "--data", str(base.parent / "base.txt"),
                           "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "prune.json").read_text())
    width, kept = record["neurons_per_block"]
    assert kept == width // 2 and record["parameters"][1] < record["parameters"][0]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.n_inner == kept
    code, _, err = run_cli("eval", "--model", str(out), "--task", "lm", "--data", str(base.parent / "base.txt"),
                           "--out", str(tmp_path / "ev"))
    assert code == 0, err


def test_a_pretraining_run_with_globbed_train_files_is_measured_on_them(base):
    """data.train_files may be a glob (as pretrain accepts); it was read as a literal path: '*.txt not found'."""
    from types import SimpleNamespace

    from gptkit import trained
    from gptkit.prune import _batches

    model, tok = trained.load_lm(base)
    run = SimpleNamespace(task="lm", data=SimpleNamespace(train_files=[str(base.parent / "base*.txt")]))
    batches, _ = _batches(model, tok, run, None, 1, 2)
    assert len(batches) == 1 and batches[0]["input_ids"].shape[0] == 2


def test_dropping_a_block_equals_silencing_it_and_the_measured_choice_matters(base):
    from gptkit import engine, trained
    from gptkit.prune import drop_layers, layer_importance

    model, tok = trained.load_lm(base)
    batches = _blocks(tok, base.parent / "base.txt")
    rise = layer_importance(model, batches[:2], engine.causal_lm_loss)
    assert len(rise) == 2 and all(r > 0 for r in rise)
    with torch.no_grad():  # the rise is the loss of the model rebuilt without that block
        def total(m):
            return sum(engine.causal_lm_loss(m, b).item() for b in batches[:2])
        base_loss = total(model)
        for i in range(2):
            assert rise[i] == pytest.approx(total(drop_layers(model, [i])) / base_loss - 1, rel=1e-4, abs=1e-6)
    assert len(model.transformer.h) == 2  # the model is left whole
    keep_first = drop_layers(model, [1])
    silenced = trained.load_lm(base)[0]
    with torch.no_grad():
        block = silenced.transformer.h[1]
        for proj in (block.attn.c_proj, block.mlp.c_proj):  # the block then adds nothing to the residual stream
            proj.weight.zero_()
            proj.bias.zero_()
        a, b = keep_first(batches[2]["input_ids"]).logits, silenced(batches[2]["input_ids"]).logits
    assert (a - b).abs().max() < 1e-4 and keep_first.config.n_layer == 1

    def held_out(m):
        with torch.no_grad():
            return sum(engine.causal_lm_loss(m, b).item() for b in batches[2:])

    best, worst = sorted(range(2), key=lambda i: rise[i])  # drop the block the loss misses least
    assert held_out(drop_layers(model, [best])) < held_out(drop_layers(model, [worst]))


@pytest.fixture(scope="module")
def llama(base, tmp_path_factory):
    """A 2-block Llama with grouped-query attention (4 query heads, 2 key/value heads), trained briefly on the base's
    text so its heads differ, saved with the base's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptkit import engine, trained

    tok = trained.load_lm(base)[1]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, tie_word_embeddings=True))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for batch in _blocks(tok, base.parent / "base.txt", n=8)[:6] * 5:
        opt.zero_grad()
        engine.causal_lm_loss(model, batch).backward()
        opt.step()
    out = tmp_path_factory.mktemp("llama") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_a_llama_with_mlp_biases_shrinks_like_silencing():
    """mlp_bias=True: the gate/up biases are cut with their rows (they were left whole: a size mismatch)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptkit.prune import shrink

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16, mlp_bias=True)).eval()
    keep = [torch.tensor([1, 4, 5, 9, 12])]
    smaller = shrink(model, keep)
    with torch.no_grad():
        drop = torch.ones(16, dtype=torch.bool)
        drop[keep[0]] = False
        model.model.layers[0].mlp.down_proj.weight[:, drop] = 0
        ids = torch.randint(0, 50, (2, 8))
        assert (smaller(ids).logits - model(ids).logits).abs().max() < 1e-5
    assert smaller.config.intermediate_size == 5


def test_removing_heads_equals_silencing_them(base, llama):
    from gptkit import engine, trained
    from gptkit.prune import head_importance, shrink_heads

    model, tok = trained.load_lm(llama)
    batches = _blocks(tok, base.parent / "base.txt")
    scores = head_importance(model, batches[:2], engine.causal_lm_loss)
    assert [len(s) for s in scores] == [2, 2]  # one score per key/value head (with its 2 query heads)
    keep = [s.topk(1).indices for s in scores]
    smaller = shrink_heads(model, keep)
    silenced = trained.load_lm(llama)[0]
    with torch.no_grad():
        for layer, kept in zip(silenced.model.layers, keep):
            gone = 1 - int(kept)  # query heads 2g, 2g+1 (16 features each) read key/value head g
            layer.self_attn.o_proj.weight[:, gone * 32:(gone + 1) * 32] = 0
        a, b = smaller(batches[2]["input_ids"]).logits, silenced(batches[2]["input_ids"]).logits
    assert (a - b).abs().max() < 1e-4
    cfg = smaller.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 16)

    def held_out(m):
        with torch.no_grad():
            return sum(engine.causal_lm_loss(m, b).item() for b in batches[2:])

    assert held_out(smaller) < held_out(shrink_heads(model, [s.topk(1, largest=False).indices for s in scores]))


def test_prune_command_combines_layers_heads_and_neurons(base, llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    code, _, err = run_cli("prune", str(llama), "--layers", "1", "--heads", "0.5", "--mlp", "0.25",
                           "--data", str(base.parent / "base.txt"), "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "prune.json").read_text())
    assert len(record["layers_removed"]) == 1 and record["heads_per_block"] == [4, 2]
    cfg = AutoModelForCausalLM.from_pretrained(out).config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == \
        (1, 2, 1, 96)


@pytest.mark.parametrize("args, needles", [
    (["--heads", "0.25"], ["--heads", "GPT-2", "--layers", "--mlp"]),
    (["--mlp", "1.5"], ["--mlp", "(0, 1)"]),
    (["--layers", "2"], ["--layers", "1 to 1", "got 2"]),
    ([], ["--layers", "--heads", "--mlp"]),
    (["--mlp", "0.5", "--batches", "0"], ["--batches", "at least 1", "got 0"]),
    (["--mlp", "0.0001"], ["--mlp", "removes none"]),
    (["--mlp", "0.5", "--data", "{tmp}/mono.jsonl"], ["--data", "mono.jsonl", "expected plain text"]),
    (["--mlp", "0.5", "--data", "{tmp}/bad.txt"], ["--data", "bad.txt", "line 2", "not valid UTF-8"]),
])
def test_bad_prune_input_is_one_line(base, tmp_path, args, needles):
    (tmp_path / "mono.jsonl").write_text('{"text": "a red box"}\n' * 100)
    (tmp_path / "bad.txt").write_bytes(b"a red box\nblue \xff\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, _, err = run_cli("prune", str(base), *args, "--out", str(tmp_path / "p"))
    assert_user_error(code, err, *needles)
    assert not (tmp_path / "p").exists()


def test_heads_that_round_to_none_are_one_line(llama, tmp_path):
    code, _, err = run_cli("prune", str(llama), "--heads", "0.2", "--out", str(tmp_path / "p"))
    assert_user_error(code, err, "--heads", "2 key/value head", "removes none")
    assert not (tmp_path / "p").exists()


def test_an_out_that_is_a_file_is_one_line(base, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_cli("prune", str(base), "--mlp", "0.5", "--out", str(tmp_path / "notes.txt"))
    assert_user_error(code, err, "--out", "notes.txt", "not a folder")
    code, _, err = run_cli("prune", str(base), "--mlp", "0.5", "--out", str(tmp_path / "notes.txt" / "p"))
    assert_user_error(code, err, "--out", "notes.txt", "not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_gptbigcode_linear_layers_prune_like_gpt2_conv1d(base, tmp_path):
    """GPTBigCode (nn.Linear c_fc/c_proj, weights (out, in); what gptkit quantize rewrites a GPT-2 as) scores and
    keeps the same neurons as the GPT-2 it equals (Conv1D, (in, out)), and the two pruned models agree."""
    from transformers import AutoModelForCausalLM

    from gptkit import engine, trained
    from gptkit.prune import importance, shrink
    from gptkit.quantize import gpt2_to_bigcode

    gpt2, tok = trained.load_lm(base)
    bigcode = gpt2_to_bigcode(gpt2)
    batches = _blocks(tok, base.parent / "base.txt")
    scores = importance(gpt2, batches[:2], engine.causal_lm_loss)
    for a, b in zip(scores, importance(bigcode, batches[:2], engine.causal_lm_loss)):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)
    keep = [s.topk(len(s) // 2).indices.sort().values for s in scores]
    smaller_gpt2, smaller_bigcode = shrink(gpt2, keep), shrink(bigcode, keep)
    with torch.no_grad():
        a, b = smaller_gpt2(batches[2]["input_ids"]).logits, smaller_bigcode(batches[2]["input_ids"]).logits
    assert (a - b).abs().max() < 1e-4 and smaller_bigcode.config.n_inner == len(keep[0])
    folder = tmp_path / "bigcode"
    bigcode.save_pretrained(folder)
    tok.save_pretrained(folder)
    code, _, err = run_cli("prune", str(folder), "--layers", "1", "--mlp", "0.5", "--data",
                           str(base.parent / "base.txt"), "--out", str(tmp_path / "pruned"))
    assert code == 0, err
    cfg = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").config
    assert (cfg.model_type, cfg.n_layer, cfg.n_inner) == ("gpt_bigcode", 1, len(keep[0]))


def test_a_quantized_model_is_refused_in_one_line(base, tmp_path):
    pytest.importorskip("torchao")
    assert run_cli("quantize", str(base), "--out", str(tmp_path / "q8"))[0] == 0
    for args in (["--mlp", "0.5"], ["--layers", "1"]):
        code, _, err = run_cli("prune", str(tmp_path / "q8"), *args, "--data", str(base.parent / "base.txt"),
                               "--out", str(tmp_path / "p"))
        assert_user_error(code, err, "q8", "quantized", "prune works on unquantized weights",
                          "prune first, then quantize")
        assert not (tmp_path / "p").exists()
