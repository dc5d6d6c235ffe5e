"""Hub ids (``name``, ``org/name``, ``org/name@revision``) resolve through a Hugging Face cache laid out as
huggingface_hub lays it out (``models--org--name/refs/main``, ``snapshots/<sha>/``), offline, sockets guarded."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from conftest import assert_user_error, run_cli
from tasks_helpers import finetune_recipe, pretrained_base, splits, translate_rows

MAIN, PINNED = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return pretrained_base(tmp_path_factory.mktemp("hub_base"))


@pytest.fixture
def cache(tmp_path, tiny, monkeypatch) -> Path:
    """``tiny-gpt`` and ``org/tiny-gpt`` at commit MAIN (refs/main); ``org/tiny-gpt`` also at PINNED, whose config
    differs (a marker field), so a test can tell which snapshot was loaded. No network: sockets raise."""
    root = tmp_path / "hub"
    for repo in ("tiny-gpt", "org/tiny-gpt"):
        folder = root / f"models--{repo.replace('/', '--')}"
        shutil.copytree(tiny, folder / "snapshots" / MAIN, ignore=shutil.ignore_patterns("checkpoints", "*.jsonl",
                                                                                         "tensorboard", "*.png"))
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(MAIN)
    pinned = root / "models--org--tiny-gpt" / "snapshots" / PINNED
    shutil.copytree(root / "models--org--tiny-gpt" / "snapshots" / MAIN, pinned)
    config = json.loads((pinned / "config.json").read_text())
    (pinned / "config.json").write_text(json.dumps({**config, "gptkit_test_marker": "pinned"}))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return root


@pytest.mark.parametrize("name, commit, offline", [("tiny-gpt", MAIN, "1"), ("org/tiny-gpt", MAIN, ""),
                                                   (f"org/tiny-gpt@{PINNED}", PINNED, "1")])
def test_finetune_eval_and_generate_from_a_hub_id(tmp_path, cache, monkeypatch, name, commit, offline):
    """With HF_HUB_OFFLINE=1, and with the network allowed: a cached id is used without asking the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    recipe = finetune_recipe(tmp_path, "run", "translate", Path("unused"), splits(tmp_path, translate_rows, 40),
                             train={"max_steps": 4, "eval_every": 4, "save_every": 4, "batch_size": 8},
                             finetune={"eval_examples": 4, "max_new_tokens": 4})
    code, _, err = run_cli("finetune", str(recipe), f"model.init_from={name}")
    assert code == 0, err
    source = json.loads((tmp_path / "run" / "run.json").read_text())["sources"]["model.init_from"]
    assert source["hub_id"] == name.partition("@")[0] and source["commit"] == commit
    assert source["path"].endswith(f"snapshots/{commit}")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config.get("gptkit_test_marker") == ("pinned" if commit == PINNED else None)
    code, out, err = run_cli("eval", "--model", name, "--task", "translate", "--data", str(tmp_path / "test.jsonl"),
                             "--max-new-tokens", "4", "--out", str(tmp_path / "e"))
    assert code == 0, err
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["model"]["path"].endswith(commit)
    code, out, err = run_cli("generate", name, "--prompt", "red =>", "--max-new-tokens", "4")
    assert code == 0 and out.startswith("red =>"), err


def test_an_id_missing_from_the_cache_says_how_to_fetch_it(tmp_path, cache, monkeypatch):
    recipe = finetune_recipe(tmp_path, "run", "translate", Path("unused"), splits(tmp_path, translate_rows, 20))
    code, _, err = run_cli("finetune", str(recipe), "model.init_from=meta-llama/Llama-3.2-1B")
    assert_user_error(code, err, "model.init_from", "meta-llama/Llama-3.2-1B", "HF_HUB_OFFLINE=1",
                      "hf download meta-llama/Llama-3.2-1B")
    code, _, err = run_cli("finetune", str(recipe), "model.init_from=org/tiny-gpt@" + "c" * 40)
    assert_user_error(code, err, "model.init_from", "hf download org/tiny-gpt --revision " + "c" * 40)
    code, _, err = run_cli("generate", "nobody/nothing", "--prompt", "x")
    assert_user_error(code, err, "nobody/nothing", "hf download nobody/nothing")
    partial = cache / "models--org--tokenizer-only"  # what a tokenizer-only from_pretrained leaves in a cache
    shutil.copytree(cache / "models--org--tiny-gpt", partial)
    (partial / "snapshots" / MAIN / "model.safetensors").unlink()
    code, _, err = run_cli("finetune", str(recipe), "model.init_from=org/tokenizer-only")
    assert_user_error(code, err, "model.init_from", "without its safetensors weights", "hf download org/tokenizer-only")
    for args in (["eval", "--model", "org/tokenizer-only", "--task", "lm", "--data", str(tmp_path / "train.jsonl")],
                 ["generate", "org/tokenizer-only", "--prompt", "x"]):  # every command that loads a model
        code, _, err = run_cli(*args)
        assert_user_error(code, err, "without its safetensors weights", "hf download org/tokenizer-only")
    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # online, but the hub cannot be reached: the cache's copy has no weights

    def unreachable(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    code, _, err = run_cli("finetune", str(recipe), "model.init_from=org/tokenizer-only")
    assert_user_error(code, err, "model.init_from", "without its safetensors weights and the hub could not be reached")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli("finetune", str(recipe), "model.init_from=./not/a/dir")
    assert_user_error(code, err, "model.init_from", "neither a local directory nor a Hugging Face hub id")
    assert not (tmp_path / "run").exists()


def test_lora_run_stays_on_the_commit_it_trained_on_and_recipe_eval(tmp_path, cache, monkeypatch):
    """A LoRA run on org/tiny-gpt (main = MAIN) reloads on MAIN after the cache's main moves to PINNED; `gptkit eval
    RECIPE` before training evaluates the hub base and writes beside the user, not into the cache."""
    from gptkit import trained
    from gptkit.recipe import load_recipe

    recipe = finetune_recipe(tmp_path, "run", "translate", Path("unused"), splits(tmp_path, translate_rows, 40),
                             model={"init_from": "org/tiny-gpt"}, finetune={"method": "lora", "eval_examples": 4,
                                                                              "max_new_tokens": 4},
                             train={"max_steps": 4, "eval_every": 4, "save_every": 4, "batch_size": 8})
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("eval", str(recipe), "--max-new-tokens", "4")
    assert code == 0, err
    assert (tmp_path / "eval-translate" / "metrics.json").is_file() and not list(cache.rglob("eval-*"))
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    (cache / "models--org--tiny-gpt" / "refs" / "main").write_text(PINNED)
    model = trained.load_model(tmp_path / "run", "translate", load_recipe(tmp_path / "run" / "recipe.yaml"))
    assert model.get_base_model().name_or_path.endswith(MAIN)


def test_float16_weights_are_not_trained_directly(tmp_path, cache):
    recipe = finetune_recipe(tmp_path, "run", "translate", Path("unused"), splits(tmp_path, translate_rows, 20),
                             model={"init_from": "tiny-gpt", "dtype": "float16"})
    code, _, err = run_cli("finetune", str(recipe))
    assert_user_error(code, err, "model.dtype", "float16", "finetune.method: lora")
    assert not (tmp_path / "run").exists()
