"""`gptkit pretrain` end to end on a tiny model: it learns, writes a complete run, resumes exactly."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, run_interrupted, tiny_recipe

STEPS = 80


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny character-level run shared by the tests that only read it."""
    from conftest import SHAKESPEARE

    tmp = tmp_path_factory.mktemp("trained")
    corpus = tmp / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:40_000])
    recipe = tiny_recipe(tmp / "r.yaml", corpus, tmp / "run",
                         train={"max_steps": STEPS, "batch_size": 16, "eval_every": 20, "save_every": 20})
    code, out, err = run_cli("pretrain", str(recipe))
    assert code == 0, err
    assert "done:" in out
    return tmp / "run"


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_validation_loss_falls_below_bound(trained):
    rows = metrics(trained)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    train = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(train) == STEPS and len(val) == STEPS // 20
    # ln(vocab ~60) = 4.1 at init; the corpus's unigram entropy is 3.28 nats and its bigram entropy 2.38,
    # so 2.75 can only be reached by using the context
    assert train[0] > 3.9
    assert val[-1] < 2.75, val
    assert val == sorted(val, reverse=True), "validation loss should fall at every evaluation"


def test_run_directory_is_complete(trained):
    from gptkit.recipe import Recipe

    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "run.json",
            "metrics.jsonl", "loss.png", "tensorboard", "checkpoints"} <= names
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((trained / "tensorboard").glob("events.out.tfevents.*"))
    Recipe.model_validate(yaml.safe_load((trained / "recipe.yaml").read_text()))  # the run can be repeated
    versions = json.loads((trained / "run.json").read_text())
    assert {"gptkit", "torch", "transformers"} <= versions.keys()
    ckpts = sorted(p.name for p in (trained / "checkpoints").iterdir())
    assert ckpts == ["step-00000060", "step-00000080"]  # keep_last=2


def test_plain_transformers_loads_the_run(trained):
    """A process that never imports gptkit loads model and tokenizer and finds them trained."""
    code = f"""
import math, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(trained)!r})
model = AutoModelForCausalLM.from_pretrained({str(trained)!r}).eval()
assert not any(m.startswith("gptkit") for m in sys.modules)
ids = tok("ROMEO:\\nWhat say you, my lord?\\n", return_tensors="pt").input_ids[:, :32]
with torch.no_grad():
    loss = model(input_ids=ids, labels=ids).loss.item()
out = model.generate(ids[:, :5], max_new_tokens=10, do_sample=False)
print(loss, len(tok), tok.decode(out[0]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    loss, vocab = float(res.stdout.split()[0]), int(res.stdout.split()[1])
    assert loss < 3.0 < 4.0 < __import__("math").log(vocab) + 0.5  # trained weights, not a random init
    assert res.stdout.split(maxsplit=2)[2].startswith("ROMEO")


def test_second_run_skips_tokenization(tmp_path, corpus, caplog):
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "a", train={"max_steps": 1})
    with caplog.at_level(logging.INFO, logger="gptkit"):
        assert run_cli("pretrain", str(recipe))[0] == 0
        assert "tokenized data.train_files" in caplog.text
        caplog.clear()
        assert run_cli("pretrain", str(recipe), f"output.dir={tmp_path / 'b'}")[0] == 0
    assert "using cached tokenizer" in caplog.text and "using cached tokens" in caplog.text
    assert "tokenized data.train_files" not in caplog.text
    # max_steps 1 under the recipe's 5 warmup steps: the peak learning rate is a sixth of train.lr, and it is said
    assert "train.warmup_steps 5 >= train.max_steps 1: the learning rate never reaches train.lr 0.01" in caplog.text


def test_validate_reports_real_parameter_count(trained):
    from safetensors import safe_open

    code, out, err = run_cli("validate", str(trained / "recipe.yaml"))
    assert code == 0, err
    with safe_open(str(trained / "model.safetensors"), "pt") as f:
        saved = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                    else __import__("math").prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert f"{saved:,} parameters" in out, out  # the tokenizer is cached, so its real vocabulary is used
    assert "accelerate launch --num_processes 1 -m gptkit pretrain" in out
    assert "train_files" in out and "all found" in out

    def memory(*overrides):  # the estimate follows the recipe's context and gradient checkpointing
        code, out, err = run_cli("validate", str(trained / "recipe.yaml"), *overrides)
        assert code == 0, err
        return float(re.search(r"memory per process: ([0-9.]+) GiB", out)[1])

    assert memory("model.context=8", "train.batch_size=4096") < memory("train.batch_size=4096")
    assert memory("train.gradient_checkpointing=true", "train.batch_size=4096") < memory("train.batch_size=4096")


def test_tokenizer_cache_key_follows_the_sample_of_a_parquet_corpus(tmp_path):
    """A parquet file holds more text than its size on disk: its tokenizer is keyed by the sample size and seed
    (as a large text corpus is), so changing tokenizer.train_bytes never reuses a tokenizer trained on another
    sample; a small text corpus, read whole whatever the budget, keeps one key."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gptkit.pretrain import _tokenizer_cache_dir
    from gptkit.recipe import Recipe

    pq.write_table(pa.table({"text": ["to be or not to be " * 50] * 20}), tmp_path / "c.parquet")
    (tmp_path / "c.txt").write_text("to be or not to be\n" * 20)

    def key(corpus, train_bytes, seed=1):
        recipe = Recipe.model_validate({"data": {"train_files": [str(corpus)], "cache_dir": str(tmp_path)},
                                        "tokenizer": {"train_bytes": train_bytes}, "train": {"seed": seed}})
        return _tokenizer_cache_dir(recipe, [str(corpus)])

    parquet, text = tmp_path / "c.parquet", tmp_path / "c.txt"
    assert key(parquet, 2_000_000) != key(parquet, 3_000_000) and key(parquet, 2_000_000) != key(parquet, 2_000_000, 2)
    assert key(text, 2_000_000) == key(text, 3_000_000) == key(text, 2_000_000, 2)


def test_cli_import_stays_light():
    """`gptkit --help`, and scoring a predictions file, must not import torch or transformers (seconds each)."""
    code = "import sys, gptkit.cli, gptkit.evaluate; heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]; print(heavy)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


def test_recipes_command_lists_and_shows():
    code, out, _ = run_cli("recipes")
    assert code == 0 and "pretrain/shakespeare-char" in out and "pretrain/tiny" in out
    code, out, _ = run_cli("recipes", "show", "pretrain/tiny")
    assert code == 0 and out.startswith("# gptkit pretrain pretrain/tiny")


def _final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def _train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in metrics(run) if "train_loss" in r}


def test_resume_after_signal_is_bit_identical(tmp_path, monkeypatch):
    """SIGINT mid-run checkpoints at the step boundary; --resume then matches an uninterrupted run exactly,
    across an epoch boundary and with gradient accumulation."""
    from conftest import SHAKESPEARE

    corpus = tmp_path / "small.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:4_000])  # ~110 blocks: an epoch every ~7 steps
    # log_every 5: the step-15 log line averages steps 11-15 across the resume at step 12 (its running sum is saved)
    train = {"max_steps": 20, "grad_accum": 2, "save_every": 5, "eval_every": 10, "log_every": 5}
    model = {"dropout": 0.1}  # dropout makes the RNG state matter
    ref = tiny_recipe(tmp_path / "ref.yaml", corpus, tmp_path / "ref", train=train, model=model)
    assert run_cli("pretrain", str(ref))[0] == 0

    cut = tiny_recipe(tmp_path / "cut.yaml", corpus, tmp_path / "cut", train=train, model=model)
    err = run_interrupted(monkeypatch, "pretrain", str(cut), at=11)  # Ctrl-C asking for step 12
    assert "--resume" in err
    assert (tmp_path / "cut" / "checkpoints" / "step-00000012").is_dir()
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    code, _, err = run_cli("pretrain", str(cut), "--resume")
    assert code == 0, err

    assert _train_losses(tmp_path / "cut") == _train_losses(tmp_path / "ref")  # exact, every step
    a, b = _final_weights(tmp_path / "ref"), _final_weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_resume_with_another_global_batch_goes_on_from_the_example_reached(tmp_path, corpus, monkeypatch, caplog):
    """2 steps of 4 examples, then a resume in batches of 8 (as on twice the processes): it reads on from example 8
    of the data order. The position was step x the new global batch: examples 8-15 were never trained on (and a
    smaller batch trained on some twice)."""
    from gptkit import engine

    first = tiny_recipe(tmp_path / "a.yaml", corpus, tmp_path / "run", train={"max_steps": 2, "batch_size": 4,
                                                                             "save_every": 2})
    assert run_cli("pretrain", str(first))[0] == 0
    more = tiny_recipe(tmp_path / "b.yaml", corpus, tmp_path / "run", train={"max_steps": 4, "batch_size": 8,
                                                                            "save_every": 2})
    taken = []
    real = engine.DataOrder.take
    monkeypatch.setattr(engine.DataOrder, "take", lambda self, pos, count: taken.append((pos, count)) or real(self, pos, count))
    with caplog.at_level(logging.WARNING, logger="gptkit.engine"):
        code, _, err = run_cli("pretrain", str(more), "--resume", "--force")
    assert code == 0, err
    assert taken == [(8, 8), (16, 8)]
    assert "the checkpoint's were 4: training goes on from example 8" in caplog.text
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["examples"] == 24 and state["global_batch"] == 8


def test_validation_sample_is_global_batches_however_the_batch_is_split(tmp_path, corpus):
    """eval_batches counts global batches (batch x processes x accumulation): batch 4 x 2 micro-batches validates on
    the same sample as batch 8 (it validated on half of it; the 2-process run of the same training on the whole)."""
    runs = {}
    for name, batch, accum in (("whole", 8, 1), ("split", 4, 2)):
        recipe = tiny_recipe(tmp_path / f"{name}.yaml", corpus, tmp_path / name,
                             train={"max_steps": 2, "batch_size": batch, "grad_accum": accum, "eval_every": 2,
                                    "eval_batches": 1})
        assert run_cli("pretrain", str(recipe))[0] == 0
        runs[name] = [r["val_loss"] for r in metrics(tmp_path / name) if "val_loss" in r]
    assert len(runs["whole"]) == 1 and runs["split"] == pytest.approx(runs["whole"], rel=1e-5)


@pytest.mark.distributed
def test_two_process_torchrun_matches_one_process(tmp_path, corpus):
    """2 processes x batch 4 == 1 process x batch 8: same examples, same losses; only rank 0 writes."""
    one = tiny_recipe(tmp_path / "one.yaml", corpus, tmp_path / "one", train={"max_steps": 8, "batch_size": 8, "eval_every": 4})
    two = tiny_recipe(tmp_path / "two.yaml", corpus, tmp_path / "two", train={"max_steps": 8, "batch_size": 4, "eval_every": 4,
                                                                           "save_every": 4})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    res = subprocess.run([*torchrun, "-m", "gptkit", "pretrain", str(two)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("done:") == 1  # only the main process reports
    res = subprocess.run([sys.executable, "-m", "gptkit", "pretrain", str(one)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [sorted(r) for r in m1] == [sorted(r) for r in m2]  # one line per event: rank 1 wrote nothing
    for r1, r2 in zip(m1, m2):
        for key in ("train_loss", "val_loss"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-5), (r1, r2)
    # a 2-process resume from the step-4 checkpoint (several CPU processes' device "cpu:0" broke weight loading)
    import shutil

    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-00000008")
    (tmp_path / "two" / "model.safetensors").unlink()
    res = subprocess.run([*torchrun, "-m", "gptkit", "pretrain", str(two), "--resume"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r.get("train_loss") for r in metrics(tmp_path / "two")] == [r.get("train_loss") for r in m2]


def test_generate_command_on_a_run(trained):
    code, out, err = run_cli("generate", str(trained), "--prompt", "ROMEO:", "--max-new-tokens", "80")
    assert code == 0, err
    assert out.startswith("ROMEO:") and len(out.rstrip("\n")) == len("ROMEO:") + 80  # char model, past context 32
    again = run_cli("generate", str(trained), "--prompt", "ROMEO:", "--max-new-tokens", "80")[1]
    assert again == out  # greedy is deterministic
    a = run_cli("generate", str(trained), "-p", "To", "--temperature", "0.9", "--top-k", "20", "--seed", "7")[1]
    b = run_cli("generate", str(trained), "-p", "To", "--temperature", "0.9", "--top-k", "20", "--seed", "7")[1]
    c = run_cli("generate", str(trained), "-p", "To", "--temperature", "0.9", "--top-k", "20", "--seed", "8")[1]
    assert a == b != c  # sampling is seeded
    code, out, _ = run_cli("generate", str(trained), "-p", "To", "--num-beams", "3", "--num-samples", "2",
                           "--max-new-tokens", "10")
    assert code == 0 and out.count("=== sample") == 2


@pytest.mark.slow
def test_shakespeare_char_reaches_nanogpt_loss(tmp_path):
    """The bundled nanoGPT 'baby' recipe reaches nanoGPT's published validation loss (1.88) on CPU."""
    code, out, err = run_cli("pretrain", "pretrain/shakespeare-char", f"output.dir={tmp_path / 'run'}")
    assert code == 0, err
    val = [r["val_loss"] for r in metrics(tmp_path / "run") if "val_loss" in r]
    assert len(val) == 6 and val[-1] <= 1.88, val


def test_padded_vocabulary_never_generates_its_padding(tmp_path, corpus):
    """model.vocab_multiple pads a new model's vocabulary; the padding ids are suppressed by the saved generation
    config, so plain transformers never emits them even where the output layer favours them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run", model={"vocab_multiple": 64},
                         train={"max_steps": 4, "eval_every": 4, "save_every": 4})
    code, _, err = run_cli("pretrain", str(recipe))
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(tmp_path / "run")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    n, vocab = len(tok), model.config.vocab_size
    assert vocab % 64 == 0 and n < vocab < n + 64
    assert model.generation_config.suppress_tokens == list(range(n, vocab))

    def favour_padding(module, args, logits):
        return torch.cat([logits[..., :n], logits[..., n:] + 1000], -1)

    model.get_output_embeddings().register_forward_hook(favour_padding)
    ids = tok("ROMEO:", return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=20, top_k=0)
    assert out.max() < n
    model.generation_config.suppress_tokens = None  # the check can fail: unsuppressed, the padding wins
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=20, top_k=0)
    assert out[0, ids.shape[1]:].min() >= n
