"""gptkit augment backtranslate: synthetic pairs from target-language text with a reverse model, batched and
resumable; a translate recipe mixes them with real pairs by weight and can tag them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from tasks_helpers import finetune_recipe, pretrained_base, splits, translate_rows, write_jsonl


@pytest.fixture(scope="module")
def reverse_run(tmp_path_factory):
    """A (barely trained) translate run in the reverse direction: target-language words -> source words."""
    tmp = tmp_path_factory.mktemp("reverse")
    base = pretrained_base(tmp)
    s = splits(tmp, lambda n, seed: [{"source": r["target"], "target": r["source"]} for r in translate_rows(n, seed)], 100)
    recipe = finetune_recipe(tmp, "rev", "translate", base, s, finetune={"eval_examples": 4, "max_new_tokens": 8},
                             train={"max_steps": 10, "eval_every": 10, "save_every": 10})
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    return tmp / "rev"


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_backtranslation_writes_pairs_and_resumes(tmp_path, reverse_run):
    mono = write_jsonl(tmp_path / "mono.jsonl", [{"target": r["target"]} for r in translate_rows(23, 5)])
    args = ["augment", "backtranslate", "--model", str(reverse_run), "--data", str(mono), "--batch-size", "8",
            "--max-new-tokens", "6"]
    code, out, err = run_cli(*args, "--out", str(tmp_path / "full.jsonl"))
    assert code == 0, err
    full = lines(tmp_path / "full.jsonl")
    assert [r["target"] for r in full] == [json.loads(x)["target"] for x in mono.read_text().splitlines()]
    assert all(r["synthetic"] is True and isinstance(r["source"], str) for r in full)
    # the same sentences through `gptkit eval` of the reverse run: the very same translations
    code, _, err = run_cli("eval", "--model", str(reverse_run), "--data", str(write_jsonl(
        tmp_path / "as_eval.jsonl", [{"source": r["target"], "target": ""} for r in full])), "--max-new-tokens", "6",
        "--out", str(tmp_path / "ev"))
    assert code == 0, err
    assert [p["prediction"] for p in lines(tmp_path / "ev" / "predictions.jsonl")] == [r["source"] for r in full]
    # interrupted after 2 batches and a torn line: --resume ends with the same file
    part = tmp_path / "part.jsonl"
    code, _, err = run_cli(*args, "--out", str(part), "--limit", "16")
    assert code == 0, err
    with open(part, "a") as fh:
        fh.write('{"source": "half a li')
    assert_user_error(*run_cli(*args, "--out", str(part))[::2], "--resume")  # never overwritten silently
    code, _, err = run_cli(*args, "--out", str(part), "--resume")
    assert code == 0, err
    assert part.read_text() == (tmp_path / "full.jsonl").read_text()
    # a line that is not a pair before the end (an edited file, a file of something else): refused, left untouched
    rows = part.read_text().splitlines(keepends=True)
    for name, text in (("edited.jsonl", "".join(rows[:4] + ["not json\n"] + rows[5:])), ("notes.txt", "my notes\n")):
        (tmp_path / name).write_text(text)
        assert_user_error(*run_cli(*args, "--out", str(tmp_path / name), "--resume")[::2], "is not a JSON pair")
        assert (tmp_path / name).read_text() == text
    assert_user_error(*run_cli(*args, "--out", str(tmp_path / "x.jsonl"), "--column", "text")[::2], "no field 'text'")


def test_sampled_batches_draw_their_own_samples_and_limit_reads_no_further(tmp_path, reverse_run):
    """16 copies of one sentence in batches of 8, sampled: the second batch is not the first one's draws again (every
    batch was seeded alike), and a resumed run samples as an uninterrupted one. --limit stops reading the file: a
    broken line past it is never met (the whole file was read, and held, before)."""
    sentence = translate_rows(1, 5)[0]["target"]
    mono = write_jsonl(tmp_path / "same.jsonl", [{"target": sentence}] * 16)
    with open(mono, "a") as fh:
        fh.write("not json\n")
    args = ["augment", "backtranslate", "--model", str(reverse_run), "--data", str(mono), "--batch-size", "8",
            "--max-new-tokens", "8", "--sample", "--temperature", "1.5", "--seed", "1", "--limit", "16"]
    code, _, err = run_cli(*args, "--out", str(tmp_path / "s.jsonl"))
    assert code == 0, err
    texts = [r["source"] for r in lines(tmp_path / "s.jsonl")]
    assert len(texts) >= 12 and len(set(texts)) > len(texts) // 2, texts  # not 8 draws twice over
    code, _, err = run_cli(*args[:-1], "8", "--out", str(tmp_path / "r.jsonl"))
    assert code == 0, err
    code, _, err = run_cli(*args, "--out", str(tmp_path / "r.jsonl"), "--resume")
    assert code == 0, err
    assert (tmp_path / "r.jsonl").read_text() == (tmp_path / "s.jsonl").read_text()
    code, _, err = run_cli(*args[:-2], "--out", str(tmp_path / "all.jsonl"))  # without --limit: line 17 is met
    assert_user_error(code, err, "line 17", "invalid JSON")


def test_real_and_synthetic_pairs_mix_by_weight_with_a_tag(tmp_path):
    from gptkit import finetune, tasks
    from gptkit.recipe import load_recipe

    real = write_jsonl(tmp_path / "real.jsonl", translate_rows(40, 1))
    synthetic = write_jsonl(tmp_path / "syn.jsonl", [{**r, "synthetic": True} for r in translate_rows(30, 2)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"task": "translate", "data": {"train_files": [str(real), str(synthetic)],
                                                                 "train_weights": [2, 0.5]},
                                  "finetune": {"synthetic_tag": "<BT>"}}))
    loaded = load_recipe(recipe)
    rows = finetune.splits(loaded, tasks.load("translate"))["train"]
    assert len(rows) == 2 * 40 + 15
    tagged = [r for r in rows if r.get("synthetic")]
    assert len(tagged) == 15 and all(r["source"].startswith("<BT> ") for r in tagged)
    assert not any(r["source"].startswith("<BT>") for r in rows if not r.get("synthetic"))
    # read on demand (index arrays, not a list of every row), in the order of: each file's rows `weight` times, then
    # a seeded sample of the fraction, in file order
    rng = np.random.default_rng([loaded.train.seed, 11])
    given = [[json.loads(line) for line in path.read_text().splitlines()] for path in (real, synthetic)]
    rng.permutation(40)
    want = given[0] * 2 + [{**given[1][i], "source": "<BT> " + given[1][i]["source"]}
                           for i in sorted(rng.permutation(30)[:15])]
    assert not isinstance(rows, list) and list(rows) == want
    assert rows[75:90] == want[75:90] and rows[-1] == want[-1] and rows[3::7] == want[3::7] and rows[95:] == []
    recipe.write_text(json.dumps({"task": "translate", "data": {"train_files": [str(real)], "train_weights": [1, 2]}}))
    with pytest.raises(Exception, match="one weight per entry"):
        load_recipe(recipe)


def test_bad_augment_input_is_one_line(tmp_path, reverse_run):
    mono = write_jsonl(tmp_path / "mono.jsonl", [{"target": r["target"]} for r in translate_rows(4, 5)])
    args = ["augment", "backtranslate", "--model", str(reverse_run), "--data", str(mono), "--max-new-tokens", "4"]
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"], ["--resume"]):
        code, _, err = run_cli(*args, "--out", str(folder), *extra)
        assert_user_error(code, err, "--out", "pairs", "is a directory")
    assert (folder / "keep.txt").read_text() == "mine"
    out = tmp_path / "x.jsonl"
    code, _, err = run_cli(*args, "--out", str(out), "--num-beams", "0")
    assert_user_error(code, err, "--num-beams", ">= 1", "got 0")
    code, _, err = run_cli(*args, "--out", str(out), "--column", "source")
    line = assert_user_error(code, err, "mono.jsonl", "no field 'source'", "--column", "'target'")
    assert "--columns" not in line  # eval's flag; augment names the field with --column
    code, _, err = run_cli(*args, "--out", str(folder / "keep.txt" / "x.jsonl"))
    assert_user_error(code, err, "--out", "keep.txt", "not a folder")
    code, _, err = run_cli(*args[:4], "--data", str(folder), "--out", str(out))
    assert_user_error(code, err, "--data", "pairs is a directory, not a file")
    assert not out.exists() and (folder / "keep.txt").read_text() == "mine"


def test_empty_back_translations_are_skipped_and_counted(tmp_path, reverse_run, monkeypatch):
    """A weak reverse model's empty (or blank) translations are not written: the summary counts them, --resume
    accounts for them, and when every one is empty nothing is written and the command fails with one line."""
    from gptkit import evaluate

    real = evaluate.predict_batch
    blank = {1, 2, 4}  # sentence indexes whose translation comes out empty or blank

    def weak(ctx, rows, start):
        return ["" if start + j in blank and j % 2 else "  " if start + j in blank else p
                for j, p in enumerate(real(ctx, rows, start))]

    monkeypatch.setattr(evaluate, "predict_batch", weak)
    mono = write_jsonl(tmp_path / "mono.jsonl", [{"target": r["target"]} for r in translate_rows(7, 5)])
    args = ["augment", "backtranslate", "--model", str(reverse_run), "--data", str(mono), "--batch-size", "3",
            "--max-new-tokens", "4"]
    code, out, err = run_cli(*args, "--out", str(tmp_path / "pairs.jsonl"))
    assert code == 0, err
    assert "wrote 4 synthetic pairs" in out and "skipped 3 of 7" in out, out
    rows = lines(tmp_path / "pairs.jsonl")
    targets = [json.loads(x)["target"] for x in mono.read_text().splitlines()]
    assert [r["target"] for r in rows] == [t for i, t in enumerate(targets) if i not in blank]
    assert all(r["source"].strip() for r in rows)
    # cut after two batches and a torn line: --resume continues past the skipped sentences to the same file
    part = tmp_path / "part.jsonl"
    part.write_text("".join((tmp_path / "pairs.jsonl").read_text().splitlines(keepends=True)[:3]) + '{"source": "to')
    code, out, err = run_cli(*args, "--out", str(part), "--resume")
    assert code == 0, err
    assert part.read_text() == (tmp_path / "pairs.jsonl").read_text() and "skipped 3 of 7" in out, out
    # all empty: one line, nothing written (an --overwrite target is left as it was)
    monkeypatch.setattr(evaluate, "predict_batch", lambda ctx, rows, start: [""] * len(rows))
    code, _, err = run_cli(*args, "--out", str(tmp_path / "none" / "x.jsonl"))
    assert_user_error(code, err, "--model", "all 7 back-translations", "empty", "nothing written")
    assert not (tmp_path / "none").exists()
    code, _, err = run_cli(*args, "--out", str(tmp_path / "pairs.jsonl"), "--overwrite")
    assert_user_error(code, err, "empty")
    assert [r["target"] for r in lines(tmp_path / "pairs.jsonl")] == [r["target"] for r in rows]


def test_out_that_is_the_data_file_is_refused(tmp_path, monkeypatch):
    """--out naming the --data file (as written, or by another path to it): --overwrite replaced the user's input."""
    mono = write_jsonl(tmp_path / "mono.jsonl", [{"target": r["target"]} for r in translate_rows(4, 5)])
    before = mono.read_bytes()
    monkeypatch.chdir(tmp_path)
    for out, extra in ((str(mono), ["--overwrite"]), ("./mono.jsonl", ["--overwrite"]), (str(mono), ["--resume"])):
        code, _, err = run_cli("augment", "backtranslate", "--model", str(tmp_path / "no-model"), "--data", str(mono),
                               "--out", out, *extra)
        assert_user_error(code, err, "--out", "mono.jsonl", "is the --data file")
        assert mono.read_bytes() == before
