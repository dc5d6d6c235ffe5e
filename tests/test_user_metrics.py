"""Metrics users bring as Hugging Face `evaluate` modules: `gptkit eval --metric` and finetune.extra_metrics score
them beside the built-ins, one can pick the best checkpoint, and a module that does not load is one error line."""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import assert_user_error, run_cli
from tasks_helpers import finetune_recipe, pretrained_base, read_test_metrics, splits, translate_rows, write_jsonl

LENGTH_RATIO = '''
import datasets
import evaluate


class LengthRatio(evaluate.Metric):
    """Characters predicted per reference character (a metric gptkit does not have)."""

    def _info(self):
        return evaluate.MetricInfo(description="length ratio", citation="", inputs_description="",
                                   features=datasets.Features({"predictions": datasets.Value("string"),
                                                               "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        return {"length_ratio": sum(map(len, predictions)) / max(1, sum(map(len, references))),
                "longer": sum(len(p) > len(r) for p, r in zip(predictions, references)), "note": "ignored"}
'''


@pytest.fixture
def length_ratio(tmp_path):
    path = tmp_path / "metrics" / "length_ratio.py"
    path.parent.mkdir()
    path.write_text(LENGTH_RATIO)
    return path


def test_eval_scores_a_local_evaluate_module_beside_the_builtins(tmp_path, length_ratio):
    refs = [{"source": f"s{i}", "target": "ein roter Hund" if i % 2 else "blau"} for i in range(6)]
    preds = [{"prediction": "ein Hund" if i % 2 else "blau blau"} for i in range(6)]
    rp, pp = write_jsonl(tmp_path / "refs.jsonl", refs), write_jsonl(tmp_path / "preds.jsonl", preds)
    code, out, err = run_cli("eval", "--task", "translate", "--predictions", str(pp), "--references", str(rp),
                             "--metric", str(length_ratio), "--out", str(tmp_path / "ev"))
    assert code == 0, err
    result = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    want = sum(len(p["prediction"]) for p in preds) / sum(len(r["target"]) for r in refs)
    assert result["metrics"]["length_ratio"] == pytest.approx(want) and result["metrics"]["length_ratio_longer"] == 3
    assert "bleu" in result["metrics"] and "length_ratio_note" not in result["metrics"]
    record = result["extra_metrics"][0]
    assert record["name"] == "length_ratio" and record["sha256"] == hashlib.sha256(LENGTH_RATIO.encode()).hexdigest()
    assert "length_ratio" in out  # the printed table


def test_a_module_named_like_a_builtin_figure_never_replaces_it(tmp_path):
    """A module called `accuracy` returning `accuracy` (another implementation, on a 0-1 scale) is scored beside
    the built-in figure as `accuracy_accuracy`; the built-in accuracy stays."""
    path = tmp_path / "metrics" / "accuracy.py"
    path.parent.mkdir()
    path.write_text(LENGTH_RATIO.replace("LengthRatio", "Accuracy").replace(
        '"length_ratio": sum(map(len, predictions)) / max(1, sum(map(len, references))),',
        '"accuracy": sum(p == r for p, r in zip(predictions, references)) / len(references),'))
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(4)])
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"prediction": p} for p in "abaa"])
    code, out, err = run_cli("eval", "--task", "classify", "--predictions", str(preds), "--references", str(refs),
                             "--metric", str(path), "--out", str(tmp_path / "ev"))
    assert code == 0, err
    figures = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    assert figures["accuracy"] == 75.0 and figures["accuracy_accuracy"] == 0.75 and figures["accuracy_longer"] == 0


def test_numpy_numbers_are_figures_and_other_values_are_logged(tmp_path, caplog):
    """Modules compute with numpy: np.float32, np.int64 and 0-d arrays are figures like Python numbers."""
    path = tmp_path / "metrics" / "npm.py"
    path.parent.mkdir()
    path.write_text(LENGTH_RATIO.replace("LengthRatio", "Npm").replace("import datasets", "import datasets\nimport numpy as np").replace(
        '"length_ratio": sum(map(len, predictions)) / max(1, sum(map(len, references))),',
        '"npm_f32": np.float32(0.5), "i64": np.int64(3), "arr": np.array(2.5), "flag": np.bool_(True),'))
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(4)])
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"prediction": p} for p in "abaa"])
    with caplog.at_level("INFO", logger="gptkit.user_metrics"):
        code, _, err = run_cli("eval", "--task", "classify", "--predictions", str(preds), "--references", str(refs),
                               "--metric", str(path), "--out", str(tmp_path / "ev"))
    assert code == 0, err
    figures = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    assert figures["npm_f32"] == 0.5 and figures["npm_i64"] == 3 and figures["npm_arr"] == 2.5
    assert figures["npm_longer"] == 0 and "npm_flag" not in figures and "npm_note" not in figures
    assert "'note' is not a number (str)" in caplog.text and "'flag' is not a number (bool)" in caplog.text


def test_finetune_scores_picks_by_and_reevaluates_a_user_metric(tmp_path, length_ratio):
    base = pretrained_base(tmp_path)
    recipe = finetune_recipe(tmp_path, "run", "translate", base, splits(tmp_path, translate_rows, 200),
                             finetune={"extra_metrics": [str(length_ratio)], "metric": "val_length_ratio",
                                       "metric_higher_is_better": False, "eval_examples": 10, "max_new_tokens": 8},
                             train={"max_steps": 20, "eval_every": 10, "save_every": 10})
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    run = tmp_path / "run"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ratios = {r["step"]: r["val_length_ratio"] for r in logged if "val_length_ratio" in r}
    assert sorted(ratios) == [10, 20]
    test = read_test_metrics(run)
    assert {"test_bleu", "test_length_ratio", "test_length_ratio_longer"} <= set(test)
    assert json.loads((run / "extra_metrics.json").read_text())[0]["name"] == "length_ratio"
    # eval of the run includes the run's own extra metrics, with the same figure as the run's test scores
    code, _, err = run_cli("eval", "--model", str(run), "--split", "test", "--out", str(tmp_path / "ev"))
    assert code == 0, err
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    assert again["length_ratio"] == pytest.approx(test["test_length_ratio"], abs=1e-9)


def test_a_module_that_does_not_load_or_compute_is_one_line(tmp_path, length_ratio):
    broken = tmp_path / "broken.py"
    broken.write_text("import evaluate\nclass Broken(evaluate.Metric):\n    def _info(self):\n        return 1 / 0\n")
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"source": "a", "target": "b"}])
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"prediction": "b"}])
    args = ["eval", "--task", "translate", "--predictions", str(preds), "--references", str(refs)]
    assert_user_error(*run_cli(*args, "--metric", str(broken))[::2], "--metric", "cannot load", "broken.py")
    assert_user_error(*run_cli(*args, "--metric", str(tmp_path / "nope.py"))[::2], "--metric", "not found")
    # a module whose features do not fit the task's references fails its check before any training
    base = pretrained_base(tmp_path)
    wrong = tmp_path / "ints.py"
    wrong.write_text(LENGTH_RATIO.replace('datasets.Value("string")', 'datasets.Value("int32")'))
    recipe = finetune_recipe(tmp_path, "bad", "translate", base, splits(tmp_path, translate_rows, 40),
                             finetune={"extra_metrics": [str(wrong)]})
    assert_user_error(*run_cli("finetune", str(recipe))[::2], "ints.py", "failed to compute")
    assert not (tmp_path / "bad").exists()
