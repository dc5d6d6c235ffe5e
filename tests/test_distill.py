"""Distillation: the loss is (1 - alpha) CE + alpha T^2 KL exactly; a student learns from a teacher alone; a distilled
fine-tune runs in the one loop and resumes bit-identically; mismatched tokenizers and task heads are one line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SHAKESPEARE, assert_user_error, run_cli, run_interrupted, tiny_recipe
from tasks_helpers import finetune_recipe, pretrained_base, splits, tiny_bart_with, translate_rows


@pytest.mark.parametrize("plain", [False, True])
def test_the_loss_is_weighted_cross_entropy_plus_scaled_kl(plain, monkeypatch):
    """Per scored position (1 - alpha) CE + alpha T^2 KL(teacher_T || student_T), times its weight, the CE label-smoothed
    as torch's ``label_smoothing``: equal, with its
    gradients, to the formula on the full logits — fused and chunked (3 rows a chunk) or from the logits
    (GPTKIT_PLAIN_HEAD=1); a student padded to a larger vocabulary than its teacher's is scored on the common part."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from gptkit import modeling

    if plain:
        monkeypatch.setenv("GPTKIT_PLAIN_HEAD", "1")
    monkeypatch.setattr(modeling, "_chunk_rows", lambda *args: 3)
    torch.manual_seed(0)

    def gpt(vocab, layers):
        return AutoModelForCausalLM.from_config(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=2,
                                                           n_positions=16)).eval()

    student, teacher = gpt(104, 1), gpt(97, 2)  # the student's vocabulary padded for speed: 7 rows no token uses
    for p in teacher.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 97, (2, 9))
    keep = torch.zeros(2, 9, dtype=torch.bool)
    keep[0, 2:8], keep[1, :5] = True, True
    targets = torch.randint(0, 97, (int(keep.sum()),))
    weights = torch.rand(int(keep.sum())) + 0.5
    T, alpha, eps = 2.0, 0.3, 0.1

    s = student(input_ids=ids).logits[keep]
    with torch.no_grad():
        t = teacher(input_ids=ids).logits[keep]
    ce = torch.nn.functional.cross_entropy(s, targets, reduction="none", label_smoothing=eps)
    kl = torch.nn.functional.kl_div((s[:, :97] / T).log_softmax(-1), (t / T).log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    want = (((1 - alpha) * ce + alpha * T * T * kl) * weights).sum()
    want.backward()
    want_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    got = modeling.scored_cross_entropy(student, keep, targets, weights, teacher=teacher, temperature=T, alpha=alpha,
                                        smoothing=eps, input_ids=ids)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert all(torch.allclose(p.grad, w, atol=1e-5) for p, w in zip(student.parameters(), want_grads, strict=True))
    # the student's own targets: no KL
    same = modeling.scored_cross_entropy(student, keep, targets, teacher=student, temperature=T, alpha=alpha,
                                         smoothing=eps, input_ids=ids)
    assert same.item() == pytest.approx(((1 - alpha) * ce.sum()).item(), rel=1e-5)


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
    cut = finetune_recipe(tmp_path, "cut", "translate", base, s, **sections)
    run_interrupted(monkeypatch, "distill", str(cut), at=6)
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
    assert not (tmp_path / "o").exists()  # checked before the run folder is made: a corrected rerun just works
    code, _, err = run_cli("distill", str(recipe), f"distill.teacher={tmp_path / 'nothing'}")
    assert_user_error(code, err, "distill.teacher")
    assert not (tmp_path / "x").exists()


def test_validate_checks_the_teacher_as_distill_does(base, tmp_path):
    """`gptkit validate` runs distill's own teacher checks (configs and tokenizers, no weights): a missing teacher or
    one with another tokenizer is the one line distill gives; a good one is a `teacher:` line of the report."""
    s = splits(tmp_path, translate_rows, 50)
    recipe = finetune_recipe(tmp_path, "x", "translate", base, s, train={"max_steps": 2})
    code, out, err = run_cli("validate", str(recipe), f"distill.teacher={tmp_path / 'nothing'}")
    assert_user_error(code, err, "distill.teacher", "nothing")
    corpus = tmp_path / "c.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:20_000])
    char_run = tiny_recipe(tmp_path / "char.yaml", corpus, tmp_path / "char", train={"max_steps": 2, "eval_every": 2})
    assert run_cli("pretrain", str(char_run))[0] == 0
    code, out, err = run_cli("validate", str(recipe), f"distill.teacher={tmp_path / 'char'}")
    assert_user_error(code, err, "distill.teacher", "tokenizer", "is not the student's")
    code, out, err = run_cli("validate", str(recipe), f"distill.teacher={base}")
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("teacher: "))
    assert str(base) in line and "the student's tokenizer" in line and "parameters" in line, line
    # pretraining: the student's tokenizer named by tokenizer.path is compared before any training
    student = tiny_recipe(tmp_path / "s.yaml", corpus, tmp_path / "s", tokenizer={"kind": "pretrained", "path": str(base)},
                          distill={"teacher": str(tmp_path / "char")})
    code, out, err = run_cli("validate", str(student))
    assert_user_error(code, err, "distill.teacher", "tokenizer")
    code, out, err = run_cli("validate", str(student), f"distill.teacher={base}")
    assert code == 0 and f"teacher: {base}: " in out, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "s").exists()


def test_a_teacher_with_a_shorter_context_than_the_student_trains_on_is_one_line(base, tmp_path):
    """The base reads 64 positions; a student packing 128-token blocks crashed mid-training in its position embedding
    (and validate accepted it): now both refuse it before training."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:20_000])
    student = tiny_recipe(tmp_path / "s.yaml", corpus, tmp_path / "s", model={"context": 128},
                          tokenizer={"kind": "pretrained", "path": str(base)}, distill={"teacher": str(base)})
    for command in ("validate", "distill"):
        code, _, err = run_cli(command, str(student))
        assert_user_error(code, err, "distill.teacher", "64 positions", "128-token", "model.context")
    assert not (tmp_path / "s").exists()
    code, _, err = run_cli("validate", str(student), "model.context=64")
    assert code == 0, err


def test_an_encoder_decoder_teacher_for_a_decoder_only_student_is_one_line(base, tmp_path):
    """A BART teacher with the student's tokenizer was accepted, its soft targets meaningless for a GPT student."""
    bart = tiny_bart_with(base, tmp_path / "bart")
    corpus = tmp_path / "c.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:20_000])
    student = tiny_recipe(tmp_path / "s.yaml", corpus, tmp_path / "s",
                          tokenizer={"kind": "pretrained", "path": str(base)}, distill={"teacher": str(bart)})
    code, _, err = run_cli("validate", str(student))
    assert_user_error(code, err, "distill.teacher", "encoder-decoder", "decoder-only", "same kind")
