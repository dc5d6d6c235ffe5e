"""Every path gives the same numbers: for each task, full and LoRA, the finetune's test_metrics.json, `gptkit eval`
on the run (its test split, and the test file given with --data) and `gptkit eval` of the `export --merge` output.

Short runs (the models barely learn): the point is that one model scored three ways gives one figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from tasks_helpers import (classify3_rows, classify_rows, finetune_recipe, pretrained_base, qa_rows, splits,
                           summarize_rows, translate_rows)

CASES = {  # name: (task, row maker, recipe sections)
    "classify2": ("classify", classify_rows, {"data": {"columns": {"text": "sentence"}}}),
    "classify3": ("classify", classify3_rows, {}),
    "qa_extractive": ("qa", qa_rows, {"finetune": {"doc_stride": 16, "max_length": 32}}),
    "qa_generative": ("qa", qa_rows, {"finetune": {"qa_mode": "generative"}}),
    "translate": ("translate", translate_rows, {}),
    "summarize": ("summarize", summarize_rows, {"finetune": {"prompt": "{document} tldr"}}),
    "multitask": ("multitask", None, {}),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return pretrained_base(tmp_path_factory.mktemp("paths_base"))


def _recipe(tmp: Path, case: str, method: str, base: Path) -> tuple[Path, Path]:
    """(recipe, test file) of a short run: 24 steps, validated twice, so best/ is one of two checkpoints."""
    task, make, sections = CASES[case]
    train = {"max_steps": 24, "eval_every": 12, "save_every": 12, "batch_size": 8}
    finetune = {"method": method, "eval_examples": 12, "max_new_tokens": 6, "lora_r": 4,
                **sections.get("finetune", {})}
    if task != "multitask":
        s = splits(tmp, make, 48)
        return finetune_recipe(tmp, "run", task, base, s, data=sections.get("data", {}), train=train,
                               finetune=finetune), s["test"]
    import yaml

    parts = []
    for name, rows in (("translate", translate_rows), ("summarize", summarize_rows)):
        (tmp / name).mkdir()
        s = splits(tmp / name, rows, 48)
        parts.append({"task": name, "train_files": [str(s["train"])], "val_files": [str(s["validation"])],
                      "test_files": [str(s["test"])]})
    path = finetune_recipe(tmp, "run", "summarize", base, splits(tmp, summarize_rows, 8), train=train,
                           finetune={**finetune, "tasks": parts})
    recipe = yaml.safe_load(path.read_text())
    recipe["task"] = "multitask"
    recipe["data"] = {}
    path.write_text(yaml.safe_dump(recipe))
    return path, Path(parts[0]["test_files"][0])


def _eval(*args: str) -> dict:
    code, _, err = run_cli("eval", *args)
    assert code == 0, err
    out = next(a for a, b in zip(args[1:], args) if b == "--out")
    return json.loads((Path(out) / "metrics.json").read_text())["metrics"]


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("case", list(CASES))
def test_test_metrics_eval_and_merged_export_agree(tmp_path, base, case, method):
    recipe, test_file = _recipe(tmp_path, case, method, base)
    code, _, err = run_cli("finetune", str(recipe))
    assert code == 0, err
    run = tmp_path / "run"
    assert (run / "config.json").is_file() and (run / "best" / "config.json").is_file()
    assert (run / "adapter_config.json").is_file() == (method == "lora")
    scored = {k.removeprefix("test_"): v for k, v in json.loads((run / "test_metrics.json").read_text()).items()}

    on_split = _eval("--model", str(run), "--split", "test", "--out", str(tmp_path / "e1"))
    assert on_split == scored  # the same model, data and decoding: the same numbers, exactly

    task = CASES[case][0]
    if task != "multitask":  # the test file named directly (a multi-task run reads each task's own files)
        cols = ["--columns", "text=sentence"] if case == "classify2" else []
        on_file = _eval("--model", str(run), "--data", str(test_file), "--task", task, *cols,
                        "--out", str(tmp_path / "e2"))
        assert on_file == scored

    code, _, err = run_cli("export", str(run), "--merge", "--out", str(tmp_path / "merged"))
    assert code == 0, err
    merged = _eval("--model", str(tmp_path / "merged"), "--split", "test", "--out", str(tmp_path / "e3"))
    assert merged.keys() == scored.keys()
    for key, value in scored.items():  # merged weights differ from adapters-on-base by float rounding only
        assert merged[key] == pytest.approx(value, abs=1e-6 if task in ("classify", "qa") and
                                            case != "qa_generative" else 2.0), (key, merged, scored)

    if task == "classify":  # plain transformers loads the merged classifier with its label names
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"))
        labels = {"classify2": {"warm", "cold"}, "classify3": {"warm", "mild", "cold"}}[case]
        assert set(model.config.id2label.values()) == labels and model.config.pad_token_id is not None
