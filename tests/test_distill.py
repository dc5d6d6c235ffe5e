"""Distillation: the loss is (1 - alpha) CE + alpha T^2 KL exactly; a student learns from a teacher alone; a distilled
fine-tune runs in the one loop and resumes bit-identically; mismatched tokenizers and task heads are one line."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from conftest import SHAKESPEARE, assert_user_error, run_cli, tiny_recipe
from tasks_helpers import finetune_recipe, pretrained_base, splits, translate_rows


def test_the_loss_is_weighted_cross_entropy_plus_scaled_kl():
    from gptkit import distill

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    student = lambda m, b: (s, labels)  # noqa: E731 - the "models" are their logits
    teacher = lambda m, b: (t, labels)  # noqa: E731
    T, alpha = 2.0, 0.3

    def logits_fn(model, batch):
        return model(None, batch)

    got = distill.loss_fn(logits_fn, teacher, T, alpha)(student, {})
    mask = labels != -100
    ce = torch.nn.functional.cross_entropy(s[mask], labels[mask], reduction="sum")
    kl = torch.nn.functional.kl_div((s[mask] / T).log_softmax(-1), (t[mask] / T).log_softmax(-1), log_target=True,
                                    reduction="sum")
    assert got.item() == pytest.approx(((1 - alpha) * ce + alpha * T * T * kl).item(), rel=1e-5)
    same = distill.loss_fn(logits_fn, student, T, alpha)(student, {})  # the student's own targets: no KL
    assert same.item() == pytest.approx(((1 - alpha) * ce).item(), rel=1e-5)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return pretrained_base(tmp_path_factory.mktemp("distill"))


def test_a_student_learns_from_the_teacher_alone(tmp_path):
    """alpha 1: no data labels at all, only the teacher's distributions; the student's plain validation loss falls
    to near the teacher's, far below where it started."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:60_000])
    teacher = tiny_recipe(tmp_path / "t.yaml", corpus, tmp_path / "teacher",
                          train={"max_steps": 150, "eval_every": 150, "lr": 3e-3})
    assert run_cli("pretrain", str(teacher))[0] == 0
    student = tiny_recipe(tmp_path / "s.yaml", corpus, tmp_path / "student",
                          train={"max_steps": 150, "eval_every": 10, "lr": 3e-3},
                          tokenizer={"kind": "pretrained", "path": str(tmp_path / "teacher")},
                          distill={"teacher": str(tmp_path / "teacher"), "alpha": 1.0, "temperature": 1.0})
    code, _, err = run_cli("distill", str(student))
    assert code == 0, err
    logged = lambda run: [r["val_loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if "val_loss" in r]  # noqa: E731
    first, last, target = logged(tmp_path / "student")[0], logged(tmp_path / "student")[-1], \
        logged(tmp_path / "teacher")[-1]
    assert last < target + 0.25 * (first - target), (first, last, target)


def test_distilled_finetune_resumes_bit_identically(base, tmp_path, monkeypatch):
    from gptkit import engine

    s = splits(tmp_path, translate_rows, 200)
    teacher = finetune_recipe(tmp_path, "teacher", "translate", base, s,
                              train={"max_steps": 40, "eval_every": 40, "save_every": 40},
                              finetune={"eval_examples": 5, "max_new_tokens": 6})
    assert run_cli("finetune", str(teacher))[0] == 0
    sections = dict(train={"max_steps": 12, "eval_every": 12, "save_every": 4, "log_every": 1},
                    finetune={"eval_examples": 5, "max_new_tokens": 6},
                    distill={"teacher": str(tmp_path / "teacher"), "alpha": 0.7, "temperature": 2.0})
    ref = finetune_recipe(tmp_path, "ref", "translate", base, s, **sections)
    code, _, err = run_cli("distill", str(ref))
    assert code == 0, err
    real_lr_at = engine.lr_at

    def interrupt(it, cfg):
        if it == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(it, cfg)

    cut = finetune_recipe(tmp_path, "cut", "translate", base, s, **sections)
    monkeypatch.setattr(engine, "lr_at", interrupt)
    assert run_cli("distill", str(cut))[0] == 130
    monkeypatch.setattr(engine, "lr_at", real_lr_at)
    code, _, err = run_cli("distill", str(cut), "--resume")
    assert code == 0, err
    losses = lambda run: {r["step"]: r["train_loss"] for r in map(json.loads, open(run / "metrics.jsonl"))  # noqa: E731
                          if "train_loss" in r}
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")
    plain = finetune_recipe(tmp_path, "plain", "translate", base, s, **{**sections, "distill": {}})
    assert run_cli("finetune", str(plain))[0] == 0
    assert losses(tmp_path / "plain") != losses(tmp_path / "ref")  # the teacher's term is in the training loss


def test_bad_distill_input_is_one_line(base, tmp_path):
    s = splits(tmp_path, translate_rows, 50)
    recipe = finetune_recipe(tmp_path, "x", "translate", base, s, train={"max_steps": 2})
    code, _, err = run_cli("distill", str(recipe))
    assert_user_error(code, err, "distill.teacher", "needs a teacher")
    corpus = tmp_path / "c.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:20_000])
    other = tiny_recipe(tmp_path / "o.yaml", corpus, tmp_path / "o", train={"max_steps": 2},
                        distill={"teacher": str(base)})  # its own char tokenizer is not the teacher's BPE
    code, _, err = run_cli("distill", str(other))
    assert_user_error(code, err, "distill.teacher", "tokenizer")
    assert not (tmp_path / "o" / "model.safetensors").exists()
    code, _, err = run_cli("distill", str(recipe), f"distill.teacher={tmp_path / 'nothing'}")
    assert_user_error(code, err, "distill.teacher")
