"""The recipe schema: defaults, typing, overrides, extends, path resolution, and its error lines."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gptkit.cli import bundled_recipes_dir
from gptkit.errors import UserError
from gptkit.recipe import Recipe, load_recipe


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_fill_every_section(tmp_path):
    r = load_recipe(write(tmp_path / "r.yaml", "description: x\n"))
    assert r == Recipe(description="x")
    assert r.train.schedule == "cosine" and r.model.arch == "gpt2"


def test_overrides_are_typed_by_the_schema(tmp_path):
    r = load_recipe(write(tmp_path / "r.yaml", "train: {max_steps: 5}\n"),
                    ["train.lr=3e-4", "train.max_steps=7", "train.compile=true", "model.arch=llama"])
    assert r.train.lr == pytest.approx(3e-4) and isinstance(r.train.lr, float)
    assert r.train.max_steps == 7 and r.train.compile is True and r.model.arch == "llama"


def test_text_overrides_are_taken_as_written(tmp_path):
    r = load_recipe(write(tmp_path / "r.yaml", "train: {max_steps: 5}\n"),
                    ["finetune.prompt=translate English to German: {source}", "description=1.0", "finetune.metric=null"])
    assert r.finetune.prompt == "translate English to German: {source}"
    assert r.description == "1.0" and r.finetune.metric is None
    quoted = load_recipe(write(tmp_path / "q.yaml", "{}\n"), ['finetune.prompt="Q: {question}"'])
    assert quoted.finetune.prompt == "Q: {question}"  # YAML quoting still works
    cols = load_recipe(write(tmp_path / "c.yaml", "{}\n"), ["data.columns.label=yes", "data.columns.text=1"])
    assert cols.data.columns == {"label": "yes", "text": "1"}  # column names, not a bool and an int


def test_yaml_float_without_dot_is_still_a_float(tmp_path):
    # PyYAML reads "3e-4" as a string; the schema must still type it as a number
    r = load_recipe(write(tmp_path / "r.yaml", "train: {lr: 3e-4, min_lr: 1e-5}\n"))
    assert r.train.lr == pytest.approx(3e-4)


def test_unknown_key_names_file_field_and_suggestion(tmp_path):
    path = write(tmp_path / "r.yaml", "train:\n  learning_rat: 0.1\n")
    with pytest.raises(UserError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg and "train.learning_rat" in msg and "unknown key" in msg
    path = write(tmp_path / "r2.yaml", "trian:\n  lr: 0.1\n")
    with pytest.raises(UserError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        load_recipe(path)
    path = write(tmp_path / "r3.yaml", "train:\n  max_step: 3\n")
    with pytest.raises(UserError, match=r"did you mean 'max_steps'"):
        load_recipe(path)
    path = write(tmp_path / "ok.yaml", "{}\n")
    for hf_name, ours in (("train.learning_rate", "lr"), ("train.gradient_accumulation_steps", "grad_accum"),
                          ("model.hidden_size", "n_embd"), ("train.save_total_limit", "keep_last")):
        with pytest.raises(UserError, match=rf"{hf_name}: unknown key \(did you mean '{ours}'\?\)"):
            load_recipe(path, [f"{hf_name}=1"])  # the Hugging Face name for the setting


def test_wrong_type_names_field_and_value(tmp_path):
    path = write(tmp_path / "r.yaml", "train:\n  max_steps: lots\n")
    with pytest.raises(UserError, match=r"r.yaml: train.max_steps: .*integer.*got 'lots'"):
        load_recipe(path)


def test_override_errors_name_the_command_line(tmp_path):
    path = write(tmp_path / "r.yaml", "{}\n")
    with pytest.raises(UserError, match=r"command-line override: train.lr: .*number"):
        load_recipe(path, ["train.lr=fast"])
    with pytest.raises(UserError, match=r"did you mean 'lr'"):
        load_recipe(path, ["train.lrr=0.1"])
    with pytest.raises(UserError, match=r"expected key.path=value"):
        load_recipe(path, ["train.lr"])
    with pytest.raises(UserError, match=r"^command-line override: train.lr: "):  # a part of the overridden field
        load_recipe(path, ["train.lr.x=5"])
    with pytest.raises(UserError, match=r"^command-line override: data.text_column"):  # an item below it
        load_recipe(path, ["data.text_column=[a, 5]"])
    with pytest.raises(UserError) as info:
        load_recipe(path, ["tokenizer.train_bytes=lots"])
    assert str(info.value).count("got 'lots'") == 1, info.value
    with pytest.raises(UserError, match=r"^command-line override: foo: unknown key"):  # fails above the key given
        load_recipe(path, ["foo.bar=1"])
    with pytest.raises(UserError, match=r"^command-line override: train: min_lr \(0.001\) must not exceed lr"):
        load_recipe(path, ["train.min_lr=1e-3"])  # a check of the section the override is in


def test_the_deepspeed_config_resolves_against_the_recipe_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub" / "r.yaml", "distributed: {strategy: deepspeed, deepspeed_config: zero2.json}\n")
    monkeypatch.chdir(tmp_path)
    assert load_recipe(path).distributed.deepspeed_config == str(tmp_path / "sub" / "zero2.json")
    assert load_recipe(path, ["distributed.deepspeed_config=z.json"]).distributed.deepspeed_config == \
        str(tmp_path / "z.json")  # an override: the working directory, as every path override


def test_a_glob_in_a_list_override_asks_for_quotes(tmp_path):
    """[*.txt] is not YAML (* starts an alias): one line showing the quoted form, never the text taken for a path."""
    path = write(tmp_path / "r.yaml", "{}\n")
    with pytest.raises(UserError, match=r"^override 'data.train_files=\[\*.txt, b.txt\]': not valid YAML .*alias.*"
                                        r"e.g. data.train_files=\['\*.txt', 'b.txt'\]$"):
        load_recipe(path, ["data.train_files=[*.txt, b.txt]"])
    assert load_recipe(path, ["data.train_files=['*.txt']"]).data.train_files == [str(Path.cwd() / "*.txt")]


def test_the_default_floor_follows_the_learning_rate(tmp_path):
    """train.min_lr unset is lr / 10 (nanoGPT's rule; 3e-5 at the default lr, as before), recorded in the run's
    recipe: a fine-tuning lr of 1e-5 is no longer refused by a fixed 3e-5 floor, and LoRA's lr brings its own."""
    from gptkit.recipe import recipe_to_yaml

    path = write(tmp_path / "r.yaml", "{}\n")
    assert load_recipe(path).train.min_lr == 3e-5
    low = load_recipe(path, ["train.lr=1e-5"])
    assert (low.train.lr, low.train.min_lr) == (1e-5, 1e-6)
    assert yaml.safe_load(recipe_to_yaml(low))["train"]["min_lr"] == 1e-6
    assert load_recipe(path, ["finetune.method=lora"]).train.min_lr == 1e-4
    assert load_recipe(path, ["train.lr=1e-5", "train.min_lr=0"]).train.min_lr == 0
    assert load_recipe(write(tmp_path / "s.yaml", "train: {lr: 1.0e-3, min_lr: 5.0e-4}\n")).train.min_lr == 5e-4


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("train: {lr: -1}\n", r"train.lr: .*greater than 0"),
        ("model: {n_layer: 0}\n", r"model.n_layer: .*greater than or equal to 1"),
        ("model: {context: 0}\n", r"model.context"),
        ("model: {n_embd: 30, n_head: 4}\n", r"divisible by n_head"),
        ("model: {arch: llama, n_embd: 32, n_head: 2, n_kv_head: 3}\n", r"n_head \(2\) must be divisible by n_kv_head"),
        ("model: {arch: llama, n_embd: 12, n_head: 4}\n", r"even width for its rotary embedding; n_embd / n_head = 3"),
        ("train: {lr: 1.0e-4, min_lr: 1.0e-3}\n", r"min_lr .* must not exceed lr"),
        ("tokenizer: {kind: pretrained}\n", r"needs tokenizer.path"),
        ("train: {lr: .inf}\n", r"train.lr: .*finite number"),
        ("train: {weight_decay: .inf}\n", r"train.weight_decay: .*finite number"),
        ("train: {grad_clip: .nan}\n", r"train.grad_clip: .*finite number"),
        ("output: {dir: ''}\n", r"output.dir: expected a folder .* empty path"),
        ("model: {arch: bert}\n", r"model.arch: .*'gpt2', 'llama', 'bart' or 't5'"),
    ],
)
def test_absurd_values_are_refused(tmp_path, text, pattern):
    with pytest.raises(UserError, match=pattern):
        load_recipe(write(tmp_path / "r.yaml", text))


def test_extends_merges_and_resolves_paths_per_file(tmp_path):
    write(tmp_path / "base" / "corpus.txt", "hello")
    write(tmp_path / "base" / "base.yaml", "data: {train_files: [corpus.txt]}\ntrain: {lr: 1.0e-3, max_steps: 10}\n")
    child = write(tmp_path / "child" / "c.yaml", "extends: ../base/base.yaml\ntrain: {max_steps: 99}\n")
    r = load_recipe(child)
    assert r.train.max_steps == 99 and r.train.lr == pytest.approx(1e-3)  # child wins, base fills in
    assert r.data.train_files == [str((tmp_path / "base" / "corpus.txt").resolve())]


def test_extends_cycle_is_refused(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_a_folder_is_not_taken_for_a_recipe(tmp_path, monkeypatch):
    from gptkit.cli import bundled_recipes_dir, resolve_recipe_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrain" / "tiny").mkdir(parents=True)  # ./pretrain/tiny/ beside the user: not the recipe
    assert resolve_recipe_path("pretrain/tiny") == bundled_recipes_dir() / "pretrain" / "tiny.yaml"
    with pytest.raises(UserError, match="pretrain: is a directory, expected a YAML recipe file"):
        resolve_recipe_path("pretrain")
    with pytest.raises(UserError, match="nothing: recipe file not found"):
        resolve_recipe_path("nothing")


def test_file_level_errors(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="recipe is empty"):
        load_recipe(write(tmp_path / "empty.yaml", ""))
    with pytest.raises(UserError, match=r"line 3 column 1: YAML syntax error"):
        load_recipe(write(tmp_path / "bad.yaml", "train:\n  lr: [1, 2\n"))
    with pytest.raises(UserError, match="expected a mapping"):
        load_recipe(write(tmp_path / "list.yaml", "- a\n- b\n"))
    with pytest.raises(UserError, match="is a directory"):
        load_recipe(tmp_path)
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="not UTF-8"):
        load_recipe(bad)


def test_unsafe_yaml_tags_are_refused(tmp_path):
    path = write(tmp_path / "r.yaml", "description: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="YAML"):
        load_recipe(path)


BUNDLED = sorted(p for p in bundled_recipes_dir().rglob("*.yaml")
                 if not p.name.startswith("_") and p.relative_to(bundled_recipes_dir()).parts[0] != "accelerate")


def test_bundled_recipes_exist():
    names = {str(p.relative_to(bundled_recipes_dir())) for p in BUNDLED}
    assert {"pretrain/tiny.yaml", "pretrain/shakespeare-char.yaml", "pretrain/gpt2-small.yaml"} <= names


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_every_bundled_recipe_validates(path):
    """Pretraining recipes are checked here; fine-tuning ones need a base model (tests/test_finetune.py)."""
    from gptkit import pretrain

    from gptkit import modeling

    first = path.read_text().splitlines()[0]
    folder = path.parent.name
    recipe = load_recipe(path)
    seq2seq = recipe.model.arch in modeling.ENCODER_DECODERS  # built by `gptkit init`, trained by finetune
    command = "init" if seq2seq else "pretrain" if folder == "pretrain" else "finetune"
    assert first.startswith(f"# gptkit {command} {folder}/{path.stem}"), "every recipe opens with the command that runs it"
    assert recipe.description
    assert recipe.task == folder, "recipes/<task>/ holds recipes of that task"
    if seq2seq:
        assert modeling.meta_param_count(modeling.build_config(recipe.model, recipe.tokenizer.vocab_size, 0, 1)) > 0
    elif recipe.task == "pretrain":
        assert pretrain.check(recipe).n_params > 0  # inputs exist, model builds on the meta device


def test_recipe_folders_match_task_modules():
    """recipes/<task>/ <-> tasks/<task>.py <-> tests: the registry, the schema and the folders agree."""
    import typing

    from gptkit import tasks
    from gptkit.recipe import Recipe

    schema_tasks = set(typing.get_args(Recipe.model_fields["task"].annotation))
    assert schema_tasks == {"pretrain", *tasks.FINETUNE_TASKS}
    folders = {p.name for p in bundled_recipes_dir().iterdir() if p.is_dir()} - {"accelerate"}
    assert folders <= schema_tasks, folders - schema_tasks
    for name in tasks.FINETUNE_TASKS:
        assert isinstance(tasks.load(name), tasks.FinetuneTask), name


def test_lora_learning_rate_default_and_what_the_run_records(tmp_path):
    """LoRA takes train.lr 1e-3 unless the recipe (or an override) sets it; full fine-tuning keeps 3e-4."""
    from gptkit.recipe import LORA_LR, load_recipe, recipe_to_yaml

    path = tmp_path / "r.yaml"
    path.write_text("task: translate\nfinetune: {method: lora}\n")
    assert load_recipe(path).train.lr == LORA_LR == 1e-3
    assert "lr: 0.001" in recipe_to_yaml(load_recipe(path))  # the run's recipe.yaml shows the rate used
    assert load_recipe(path, ["train.lr=5e-4"]).train.lr == 5e-4
    assert load_recipe(path, ["finetune.method=full"]).train.lr == 3e-4
    path.write_text("task: translate\nfinetune: {method: lora}\ntrain: {lr: 2.0e-4}\n")
    assert load_recipe(path).train.lr == 2e-4


def test_schema_reference_shows_the_real_defaults():
    """`gptkit recipes schema`: defaults made by a factory are shown as they are (trackers default to tensorboard)."""
    from gptkit.recipe import schema_reference

    rows = {line.split("|")[1].strip(" `"): line.split("|")[2].strip(" `") for line in schema_reference().splitlines()
            if line.startswith("| `")}
    assert rows["train.trackers"] == "[tensorboard]" and rows["data.train_files"] == "[]", rows
    assert rows["train.lr"] == str(Recipe().train.lr) and rows["model.context"] == "256", rows
