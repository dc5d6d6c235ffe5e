"""gptkit prune: removing feed-forward neurons gives exactly the model with those neurons silenced, in a smaller
checkpoint plain transformers loads; importance picks neurons that matter; heads and bad input are one line."""

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


@pytest.mark.parametrize("args, needles", [
    (["--heads", "0.25"], ["--heads", "prune_heads", "--mlp"]),
    (["--mlp", "1.5"], ["--mlp", "(0, 1)"]),
    ([], ["--mlp"]),
])
def test_bad_prune_input_is_one_line(base, tmp_path, args, needles):
    code, _, err = run_cli("prune", str(base), *args, "--out", str(tmp_path / "p"))
    assert_user_error(code, err, *needles)
    assert not (tmp_path / "p").exists()
