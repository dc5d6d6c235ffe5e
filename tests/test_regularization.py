"""Regularisation knobs a fine-tune needs: train.label_smoothing (every task's training loss is torch's label-smoothed
cross-entropy; validation stays plain) and model.dropout over a base's own."""

from __future__ import annotations

import pytest
import torch

from conftest import SHAKESPEARE, run_cli, run_interrupted, tiny_recipe
from tasks_helpers import finetune_recipe, pretrained_base, splits, translate_rows


def _gpt2(cls, **config):
    from transformers import GPT2Config

    torch.manual_seed(0)
    return cls(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=16, pad_token_id=0,
                          **config)).eval()


def test_classify_and_span_heads_smooth_as_torch_and_equal_the_heads_own_loss_without():
    from transformers import GPT2ForQuestionAnswering, GPT2ForSequenceClassification

    from gptkit.tasks import classify, qa

    ids = torch.randint(1, 50, (4, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    model = _gpt2(GPT2ForSequenceClassification, num_labels=3)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 2])}
    assert classify.loss(model, batch).item() == pytest.approx(model(**batch).loss.item() * 4, rel=1e-6)
    logits = model(input_ids=ids, attention_mask=mask).logits
    want = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum", label_smoothing=0.2)
    assert classify.loss(model, batch, smoothing=0.2).item() == pytest.approx(want.item(), rel=1e-6)

    model = _gpt2(GPT2ForQuestionAnswering)
    full = torch.ones_like(ids)  # (the head's own loss takes padding positions in too: test_qa checks they are out)
    batch = {"input_ids": ids, "attention_mask": full, "start_positions": torch.tensor([2, 0, 5, 9]),
             "end_positions": torch.tensor([3, 0, 8, 9])}  # 0: a window without the answer
    assert qa.loss(model, batch).item() == pytest.approx(model(**batch).loss.item() * 4, rel=1e-6)
    out = model(input_ids=ids, attention_mask=full)
    want = sum(torch.nn.functional.cross_entropy(z, y, reduction="sum", label_smoothing=0.2)
               for z, y in ((out.start_logits, batch["start_positions"]), (out.end_logits, batch["end_positions"])))
    assert qa.loss(model, batch, smoothing=0.2).item() == pytest.approx(want.item() / 2, rel=1e-6)


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_the_recipe_smooths_training_and_never_validation(tmp_path, command, monkeypatch):
    """Every training loss of a run with train.label_smoothing 0.2 is smoothed, in training mode (dropout on, also
    before the first validation of a base that from_pretrained hands back in eval mode); every validation loss is
    plain, in eval mode."""
    from gptkit import modeling

    seen = {True: set(), False: set()}  # grad enabled (training) -> smoothing values used
    real = modeling.scored_cross_entropy

    def spy(model, *args, smoothing=0.0, **kwargs):
        seen[torch.is_grad_enabled()].add((smoothing, model.training))
        return real(model, *args, smoothing=smoothing, **kwargs)

    if command == "pretrain":
        recipe = tiny_recipe(tmp_path / "r.yaml", SHAKESPEARE, tmp_path / "out",
                             train={"max_steps": 4, "eval_every": 2, "label_smoothing": 0.2})
        args = ("pretrain", str(recipe))
    else:
        base = pretrained_base(tmp_path)
        recipe = finetune_recipe(tmp_path, "ft", "translate", base, splits(tmp_path, translate_rows, 40),
                                 train={"max_steps": 4, "eval_every": 2, "label_smoothing": 0.2})
        args = ("finetune", str(recipe), "--task", "translate")
    monkeypatch.setattr(modeling, "scored_cross_entropy", spy)
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert seen == {True: {(0.2, True)}, False: {(0.0, False)}}


def test_model_dropout_sets_every_dropout_field_of_the_base(tmp_path):
    from transformers import BartConfig, LlamaConfig, T5Config

    from gptkit import modeling, trained
    from gptkit.errors import UserError
    from gptkit.recipe import load_recipe
    from gptkit.tasks import translate

    base = pretrained_base(tmp_path)
    files = splits(tmp_path, translate_rows, 20)

    def built(**model):
        recipe = load_recipe(finetune_recipe(tmp_path, "d", "translate", base, files, model=model))
        return translate.build_model(recipe, trained.tokenizer_of(str(base)), [])

    own = built()
    rates = {m.p for m in own.modules() if isinstance(m, torch.nn.Dropout)}
    assert (own.config.resid_pdrop, own.config.embd_pdrop, own.config.attn_pdrop) == (0.0, 0.0, 0.0) and rates == {0.0}
    model = built(dropout=0.3)
    assert (model.config.resid_pdrop, model.config.embd_pdrop, model.config.attn_pdrop) == (0.3, 0.3, 0.3)
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    lora = finetune_recipe(tmp_path, "lora", "translate", base, files, model={"dropout": 0.3},  # adapters on it
                           finetune={"method": "lora", "eval_examples": 2, "max_new_tokens": 2},
                           train={"max_steps": 2, "eval_every": 2, "save_every": 2})
    code, _, err = run_cli("finetune", str(lora))  # the best adapters reload on the base with its dropout
    assert code == 0, err
    reloaded = trained.load_model(tmp_path / "lora", "translate", load_recipe(tmp_path / "lora" / "recipe.yaml"))
    assert reloaded.config.resid_pdrop == 0.3
    assert modeling.dropout_fields(LlamaConfig(), 0.2) == {"attention_dropout": 0.2}
    assert set(modeling.dropout_fields(BartConfig(), 0.2)) == {"dropout", "attention_dropout", "activation_dropout"}
    assert modeling.dropout_fields(T5Config(), 0.2) == {"dropout_rate": 0.2}
    with pytest.raises(UserError, match="model.dropout"):
        modeling.dropout_fields(object.__new__(type("NoDrop", (), {"model_type": "nodrop"})), 0.2)


def test_a_finetune_with_dropout_resumes_bit_identically_after_a_validation(tmp_path, monkeypatch):
    """Dropout 0.2 and label smoothing, interrupted after the first validation (which switches modes) and
    resumed: the same training losses at every step as the run that was never stopped."""
    import json

    base = pretrained_base(tmp_path)
    s = splits(tmp_path, translate_rows, 100)
    sections = dict(model={"dropout": 0.2}, train={"max_steps": 10, "eval_every": 4, "save_every": 4, "log_every": 1,
                                                   "label_smoothing": 0.1},
                    finetune={"eval_examples": 4, "max_new_tokens": 4})
    ref = finetune_recipe(tmp_path, "ref", "translate", base, s, **sections)
    assert run_cli("finetune", str(ref))[0] == 0
    cut = finetune_recipe(tmp_path, "cut", "translate", base, s, **sections)
    run_interrupted(monkeypatch, "finetune", str(cut), at=6)
    code, _, err = run_cli("finetune", str(cut), "--resume")
    assert code == 0, err

    def losses(run):
        return {r["step"]: r["train_loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if "train_loss" in r}

    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")
    plain = finetune_recipe(tmp_path, "plain", "translate", base, s, **{**sections, "model": {}})
    assert run_cli("finetune", str(plain))[0] == 0
    assert losses(tmp_path / "plain")[1] != losses(tmp_path / "ref")[1]  # dropout is on from the first step
