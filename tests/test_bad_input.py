"""Every bad input: exit code 2, one line naming the file/field, no traceback, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import assert_user_error, run_cli, tiny_recipe


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cases(tmp: Path, corpus: Path) -> list[tuple[str, list[str], list[str]]]:
    """(name, CLI args, substrings the error line must contain)."""
    out = tmp / "run"

    def recipe(name: str, **sections) -> str:
        return str(tiny_recipe(tmp / f"{name}.yaml", corpus, out, **sections))

    def file(name: str, content: bytes | str) -> str:
        p = tmp / name
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(p)

    jsonl_other_col = file("docs.jsonl", '{"content": "hello"}\n{"content": "world"}\n')
    broken_jsonl = file("broken.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    binary = file("bin.txt", b"\x00\xff\xfe\x80 not utf8 \xc3\x28")
    (tmp / "adir.txt").mkdir()
    return [
        ("missing recipe", ["pretrain", str(tmp / "nope.yaml")], ["nope.yaml", "not found"]),
        ("empty recipe", ["pretrain", file("empty.yaml", "")], ["empty.yaml", "empty"]),
        ("yaml syntax", ["pretrain", file("syntax.yaml", "train: [1,\n")], ["syntax.yaml", "YAML syntax error"]),
        ("wrong type", ["pretrain", recipe("wt"), "train.batch_size=big"], ["train.batch_size", "integer"]),
        ("true for a number", ["pretrain", recipe("wb", train={"eval_every": True})],  # pydantic would read 1
         ["wb.yaml", "train.eval_every: expected an integer, got true"]),
        ("unknown key", ["pretrain", file("uk.yaml", "modle: {}\n")], ["uk.yaml", "modle", "did you mean 'model'"]),
        ("missing data", ["pretrain", recipe("md", data={"train_files": [str(tmp / "gone.txt")]})],
         ["data.train_files", "gone.txt", "not found"]),
        ("glob matches nothing", ["pretrain", recipe("gl", data={"train_files": [str(tmp / "*.none")]})],
         ["data.train_files", "matches no file"]),
        ("empty data", ["pretrain", recipe("ed", data={"train_files": [file("empty.txt", "")]})],
         ["data.train_files", "empty.txt", "empty"]),
        ("directory as data", ["pretrain", recipe("dd", data={"train_files": [str(tmp / "adir.txt")]})],
         ["adir.txt", "is a directory"]),
        ("absent text column", ["pretrain", recipe("col", data={"train_files": [jsonl_other_col]})],
         ["column 'text' not found", "content"]),
        ("broken jsonl row", ["pretrain", recipe("bj", data={"train_files": [broken_jsonl]})],
         ["broken.jsonl", "line 3", "invalid JSON"]),
        ("non-utf8 data", ["pretrain", recipe("nu", data={"train_files": [binary]})], ["bin.txt", "UTF-8"]),
        ("corpus smaller than a block", ["pretrain", recipe("small", data={"train_files": [file("s.txt", "tiny")]})],
         ["corpus too small", "model.context=32"]),
        ("hub id not in the cache", ["pretrain", recipe("hub", model={"init_from": "gpt2"})],
         ["model.init_from", "is no local directory, is not in the local Hugging Face cache", "HF_HUB_OFFLINE=1",
          "hf download gpt2"]),
        ("tokenizer hub id not cached", ["pretrain", recipe("tok", tokenizer={"kind": "pretrained", "path": "gpt2"})],
         ["tokenizer.path", "hf download gpt2"]),
        ("resume with nothing", ["pretrain", recipe("rs"), "--resume"], ["--resume", "no gptkit run"]),
        ("conflicting flags", ["pretrain", recipe("cf"), "--resume", "--overwrite"], ["conflict"]),
        ("unknown flag", ["pretrain", recipe("uf"), "--frobnicate"], ["--frobnicate"]),
        ("output with ..", ["pretrain", recipe("dots", output={"dir": "../escape"})], ["output.dir", ".."]),
        ("output in system folder", ["pretrain", recipe("sys", output={"dir": "/etc/gptkit"})], ["system folder"]),
        ("precision without gpu", ["pretrain", recipe("bf", train={"precision": "bf16"})], ["train.precision"]),
        ("generate from an uncached hub id", ["generate", "gpt2", "--prompt", "hi"], ["gpt2", "hf download gpt2"]),
        ("generate bad option", ["generate", str(tmp), "--top-p", "1.5"], ["top_p"]),
        ("fine-tuning recipe to pretrain", ["pretrain", recipe("ftp"), "task=classify"],
         ["task: 'classify' recipes run with `gptkit finetune`"]),
        ("pretraining recipe to finetune", ["finetune", recipe("pft")],
         ["task: 'pretrain' is not a fine-tuning task", "(in the recipe, or --task)", "`gptkit pretrain`"]),
        ("generate non-UTF-8 prompt", ["generate", str(tmp), "--prompt", "\udcff abc"], ["--prompt", "not UTF-8"]),
        ("typo'd columns key", ["validate", recipe("tc", data={"columns": {"sorce": "de"}}), "task=translate"],
         ["tc.yaml", "data.columns.sorce", "not a field", "did you mean 'source'"]),
        ("typo'd columns override", ["finetune", recipe("tco"), "--task", "classify", "data.columns.txt=sentence"],
         ["command-line override", "data.columns.txt", "text, label, text_pair", "did you mean 'text'"]),
        ("multitask entry columns", ["validate", recipe("mtc"), "task=multitask",
                                     "finetune.tasks=[{task: summarize, train_files: [x.jsonl], columns: {doc: a}}]"],
         ["finetune.tasks[0].columns.doc", "did you mean 'document'"]),
        ("deepspeed config not there", ["validate", recipe("dsc", distributed={"strategy": "deepspeed",
                                                                             "deepspeed_config": "zero9.json"})],
         ["dsc.yaml", "distributed.deepspeed_config", str(tmp / "zero9.json"), "not found"]),
        ("columns in a pretrain recipe", ["pretrain", recipe("pc", data={"columns": {"text": "body"}})],
         ["pc.yaml", "data.columns", "data.text_column"]),
    ]


def test_each_bad_input_gets_one_clear_line(tmp_path, corpus):
    for name, args, needles in _cases(tmp_path, corpus):
        code, _, err = run_cli(*args)
        assert_user_error(code, err, *needles)
        assert not (tmp_path / "run").exists(), f"{name}: left an output directory behind"


def test_existing_run_is_not_overwritten(tmp_path, corpus):
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run", train={"max_steps": 2, "save_every": 1})
    code, _, err = run_cli("pretrain", str(recipe))
    assert code == 0, err
    before = snapshot(tmp_path / "run")
    other = tiny_recipe(tmp_path / "other.yaml", corpus, tmp_path / "run", model={"n_layer": 1})
    code, _, err = run_cli("pretrain", str(other))
    assert_user_error(code, err, "already holds a run", "--resume", "--overwrite")
    assert snapshot(tmp_path / "run") == before
    # a changed recipe is refused on resume too, naming the difference
    code, _, err = run_cli("pretrain", str(other), "--resume")
    assert_user_error(code, err, "model.n_layer: 2 -> 1", "--force")
    assert snapshot(tmp_path / "run") == before
    # --force accepts a changed schedule, but a checkpoint of another shape still cannot be loaded
    code, _, err = run_cli("pretrain", str(other), "--resume", "--force")
    assert_user_error(code, err, "--resume", "does not fit this recipe's model", "key(s)")  # which ones
    assert snapshot(tmp_path / "run") == before  # a resume that did not start records nothing
    code, _, err = run_cli("pretrain", str(recipe), "--resume", "--force", "train.lr=0.02", "train.max_steps=3")
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())  # what a further --resume compares with
    assert saved["train"]["max_steps"] == 3 and saved["train"]["lr"] == 0.02
    resumes = json.loads((tmp_path / "run" / "run.json").read_text())["resumes"]
    assert resumes[-1]["changes"] == ["train.lr: 0.01 -> 0.02", "train.max_steps: 2 -> 3"], resumes
    assert run_cli("pretrain", str(recipe), "--resume", "train.lr=0.02", "train.max_steps=3")[0] == 0  # no --force
    code, _, err = run_cli("pretrain", str(recipe), "--resume", "train.lr=0.02", "train.max_steps=3",
                           "train.eval_batches=2")  # another validation sample: best/ would compare across samples
    assert_user_error(code, err, "train.eval_batches: 4 -> 2", "--force")
    before = snapshot(tmp_path / "run")
    # a non-empty folder that is not a run is never deleted, even with --overwrite; nor is one holding the
    # user's own recipe.yaml (a run also has run.json)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    (tmp_path / "mine" / "recipe.yaml").write_text(recipe.read_text())
    code, _, err = run_cli("pretrain", str(recipe), f"output.dir={tmp_path / 'mine'}", "--overwrite")
    assert_user_error(code, err, "holds no gptkit run")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    assert (tmp_path / "mine" / "recipe.yaml").read_text() == recipe.read_text()
    code, _, err = run_cli("pretrain", str(recipe), f"output.dir={tmp_path / 'mine'}", "--resume")
    assert_user_error(code, err, "--resume", "holds no gptkit run")
    # --overwrite replaces a run
    code, _, err = run_cli("pretrain", str(other), "--overwrite")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["n_layer"] == 1
    assert not (tmp_path / ".run.replaced").exists()  # the old run, set aside meanwhile, is gone now


def test_a_tokenizer_larger_than_the_checkpoint_vocabulary_is_one_line(tmp_path, corpus):
    """Continuing a checkpoint with a tokenizer it cannot embed: one line before any folder is made (it was an
    IndexError mid-forward, a device-side assert on a GPU)."""
    small_corpus = tmp_path / "ab.txt"
    small_corpus.write_text("ab ba " * 3000)
    for name, text in (("small", small_corpus), ("big", corpus)):
        assert run_cli("pretrain", str(tiny_recipe(tmp_path / f"{name}.yaml", text, tmp_path / name,
                                                   train={"max_steps": 1, "eval_every": 1})))[0] == 0
    recipe = tiny_recipe(tmp_path / "c.yaml", corpus, tmp_path / "c", model={"init_from": str(tmp_path / "small")},
                         tokenizer={"kind": "pretrained", "path": str(tmp_path / "big")})
    for command in ("validate", "pretrain"):
        code, _, err = run_cli(command, str(recipe))
        assert_user_error(code, err, "tokenizer.path: its", "do not fit model.init_from's vocabulary of")
    assert not (tmp_path / "c").exists()


def test_init_on_an_existing_run_suggests_only_overwrite(tmp_path):
    from gptkit import rundir
    from gptkit.errors import UserError
    from gptkit.recipe import Recipe

    for name in ("recipe.yaml", "run.json"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(UserError, match="already holds a run; pass --overwrite to replace it$"):
        rundir.check(tmp_path, Recipe(), resume=False, overwrite=False, force=False, resumable=False)


def test_resume_of_a_damaged_run_record_is_one_line(tmp_path, corpus):
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    for text, needle in (("a: [", "is not readable YAML"), ("", "holds no recipe")):
        (tmp_path / "run" / "recipe.yaml").write_text(text)
        code, _, err = run_cli("pretrain", str(recipe), "--resume")
        assert_user_error(code, err, f"--resume: {tmp_path / 'run' / 'recipe.yaml'}", needle)


def test_bugs_still_show_a_traceback(tmp_path, corpus, monkeypatch):
    """Internal errors are not dressed up as user errors: traceback and a different exit code."""
    from gptkit import pretrain

    def boom(*a, **k):
        raise RuntimeError("internal bug")

    monkeypatch.setattr(pretrain, "run", boom)
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run")
    with pytest.raises(RuntimeError, match="internal bug"):
        run_cli("pretrain", str(recipe))


def test_odd_but_valid_and_degenerate_data(tmp_path, corpus):
    """Degenerate inputs get one line and exit 2; odd but valid ones (a 10 MB single line) just train."""
    out = tmp_path / "run"

    def pretrain(name: str, **sections) -> tuple[int, str]:
        code, _, err = run_cli("pretrain", str(tiny_recipe(tmp_path / f"{name}.yaml", corpus, out, **sections)))
        return code, err

    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n\n   \n")
    code, err = pretrain("blank", data={"train_files": [str(blank)]})
    assert_user_error(code, err, "corpus too small")
    empty_rows = tmp_path / "rows.jsonl"
    empty_rows.write_text("\n\n")
    code, err = pretrain("rows", data={"train_files": [str(empty_rows)]})
    assert_user_error(code, err, "rows.jsonl")
    code, err = pretrain("batch", train={"batch_size": 100_000})
    assert_user_error(code, err, "train.batch_size", "examples per step")
    assert not out.exists()
    long_line = tmp_path / "long.txt"
    long_line.write_text("to be or not to be " * 550_000)  # ~10 MB, no newline
    code, err = pretrain("long", data={"train_files": [str(long_line)]}, train={"max_steps": 2, "eval_batches": 2})
    assert code == 0, err


def test_validate_launch_line_is_shell_quoted(tmp_path, corpus):
    """The launch lines validate prints paste into a shell as they are: overrides with spaces, colons and braces
    are quoted (shlex.join), and the shell gives back the very arguments."""
    import shlex

    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run")
    overrides = ["finetune.prompt=translate English to German: {source}", f"output.dir={tmp_path / 'my run'}"]
    code, out, err = run_cli("validate", str(recipe), *overrides)
    assert code == 0, err
    for prefix in ("launch: accelerate launch --num_processes 1 -m gptkit pretrain ",
                   "    or: torchrun --nproc_per_node 1 -m gptkit pretrain "):
        line = next(x for x in out.splitlines() if x.startswith(prefix))
        assert shlex.split(line[len(prefix):]) == [str(recipe), *overrides], line


def test_validate_refuses_an_output_dir_the_run_could_not_write(tmp_path, corpus):
    """validate finds what pretrain would find first: output.dir under a file."""
    (tmp_path / "afile").write_text("x")
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "afile" / "run")
    for command in ("validate", "pretrain"):
        code, _, err = run_cli(command, str(recipe))
        assert_user_error(code, err, "output.dir:", f"is under {tmp_path / 'afile'}, which is a file")


def test_help_names_every_task_and_hub_ids():
    """finetune --help lists multitask; generate's MODEL_DIR and eval's --model say hub ids work; export --help
    says what it writes without a required-looking --merge."""
    import re

    def help_of(*command: str) -> str:
        code, out, err = run_cli(*command, "--help")
        assert code == 0, err
        return " ".join(out.split())  # help text wrapped at any width

    assert re.search(r"--task \S+ .*multitask", help_of("finetune"))
    assert "multitask" in help_of("finetune").split("Options")[0]
    assert "ORG/NAME[@REV]" in help_of("generate")
    assert re.search(r"--model \S+ .*ORG/NAME\[@REV\]", help_of("eval"))
    export_help = help_of("export")
    assert "full fine-tune" in export_help and "always merges" in export_help
    for command in ("finetune", "eval"):  # their own examples, not pretraining's
        arguments = help_of(command).split("Options")[0]
        assert "pretrain/tiny" not in arguments and "train.lr=" not in arguments, arguments
    assert "classify/sst2-tiny" in help_of("finetune") and "finetune.method=lora" in help_of("finetune")
    assert re.search(r"recipe .*model\.init_from.*data\.val_files", help_of("eval").split("Options")[0])


def test_export_needs_no_merge_flag(tmp_path):
    """`gptkit export RUN` makes the standalone model a Hugging Face user expects: a LoRA run merged, a full
    fine-tune as it is; --merge is still accepted. A pretraining run is still one line."""
    from transformers import AutoModelForCausalLM

    from tasks_helpers import finetune_recipe, pretrained_base, splits, translate_rows

    base = pretrained_base(tmp_path)
    s = splits(tmp_path, translate_rows, 40)
    short = dict(train={"max_steps": 2, "eval_every": 2, "save_every": 2}, finetune={"eval_examples": 2,
                                                                                     "max_new_tokens": 4})
    for method in ("lora", "full"):
        recipe = finetune_recipe(tmp_path, method, "translate", base, s, **{**short, "finetune": {
            **short["finetune"], "method": method}})
        code, _, err = run_cli("finetune", str(recipe))
        assert code == 0, err
    code, out, err = run_cli("export", str(tmp_path / "lora"))
    assert code == 0, err
    assert "merged model written to" in out and "LoRA" in out
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "lora" / "merged"))
    code, out, err = run_cli("export", str(tmp_path / "full"), "--out", str(tmp_path / "full-out"))
    assert code == 0, err
    assert "full fine-tune" in out
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "full-out"))
    code, out, err = run_cli("export", str(tmp_path / "lora"), "--merge", "--out", str(tmp_path / "again"))
    assert code == 0, err
    code, _, err = run_cli("export", str(base))
    assert_user_error(code, err, "pretraining run", "nothing to export")


def test_a_new_model_folder_is_whole_or_absent(tmp_path):
    """quantize and prune write their model through rundir.new_folder: a failure part-way leaves no half folder, no
    staging folder, and not the folders above --out it made; a success leaves exactly the folder."""
    from gptkit import rundir

    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "a" / "b" / "model"
    with pytest.raises(OSError):
        with rundir.new_folder(out) as staging:
            (staging / "config.json").write_text("{}")
            raise OSError(28, "No space left on device")
    assert list((tmp_path / "kept").iterdir()) == []
    (tmp_path / "empty").mkdir()  # an empty --out is allowed, and kept as it was on failure
    with pytest.raises(KeyboardInterrupt):
        with rundir.new_folder(tmp_path / "empty") as staging:
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "kept"] and not any((tmp_path / "empty").iterdir())
    with rundir.new_folder(out) as staging:
        (staging / "config.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["config.json"] and [p.name for p in out.parent.iterdir()] == ["model"]


def test_a_broken_or_unfit_base_to_continue_is_one_line_before_tokenizing(tmp_path, corpus):
    """Continuing pretraining from model.init_from: a torn config.json or weights file, a context past the
    checkpoint's positions and a tokenizer other than the checkpoint's are one line (validate sees the first three;
    the context one was found only after the whole corpus was tokenized). An attention-free base (Mamba) is described,
    not a traceback."""
    from transformers import MambaConfig, MambaForCausalLM

    base = tmp_path / "base"
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, base, train={"max_steps": 2})
    assert run_cli("pretrain", str(recipe))[0] == 0
    cont = ["model.init_from=" + str(base), "tokenizer.kind=pretrained", "tokenizer.path=" + str(base),
            "output.dir=" + str(tmp_path / "more")]
    code, _, err = run_cli("validate", str(recipe), *cont, "model.context=64")
    assert_user_error(code, err, "model.context: 64 exceeds the checkpoint's 32 positions")
    code, _, err = run_cli("validate", str(recipe), *cont[:1], "output.dir=" + str(tmp_path / "more"))
    assert_user_error(code, err, "tokenizer.kind", "needs the checkpoint's tokenizer")
    torn = tmp_path / "torn"
    torn.mkdir()
    for f in base.glob("*.json"):
        (torn / f.name).write_bytes(f.read_bytes())
    (torn / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:1000])
    code, _, err = run_cli("pretrain", str(recipe), *[c.replace(str(base), str(torn)) for c in cont])
    assert_user_error(code, err, "model.init_from", "cannot load")
    (torn / "config.json").write_text('{"model_type": "gpt2", ')
    code, _, err = run_cli("validate", str(recipe), *[c.replace(str(base), str(torn)) for c in cont])
    assert_user_error(code, err, str(torn / "config.json"))  # (the tokenizer, read first, names it too)
    assert not (tmp_path / "more").exists()
    mamba = tmp_path / "mamba"
    MambaForCausalLM(MambaConfig(vocab_size=80, hidden_size=16, num_hidden_layers=1, state_size=4)).save_pretrained(
        mamba)
    code, out, err = run_cli("validate", str(recipe), *[c.replace(str(base), str(mamba), 1) for c in cont[:1]],
                             *cont[1:])
    assert code == 0 and "Traceback" not in err, err


def test_an_output_or_cache_folder_that_cannot_be_written_is_one_line_before_any_work(tmp_path, corpus, monkeypatch):
    """A folder under a file, or on a read-only filesystem: refused before tokenizing, not a NotADirectoryError or
    "Errno 30" traceback once the work is done."""
    import errno
    import tempfile

    (tmp_path / "afile.txt").write_text("not a folder")
    (tmp_path / "ro").mkdir()
    real = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):  # what a read-only filesystem answers (tests run without root)
        if dir is not None and Path(dir).is_relative_to(tmp_path / "ro"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    recipe = str(tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run"))
    a_file, ro = tmp_path / "afile.txt", tmp_path / "ro"
    for env, args, needles in (
        (None, ["pretrain", recipe, f"output.dir={a_file}/sub"], ["output.dir", f"is under {a_file}, which is a file"]),
        (None, ["pretrain", recipe, f"output.dir={ro}/run"], ["output.dir: cannot write in", "Read-only file system"]),
        (None, ["validate", recipe, f"data.cache_dir={a_file}"], ["data.cache_dir", "is a file, not a folder"]),
        (None, ["pretrain", recipe, f"data.cache_dir={ro}/cache"], ["data.cache_dir", "Read-only file system"]),
        (str(a_file), ["pretrain", recipe], ["GPTKIT_CACHE", "is a file, not a folder"]),
        (str(ro), ["validate", recipe], ["GPTKIT_CACHE", "Read-only file system"]),
    ):
        with monkeypatch.context() as m:
            if env:
                m.setenv("GPTKIT_CACHE", env)
            code, _, err = run_cli(*args)
        assert_user_error(code, err, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt", "corpus.txt", "r.yaml", "ro"]
    assert list(ro.iterdir()) == []


def test_resume_of_a_damaged_run_record_or_metrics_log_rewrites_nothing(tmp_path, corpus):
    """A corrupt run.json, or a bad line before the last of metrics.jsonl: one line before the resume rewrites
    recipe.yaml and run.json."""
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run", train={"max_steps": 2, "save_every": 1})
    assert run_cli("pretrain", str(recipe))[0] == 0
    run = tmp_path / "run"
    (run / "run.json").write_text('{"gptkit": "0.1", "comm')
    before = snapshot(run)
    code, _, err = run_cli("pretrain", str(recipe), "--resume")
    assert_user_error(code, err, f"--resume: {run / 'run.json'} is not readable JSON")
    assert snapshot(run) == before
    (run / "run.json").write_text("{}")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0][:10], *lines[1:]]) + "\n")
    before = snapshot(run)
    code, _, err = run_cli("pretrain", str(recipe), "--resume")
    assert_user_error(code, err, f"{run / 'metrics.jsonl'}: line 1 is not a metrics row")
    assert snapshot(run) == before


def test_load_rows_refuses_a_columns_key_the_task_lacks(tmp_path):
    """The data layer too (a recipe built in Python, a multitask entry): a typo'd key is never dropped in silence."""
    from gptkit.data import load_rows
    from gptkit.errors import UserError

    rows = tmp_path / "t.jsonl"
    rows.write_text('{"de": "hallo", "en": "hello"}\n')
    with pytest.raises(UserError, match=r"data.columns.sorce: not a field .*did you mean 'source'"):
        load_rows([str(rows)], "data.train_files", ("source", "target"), ("synthetic",), {"sorce": "de", "target": "en"})
    assert load_rows([str(rows)], "data.train_files", ("source", "target"), (), {"source": "de", "target": "en"})[0] \
        == {"source": "hallo", "target": "hello"}


@pytest.mark.parametrize("name, value", [("WORLD_SIZE", "abc"), ("RANK", "x"), ("RANK", "-1"), ("LOCAL_RANK", "y"),
                                         ("RANK", "3"), ("LOCAL_RANK", "1")])
def test_a_launcher_variable_set_to_text_is_one_line(tmp_path, corpus, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    if value.isdigit():  # a rank past the launch's size: checked where a launcher set WORLD_SIZE too
        monkeypatch.setenv("WORLD_SIZE", "1")
    code, _, err = run_cli("validate", str(tiny_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run")))
    assert_user_error(code, err, f"environment variable {name}", repr(value) if not value.isdigit() else
                      f"{value} is not below WORLD_SIZE 1")
