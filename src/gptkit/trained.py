"""A trained model on disk: the one place that saves and loads them (runs, their best/, exports).

Every command that reads or writes a model calls down to this module: ``finetune`` and ``pretrain`` save
with :func:`save`; ``eval``, ``generate`` and ``export`` load with :func:`load_run` / :func:`load_lm`.

A folder written by :func:`save` always holds ``config.json`` with what fine-tuning set (the label map,
``num_labels``, ``pad_token_id``) and the tokenizer, whether the weights are full or LoRA adapters (peft
writes no config of its own): a LoRA folder is rebuilt as "base checkpoint with the saved config" +
adapters, so a classifier keeps its labels and its trained head (peft's ``modules_to_save``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptkit import modeling, rundir
from gptkit.errors import UserError
from gptkit.modeling import DROPOUT_FIELDS, TOKENIZER_FILES

ADAPTER_FILE = "adapter_config.json"


def has_head(task: str, recipe: Any) -> bool:
    """Whether a fine-tuned model of this task ends in a task head (labels, spans) rather than the LM head."""
    return task == "classify" or task == "qa" and recipe.finetune.qa_mode == "extractive"


def ensure_pad(tokenizer: Any, where: str = "the tokenizer") -> Any:
    """Batches need a pad token: the EOS token when the tokenizer has none (GPT-2's convention)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"{where}: the tokenizer has neither a pad nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_of(path: str | Path, field: str = "model.init_from", trust_remote_code: bool = False) -> Any:
    """The tokenizer saved next to a model, with a pad token."""
    from gptkit.tokenizer import load_local

    return ensure_pad(load_local(str(path), field, trust_remote_code), str(path))


def model_class(task: str, recipe: Any, config: Any):
    """The Auto class of a task's model: classify and extractive qa end in heads; the rest are language models
    (sequence-to-sequence when ``config`` is an encoder-decoder's)."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    if has_head(task, recipe):
        return AutoModelForSequenceClassification if task == "classify" else AutoModelForQuestionAnswering
    return modeling.lm_class(config)


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_FILE).is_file()


def save(model: Any, tokenizer: Any, out: Path, state_dict: dict | None = None) -> None:
    """Weights (full, or LoRA adapters with the heads they train), ``config.json`` and the tokenizer in ``out``;
    ``state_dict``: the weights gathered from a sharded model (see :func:`gptkit.engine.save_model`)."""
    out = Path(out)
    model.save_pretrained(str(out), state_dict=state_dict)
    if hasattr(model, "peft_config"):  # peft saves adapters only; the base's config carries labels and pad id
        model.get_base_model().config.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def _quantized_check(path: Path) -> None:
    """A folder written by ``gptkit quantize`` needs torchao to load: a one-line error when it is missing."""
    config = Path(path) / "config.json"
    if config.is_file() and '"quantization_config"' in config.read_text():
        from gptkit.quantize import import_torchao

        import_torchao()


def load_model(path: Path, task: str, recipe: Any):
    """A model folder written by :func:`save` for ``task``: full weights, or LoRA adapters on the recipe's base
    (``model.init_from``) built with the folder's own config."""
    from transformers import AutoConfig

    modeling.quiet_loading()
    path = Path(path)
    _quantized_check(path)
    trust = recipe.model.trust_remote_code
    if (path / "config.json").is_file():
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust)
    else:  # adapters saved before runs kept their config
        config = modeling.base_config(recipe.model.init_from or "", "model.init_from", trust)
    cls = model_class(task, recipe, config)
    if not is_adapter_dir(path):
        return cls.from_pretrained(str(path), trust_remote_code=trust)
    from peft import PeftModel

    kwargs = {**modeling.load_kwargs(recipe.model), "attn_implementation": None}
    for field in DROPOUT_FIELDS:  # with config= given, config fields go on the config (as kwargs they reach __init__)
        if field in kwargs:
            setattr(config, field, kwargs.pop(field))
    base = cls.from_pretrained(modeling.model_dir(_pinned_base(path, recipe), "model.init_from"), config=config,
                               **kwargs)
    return PeftModel.from_pretrained(base, str(path))


def _pinned_base(path: Path, recipe: Any) -> str:
    """The base a LoRA folder was trained on: model.init_from, pinned to the commit run.json recorded when it is
    a hub id (the cache's main may have moved since)."""
    name = recipe.model.init_from or ""
    for home in (path, path.parent):
        record = home / rundir.RUN_FILE
        if record.is_file() and "@" not in name:
            import json

            source = json.loads(record.read_text()).get("sources", {}).get("model.init_from", {})
            if source.get("hub_id") == name and source.get("commit"):
                return f"{name}@{source['commit']}"
    return name


def load_run(directory: Path, home: Path, run: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a fine-tuning run (``home``, or its ``best/`` as ``directory``) with its task's
    model class, in eval mode; LoRA adapters go on the base checkpoint its recipe names."""
    if not any((home / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{home}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(home, local_files_only=True)
        model = load_model(directory, run.task, run)
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: adapters of another base (size mismatch)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{directory}: cannot load (base model.init_from {run.model.init_from}): {first_line}") from exc
    return model.eval(), ensure_pad(tokenizer, str(home))


def load_lm(path: str | Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a language model in a local folder (a run, its best/, or any ``save_pretrained``
    directory), in eval mode. Never downloads: a hub name is a :class:`UserError`. Task-head runs are refused."""
    from transformers import AutoConfig, AutoTokenizer

    from gptkit import hub

    modeling.quiet_loading()
    directory = hub.resolve(str(path), "model", weights=True).path
    run, home = rundir.run_of(directory)
    if run is not None and has_head(run.task, run):
        raise UserError(f"{directory}: a {run.task} run has a task head ({'labels' if run.task == 'classify' else 'spans'}), "
                        "not a language model; use gptkit eval on it")
    if run is not None and is_adapter_dir(directory):
        return load_run(directory, home, run)
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory}: no config.json; expected a model directory written by save_pretrained")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"{directory}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer next to the model"
        )
    _quantized_check(directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        model = modeling.lm_class(config).from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{directory}: cannot load model/tokenizer: {first_line}") from exc
    return model.eval(), ensure_pad(tokenizer, str(directory))


def load_any(raw: str, field: str = "--model") -> tuple[Any, Any, Any]:
    """``(model, tokenizer, run recipe or None)`` of what a command names: a fine-tuning run (LoRA too, with its
    task's head), its best/, or any local or cached hub model directory (causal, or sequence-to-sequence when its
    config is an encoder-decoder), in eval mode, on the GPU when there is one. ``gptkit eval`` and ``gptkit serve``
    load through here."""
    import torch

    from gptkit import hub
    from gptkit.tasks import FINETUNE_TASKS

    path = hub.resolve(raw, field, weights=True).path
    run, home = rundir.run_of(path)
    if run is None or run.task not in FINETUNE_TASKS:
        model, tok = load_lm(path)
    else:
        model, tok = load_run(path, home, run)
    return model.to("cuda") if torch.cuda.is_available() else model, tok, run


def export(run_dir: Path, out: Path) -> Path:
    """A standalone copy of a fine-tuning run's model in ``out``: LoRA adapters merged into their base (heads
    included), full weights as they are; with the run's recipe (method: full), so `gptkit eval` scores it with
    the same prompt and settings, and configs that plain transformers loads (label names included)."""
    from gptkit.recipe import load_recipe

    run_dir = Path(run_dir)
    if not (run_dir / rundir.RECIPE_FILE).is_file() or not (run_dir / "config.json").is_file() and \
            not is_adapter_dir(run_dir):
        raise UserError(f"{run_dir}: not a gptkit fine-tuning run (no {rundir.RECIPE_FILE} and model)")
    recipe = load_recipe(run_dir / rundir.RECIPE_FILE)
    if recipe.task == "pretrain":
        raise UserError(f"{run_dir}: a pretraining run is already a standalone checkpoint; nothing to export")
    rundir.check_out_folder(out)
    model = load_model(run_dir, recipe.task, recipe)
    if is_adapter_dir(run_dir):
        model = model.merge_and_unload()
    save(model, tokenizer_of(run_dir, "export"), out)
    write_recipe(recipe, out)
    return out


def write_recipe(recipe: Any, out: Path) -> None:
    """A fine-tuning run's recipe beside a standalone copy of its model (exported, quantized, pruned), as a full
    fine-tune: `gptkit eval` and `serve` then use its prompt, decoding and splits. Pretraining needs none."""
    from gptkit.recipe import recipe_to_yaml

    if recipe is None or recipe.task == "pretrain":
        return
    standalone = recipe.model_copy(update={"finetune": recipe.finetune.model_copy(update={"method": "full"})})
    (Path(out) / rundir.RECIPE_FILE).write_text(recipe_to_yaml(standalone))
