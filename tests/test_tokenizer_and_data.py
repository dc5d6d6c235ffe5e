"""Tokenizer training and data loading: round trips, formats, text columns, continuing a checkpoint."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, tiny_recipe
from gptkit.tokenizer import EOS, train_bpe, train_char

TEXTS = ["Hello, world!\nSecond line.", "Grüße aus Köln — naïve café ☕", "tabs\tand  spaces"]


def test_char_tokenizer_round_trips_and_saves(tmp_path):
    from transformers import AutoTokenizer

    tok = train_char(iter([TEXTS]), model_max_length=64)
    assert len(tok) == len(set("".join(TEXTS))) + 2  # every character, plus EOS and UNK
    for t in TEXTS:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(t) and tok.decode(ids) == t
    assert tok.decode(tok("Z")["input_ids"]) == "<unk>"  # unseen characters map to UNK, never crash
    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again("Köln")["input_ids"] == tok("Köln")["input_ids"] and again.eos_token == EOS


def test_bpe_tokenizer_learns_merges_and_never_loses_text(tmp_path):
    corpus = [["the theory of the thing " * 20, "then there they were " * 20]] * 3
    tok = train_bpe(iter(corpus), vocab_size=300, model_max_length=128)
    assert 257 < len(tok) <= 300  # 256 byte symbols + EOS + learned merges
    assert len(tok("the theory")["input_ids"]) < len("the theory")  # merges compress
    for t in TEXTS:  # byte-level: any text, even unseen characters, decodes back exactly
        assert tok.decode(tok(t)["input_ids"]) == t


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_structured_formats_with_a_text_column(tmp_path, fmt):
    import pandas as pd

    rows = [{"id": i, "content": f"Document {i}: " + "the cat sat on the mat. " * 8} for i in range(40)]
    path = tmp_path / f"docs.{fmt}"
    df = pd.DataFrame(rows)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    recipe = tiny_recipe(tmp_path / "r.yaml", path, tmp_path / "run", data={"text_column": "content"},
                         train={"max_steps": 30, "eval_every": 30})
    code, _, err = run_cli("pretrain", str(recipe))
    assert code == 0, err
    rows_logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in rows_logged if "val_loss" in r][-1] < 1.5  # a repetitive corpus is learnable


def test_continue_from_a_checkpoint(tmp_path, corpus):
    """init_from + the checkpoint's tokenizer: training resumes from the learned weights, not from scratch."""
    first = tiny_recipe(tmp_path / "a.yaml", corpus, tmp_path / "a", train={"max_steps": 60, "eval_every": 60})
    assert run_cli("pretrain", str(first))[0] == 0
    second = tiny_recipe(tmp_path / "b.yaml", corpus, tmp_path / "b",
                         model={"init_from": str(tmp_path / "a")},
                         tokenizer={"kind": "pretrained", "path": str(tmp_path / "a")},
                         train={"max_steps": 2, "eval_every": 2, "warmup_steps": 1})
    code, _, err = run_cli("pretrain", str(second))
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train_loss"] < 3.0  # a fresh model starts above 4


def test_llama_architecture_trains_and_loads(tmp_path, corpus):
    from transformers import AutoModelForCausalLM

    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run", model={"arch": "llama", "n_kv_head": 1},
                         train={"max_steps": 30, "eval_every": 30})
    code, _, err = run_cli("pretrain", str(recipe))
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run"))
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] < 3.3


def test_validation_from_its_own_files(tmp_path, corpus):
    val = tmp_path / "val.txt"
    val.write_text(corpus.read_text()[:5000])
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run",
                         data={"val_files": [str(val)]}, train={"max_steps": 2, "eval_every": 2, "eval_batches": None})
    code, _, err = run_cli("pretrain", str(recipe))
    assert code == 0, err
    log = " ".join((tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert "val_loss" in log


def test_gradient_checkpointing_gives_the_same_training(tmp_path, corpus):
    """Recomputing activations saves memory without changing the maths."""
    losses = {}
    for flag in (False, True):
        recipe = tiny_recipe(tmp_path / f"{flag}.yaml", corpus, tmp_path / f"run{flag}",
                             train={"max_steps": 5, "gradient_checkpointing": flag})
        assert run_cli("pretrain", str(recipe))[0] == 0
        rows = (tmp_path / f"run{flag}" / "metrics.jsonl").read_text().splitlines()
        losses[flag] = [json.loads(r)["train_loss"] for r in rows if "train_loss" in r]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.parametrize("kind", ["char", "bpe", "pretrained"])
def test_a_corpus_without_text_is_one_error_and_nothing_is_cached(tmp_path, kind):
    """Only "" and null texts (or a parquet file with no rows): one line naming the file, exit 2, and nothing
    cached, so the next run says the same (an empty token stream used to be cached, then crash np.memmap on
    every run; a trained tokenizer was all special tokens)."""
    import pandas as pd

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", None, ""] * 20))
    tokenizer = {"kind": kind}
    if kind == "pretrained":
        tok = train_bpe([TEXTS * 20], vocab_size=300, model_max_length=64)
        tok.save_pretrained(str(tmp_path / "tok"))
        tokenizer["path"] = str(tmp_path / "tok")
    cache = tmp_path / "cache"
    recipe = tiny_recipe(tmp_path / "r.yaml", path, tmp_path / "run", tokenizer=tokenizer,
                         data={"cache_dir": str(cache)}, train={"max_steps": 2})
    for _ in range(2):
        code, _, err = run_cli("pretrain", str(recipe))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: data.train_files: no text in ") and "d.jsonl" in err, err
        assert not [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    empty = tmp_path / "e.parquet"
    pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(empty)
    recipe = tiny_recipe(tmp_path / "r.yaml", empty, tmp_path / "run", tokenizer=tokenizer,
                         data={"cache_dir": str(cache)}, train={"max_steps": 2})
    code, _, err = run_cli("pretrain", str(recipe))
    assert code == 2 and err.startswith("error: ") and "e.parquet: no rows" in err and len(err.splitlines()) == 1, err


def test_cache_entries_unused_for_a_month_are_removed_when_another_is_made(tmp_path, monkeypatch):
    """Token streams and examples are keyed on the files, the tokenizer and gptkit's code: after an edit or an upgrade
    an entry is never read again, and the cache grew for ever. Making an entry removes those unused for
    $GPTKIT_CACHE_DAYS days (30), with what interrupted builds of them left, but never one a process holds locked;
    reading an entry marks it used."""
    import fcntl
    import os
    import time

    from gptkit import data
    from gptkit.recipe import DataConfig

    monkeypatch.setenv("GPTKIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(TEXTS) * 20)
    tok = train_char(iter([TEXTS]), model_max_length=64)
    cfg = DataConfig(train_files=[str(corpus)], num_proc=1)
    first = data.token_stream([str(corpus)], cfg, tok, "data.train_files")
    root = tmp_path / "cache" / "streams"
    (built,) = [p.stem for p in root.glob("*.json")]
    old = time.time() - 40 * 86400

    def entry(key: str, *names: str, age: float = old) -> list:
        (root / f".{key}.lock").touch()
        for name in names:
            (root / name.format(key=key)).write_bytes(b"x")
            os.utime(root / name.format(key=key), (age, age))
        return names

    entry("a" * 24, "{key}.bin", "{key}.json")  # stale: removed
    entry("b" * 24, "{key}.bin", "{key}.json", age=time.time() - 5 * 86400)  # used 5 days ago: kept
    entry("c" * 24, "{key}.bin", "{key}.json")  # stale but locked by a running process: kept
    entry("d" * 24, ".{key}.partial", ".{key}.progress.json")  # an interrupted tokenization, long abandoned
    for p in root.glob(f"{built}.*"):
        os.utime(p, (old, old))
    assert data.token_stream([str(corpus)], cfg, tok, "data.train_files").tolist() == first.tolist()  # cached
    assert (root / f"{built}.json").stat().st_mtime > time.time() - 3600  # ... and marked used
    with open(root / f".{'c' * 24}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        monkeypatch.setenv("GPTKIT_CACHE_DAYS", "0")  # 0 keeps everything
        corpus.write_text("another corpus")
        data.token_stream([str(corpus)], cfg, tok, "data.train_files")
        assert len(list(root.glob("*.bin"))) == 5
        monkeypatch.delenv("GPTKIT_CACHE_DAYS")
        corpus.write_text("a third corpus")
        data.token_stream([str(corpus)], cfg, tok, "data.train_files")
    left = {p.name for p in root.iterdir() if not p.name.endswith(".lock")}
    made = {n for n in left if n.endswith(".bin")}  # (generated keys are hex too: names are compared whole)
    assert {f"{k * 24}.{x}" for k in "bc" for x in ("bin", "json")} <= left and f"{built}.bin" in made, left
    assert not {f"{'a' * 24}.bin", f"{'a' * 24}.json", f".{'d' * 24}.partial", f".{'d' * 24}.progress.json"} & left
    assert len(made) == 5, left
