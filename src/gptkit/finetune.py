"""`gptkit finetune`: adapt a local checkpoint to a task (classify, qa, translate, summarize), full or LoRA.

The runner owns what every task shares — splits and column mapping, the tokenizer, LoRA, the call to
the one training loop (:func:`gptkit.engine.fit`), the best checkpoint, test scores and saving — and asks
the task module (:mod:`gptkit.tasks`) only to build the model, tokenize, compute the loss, predict and score.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from gptkit import data as data_mod
from gptkit import modeling, rundir, tasks, tracking, trained
from gptkit.errors import UserError
from gptkit.recipe import Recipe

log = logging.getLogger(__name__)

SEQ2SEQ_TASKS = ("translate", "summarize", "multitask")  # tasks an encoder-decoder base can be fine-tuned for
_SPLITS = (("train", "data.train_files"), ("validation", "data.val_files"), ("test", "data.test_files"))  # (split, field)


def splits(recipe: Recipe, task) -> dict[str, Sequence[dict]]:
    """Rows per split ("train", "validation", "test"), read on demand from the files' Arrow tables
    (:class:`gptkit.data.TableRows`); a task may load its own (multitask)."""
    if hasattr(task, "load_splits"):
        return task.load_splits(recipe)
    files = {"train": recipe.data.train_files, "validation": recipe.data.val_files, "test": recipe.data.test_files}
    out = {split: _load_rows(recipe, task, files[split], field)
           for split, field in _SPLITS if files[split] and not (split == "train" and recipe.data.train_weights)}
    if recipe.data.train_weights:  # each entry's rows repeated / subsampled by its weight (seeded)
        import numpy as np

        rng, parts = np.random.default_rng([recipe.train.seed, 11]), []
        for pattern, weight in zip(files["train"], recipe.data.train_weights):
            part = _load_rows(recipe, task, [pattern], "data.train_files")
            whole, frac = int(weight), weight - int(weight)
            sample = np.sort(rng.permutation(len(part))[: round(frac * len(part))])
            parts.append((part, np.concatenate([np.tile(np.arange(len(part)), whole), sample])))
        out = {"train": data_mod.Joined(parts), **out}
    tag = recipe.finetune.synthetic_tag
    if tag and "train" in out:  # applied as rows are read
        def tagged(row, _):
            return {**row, "source": f"{tag} {row['source']}"} if row.get("synthetic") is True else row

        out["train"] = data_mod.Joined([(out["train"], None)], tagged)
    return out


def _load_rows(recipe: Recipe, task, files: list[str], field: str):
    """A split's rows (:func:`gptkit.data.load_rows`) whose text fields hold text (:func:`gptkit.data.check_texts`)."""
    rows = data_mod.load_rows(files, field, task.FIELDS, task.OPTIONAL, recipe.data.columns)
    data_mod.check_texts(rows, files, field, task.TEXTS)
    return rows


def _eval_subset(rows: list[dict], n: int | None) -> list[dict]:
    """The first n validation rows, or of multi-task rows the first n of each task."""
    if not n:
        return rows
    if not len(rows) or "_sub" not in rows[0]:  # one task: no need to read the rest
        return rows[:n]
    taken: dict[int, int] = {}
    out = []
    for r in rows:
        k = r.get("_sub", 0)
        if taken.get(k, 0) < n:
            taken[k] = taken.get(k, 0) + 1
            out.append(r)
    return out


def check(recipe: Recipe, task_name: str) -> None:
    """Read-only checks: base checkpoint and tokenizer, every split's files and columns."""
    if not recipe.model.init_from:
        raise UserError("model.init_from: finetune needs a base checkpoint: a local directory (e.g. a gptkit pretrain "
                        "run) or a Hugging Face hub id")
    base = modeling.model_dir(recipe.model.init_from, "model.init_from")
    if not any((base / f).is_file() for f in modeling.TOKENIZER_FILES):
        raise UserError(f"model.init_from: {base} has no tokenizer files; save the tokenizer next to the model")
    if not recipe.data.train_files and task_name != "multitask":
        raise UserError("data.train_files: empty; finetune needs a training split")
    _check_seq2seq(recipe, task_name)
    _check_answer_room(recipe, task_name)
    if not recipe.finetune.extra_metrics:  # their figures' names are known only once computed
        _check_metric(recipe, task_name)
    rundir.resolve_output(recipe.output.dir)


def _check_seq2seq(recipe: Recipe, task_name: str) -> None:
    """An encoder-decoder base trains translate and summarize (alone or mixed); the other tasks need a decoder."""
    config = modeling.base_config(recipe.model.init_from or "", trust_remote_code=recipe.model.trust_remote_code)
    if not modeling.is_encoder_decoder(config):
        return
    subs = [s.task for s in recipe.finetune.tasks] if task_name == "multitask" else []
    bad = task_name if task_name not in SEQ2SEQ_TASKS else next((t for t in subs if t not in SEQ2SEQ_TASKS), None)
    if bad:
        raise UserError(f"model.init_from: {recipe.model.init_from} is an encoder-decoder ({config.model_type}); "
                        f"task {bad} needs a decoder-only base (encoder-decoder bases train translate and summarize)")


def _check_answer_room(recipe: Recipe, task_name: str) -> None:
    """A task that generates its answers needs finetune.max_new_tokens within the base's positions (found at the
    first validation otherwise: after training up to it, with nothing saved)."""
    subs = {s.task for s in recipe.finetune.tasks} if task_name == "multitask" else {task_name}
    extractive = recipe.finetune.qa_mode == "extractive"
    if not subs & {"translate", "summarize"} and not ("qa" in subs and not extractive):
        return
    config = modeling.base_config(recipe.model.init_from or "", trust_remote_code=recipe.model.trust_remote_code)
    positions = modeling.max_positions(config)
    if positions is not None and recipe.finetune.max_new_tokens >= positions:
        raise UserError(f"finetune.max_new_tokens: {recipe.finetune.max_new_tokens} must be < the base's context of "
                        f"{positions} tokens (prompt and answer share it)")


def check_rows(recipe: Recipe, task_name: str, rows: dict) -> None:
    """What the training rows must allow, checked in `gptkit validate` and before anything is tokenized: each prompt
    template rendered on its task's first training row (a stray brace or a field the rows lack is one line, not a
    traceback mid-way); a classifier's training split has at least two labels, and the other splits none besides."""
    from gptkit.tasks import classify, multitask
    from gptkit.tasks import generative as gen

    if task_name == "classify" and "train" in rows:
        seen = set(classify.labels_of(recipe, rows["train"]))
        for split in ("validation", "test"):  # the head has an output per training label, and no other
            unseen = [label for label in classify.label_names(rows.get(split, [])) if label not in seen]
            if unseen:
                raise UserError(f"data: {split} split has labels never seen in training: {unseen[:5]} (training "
                                f"labels: {sorted(seen)[:10]})")
    elif task_name == "multitask":
        for i, sub in enumerate(recipe.finetune.tasks):
            module, train = tasks.load(sub.task), multitask._of_task(rows.get("train", []), i)
            if len(train):
                gen.render(sub.prompt or module.PROMPT, train[0], f"finetune.tasks[{i}].prompt")
    elif task_name in ("translate", "summarize") or (task_name == "qa" and recipe.finetune.qa_mode == "generative"):
        if len(rows.get("train", [])):
            gen.render(recipe.finetune.prompt or tasks.load(task_name).PROMPT, rows["train"][0])


def describe(recipe: Recipe, task_name: str) -> list[str]:
    """What `gptkit validate` reports for a fine-tuning recipe: base model size and rows per split."""
    task = tasks.load(task_name)
    check(recipe, task_name)
    rows = splits(recipe, task)
    check_rows(recipe, task_name, rows)
    if task_name == "qa":  # (fine-tuning checks them as it tokenizes each split)
        for split, part in rows.items():
            task.check_answers(part, split, recipe.finetune.no_answer)
    counts = [f"{split} {len(r)}" for split, r in rows.items()]
    windowed = task_name == "qa" and recipe.finetune.qa_mode == "extractive"  # trains on >= 1 window per row
    if "train" in rows and not windowed:  # one process; launched on more, the run itself checks again
        from gptkit.engine import check_batch

        check_batch(recipe.train, len(rows["train"]), 1)
    config = modeling.base_config(recipe.model.init_from or "", trust_remote_code=recipe.model.trust_remote_code)
    n = modeling.meta_param_count(config)
    f, method = recipe.finetune, recipe.finetune.method
    import torch

    with torch.device("meta"):
        meta = modeling.lm_class(config).from_config(config)
    targets = f.lora_targets or lora_targets(meta)
    if method == "lora":
        method += f" (r {f.lora_r}, alpha {f.lora_alpha}, lr {recipe.train.lr:g}, on {', '.join(targets)})"
    return [f"inputs: rows per split: {', '.join(counts)} (columns found)",
            f"base model: {modeling.describe_arch(config)}, {n:,} parameters, from {recipe.model.init_from}",
            f"method: {method}; best checkpoint by {f.metric or task.METRIC}; loss averaged per {f.loss}",
            _memory_line(recipe, meta, n, targets)]


def _memory_line(recipe: Recipe, meta, n: int, targets: list[str]) -> str:
    """Training memory per process for full fine-tuning, LoRA, and full fine-tuning sharded over 8 processes
    (FSDP full shard / ZeRO-3): weights, gradients and AdamW moments, plus the activations of one micro-batch
    of train.batch_size x finetune.max_length tokens (16-bit under bf16/fp16 precision)."""
    from torch import nn

    width = {"float32": 4, "auto": 4, "bfloat16": 2, "float16": 2}[recipe.model.dtype]
    adapters = sum(recipe.finetune.lora_r * sum(m.weight.shape) for name, m in meta.named_modules()
                   if name.rsplit(".", 1)[-1] in targets and isinstance(getattr(m, "weight", None), nn.Parameter))
    full = n * (width + width + 8)  # weights and gradients in model.dtype, two fp32 AdamW moments
    lora = n * width + adapters * 16  # frozen base; adapters: fp32 weights, gradients and moments
    t = recipe.train
    act_width = 2 if t.precision in ("bf16", "fp16") or width == 2 else 4
    acts = modeling.activation_bytes(meta.config, t.batch_size, recipe.finetune.max_length, act_width,
                                     t.gradient_checkpointing)
    gib = 2**30
    return (f"training memory per process (model.dtype {recipe.model.dtype}; activations of {t.batch_size} x "
            f"{recipe.finetune.max_length} tokens {acts / gib:.2f} GiB included"
            f"{', gradient checkpointing' if t.gradient_checkpointing else ''}): full {(full + acts) / gib:.2f} GiB, "
            f"LoRA {(lora + acts) / gib:.2f} GiB ({adapters:,} adapter parameters), full sharded over 8 processes "
            f"{(full / 8 + acts) / gib:.2f} GiB")


_HEADS = ("lm_head", "score", "classifier", "qa_outputs")  # output layers: trained whole (task heads) or kept


def lora_targets(model) -> list[str]:
    """Every linear layer of the blocks (peft's "all-linear", resolved here so that a task head is never
    adapted as well as trained): what QLoRA found necessary to match full fine-tuning. GPT-2's Conv1D counts."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (nn.Linear, Conv1D)) and name.rsplit(".", 1)[-1] not in _HEADS})


def _lora(recipe: Recipe, model, task_name: str):
    """LoRA adapters on ``finetune.lora_targets`` (default: every linear layer of the blocks); a task head
    (classification ``score``, span ``qa_outputs``) is trained whole and saved with the adapters (peft's
    ``modules_to_save`` for its SEQ_CLS and QUESTION_ANS task types)."""
    from peft import LoraConfig, TaskType, get_peft_model

    f = recipe.finetune
    kind = {"classify": TaskType.SEQ_CLS, "qa": TaskType.QUESTION_ANS if f.qa_mode == "extractive" else None}
    lm = TaskType.SEQ_2_SEQ_LM if modeling.is_encoder_decoder(model.config) else TaskType.CAUSAL_LM
    from transformers.pytorch_utils import Conv1D

    conv1d = any(isinstance(m, Conv1D) for m in model.modules())  # GPT-2 stores its linear layers transposed
    cfg = LoraConfig(r=f.lora_r, lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout, fan_in_fan_out=conv1d,
                     target_modules=f.lora_targets or lora_targets(model), task_type=kind.get(task_name) or lm)
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = {n: "output layer" if m is emb else "input embedding" for n, m in model.named_modules()
            if out is not None and out.weight is emb.weight and (m is emb or m is out)}
    try:
        peft_model = get_peft_model(model, cfg)
    except ValueError as e:
        raise UserError(f"finetune.lora_targets: {str(e).splitlines()[0]}") from None
    from peft.tuners.lora import LoraLayer

    adapted = [n for n in tied if isinstance(peft_model.base_model.model.get_submodule(n), LoraLayer)]
    if adapted:  # one adapter on one use of a shared weight: merged, it would change the other use too
        raise UserError(f"finetune.lora_targets: '{adapted[0]}' shares its weight with the {tied[adapted[0]]} "
                        "(tied embeddings), so its adapter cannot be merged; leave it out of lora_targets")
    return peft_model


def run(recipe: Recipe, task_name: str, *, resume: bool = False, overwrite: bool = False, force: bool = False,
        command: list[str] | None = None) -> dict:
    """Fine-tune, keep the best checkpoint by the task's metric, score the test split, save."""
    from accelerate.utils import set_seed

    from gptkit import engine

    modeling.quiet_loading()
    task = tasks.load(task_name)
    recipe = recipe.model_copy(update={"task": task_name})
    check(recipe, task_name)
    run_dir = rundir.resolve_output(recipe.output.dir)
    rundir.check(run_dir, recipe, resume=resume, overwrite=overwrite, force=force)
    rows = splits(recipe, task)
    check_rows(recipe, task_name, rows)
    tokenizer = trained.tokenizer_of(recipe.model.init_from or "", "model.init_from", recipe.model.trust_remote_code)
    accelerator = engine.make_accelerator(recipe.train, recipe.distributed)
    set_seed(recipe.train.seed)
    model = task.build_model(recipe, tokenizer, rows["train"])
    prepared = {split: data_mod.cached_examples(recipe, tokenizer, model, split,
                                                partial(task.preprocess, recipe, tokenizer, rows[split], split, model))
                for split in ("train", "validation", "test") if split in rows}  # test: checked now, not after training
    train, val = prepared["train"], prepared.get("validation")
    if recipe.finetune.method == "lora":
        model = _lora(recipe, model, task_name)
    modeling.trainable_precision(model, recipe.finetune.method)
    val_rows = _eval_subset(rows.get("validation", []), recipe.finetune.eval_examples)
    extra = _extra_metrics(recipe, task_name, val_rows or rows["train"])
    evaluate = _sharded_scoring(task, tokenizer, val_rows, recipe, accelerator, extra) if val_rows else None
    n_params = sum(p.numel() for p in model.parameters())
    engine.check_batch(recipe.train, len(train), accelerator.num_processes)
    rundir.check_disk_space(run_dir, n_params, recipe.train.keep_last)
    per = recipe.finetune.loss  # validation loss (and perplexity) is per token whatever training averages
    loss_fn = partial(task.loss, per=per, smoothing=recipe.train.label_smoothing)
    if recipe.distill.teacher:
        from gptkit import distill
        from gptkit.tasks import generative as gen

        teacher = distill.load_teacher(recipe.model_copy(update={"task": task_name}), tokenizer, accelerator.device)
        loss_fn = distill.loss_fn(gen.where, teacher, recipe.distill.temperature, recipe.distill.alpha,
                                  partial(gen.weights, per=per), recipe.train.label_smoothing)
    fresh = accelerator.is_main_process and not resume
    with rundir.new_run(run_dir, recipe, overwrite=overwrite, command=command or [], make=fresh):
        if accelerator.is_main_process and extra:  # where the extra figures come from
            (run_dir / "extra_metrics.json").write_text(json.dumps([m.record() for m in extra], indent=1))
        accelerator.wait_for_everyone()
        job = engine.Job(model=model, train_data=train, val_data=val, cfg=recipe.train, run_dir=run_dir, resume=resume,
                         loss_fn=loss_fn, count_fn=partial(task.count, per=per),
                         eval_loss_fn=task.loss, eval_count_fn=task.count, evaluate=evaluate,
                         select=(recipe.finetune.metric or task.METRIC) if evaluate else None,
                         select_higher=recipe.finetune.metric_higher_is_better,
                         perplexity=not trained.has_head(task_name, recipe),  # a head's loss is no perplexity
                         patience=recipe.finetune.patience, distributed=recipe.distributed,
                         save=lambda m, path, state=None: trained.save(m, tokenizer, path, state),
                         on_resumed=partial(rundir.resumed, run_dir, recipe, command or []),
                         on_saved=partial(rundir.started, run_dir))
        result = engine.fit(job, accelerator)
    best_step, best_metrics = result.pop("best_step", None), result.pop("best_metrics", {})
    model = _keep_best(recipe, task_name, run_dir, tokenizer, model, accelerator, job.save)
    if best_step is not None and (run_dir / "best").is_dir():  # the run's model is the best step's: its figures
        result = {**{k: v for k, v in result.items() if not k.startswith("val_")}, **best_metrics,
                  "best_step": best_step}
    if accelerator.is_main_process:
        tracking.plot(run_dir)
    if accelerator.is_main_process and "test" in rows:
        result.update(_score_test(recipe, task, run_dir, tokenizer, rows["test"], model, extra))
    accelerator.wait_for_everyone()
    return result


def _extra_metrics(recipe: Recipe, task_name: str, rows: list[dict]) -> list:
    """finetune.extra_metrics loaded and checked on a few of the task's references (before any training)."""
    from gptkit import user_metrics
    from gptkit.eval_report import reference_of

    sources = recipe.finetune.extra_metrics
    if not sources:
        return []
    if task_name == "multitask":
        raise UserError("finetune.extra_metrics: not available for multitask runs (each task scores its own figures)")
    refs = [reference_of(task_name, r, "finetune.extra_metrics") for r in rows[:2]]
    return user_metrics.load(sources, "finetune.extra_metrics", refs)


def _scores(task, rows: list[dict], preds: list, recipe: Recipe, extra: list) -> dict[str, float]:
    """The task's figures and the user's evaluate modules' on the same predictions."""
    from gptkit import user_metrics
    from gptkit.eval_report import reference_of

    scores = task.score(preds, rows, recipe)
    if extra:
        refs = [reference_of(recipe.task, r, "references") for r in rows]
        scores.update(user_metrics.compute(extra, preds, refs, taken=set(scores)))
    return scores


def _check_metric(recipe: Recipe, task_name: str) -> None:
    """finetune.metric names a figure validation logs: checked before training (a typo surfaced only at the first
    validation, after the run folder was made). Per-class classify figures depend on the labels seen, so pass."""
    from gptkit.metrics import SQUAD_V2_METRICS, TASK_METRICS
    from gptkit.tasks import multitask

    name = recipe.finetune.metric
    if not name:
        return

    def of(kind: str) -> tuple:
        return TASK_METRICS[kind] + (SQUAD_V2_METRICS if kind == "qa" and recipe.finetune.no_answer else ())

    if task_name == "multitask":
        subs = [s.task for s in recipe.finetune.tasks]
        names = {"score"} | {f"{n}_{m}" for n, kind in zip(multitask._names(recipe), subs) for m in of(kind)}
    else:
        names = set(of(task_name))
    lm = {"val_perplexity"} if not trained.has_head(task_name, recipe) else set()  # a head's loss is no perplexity
    known = {"val_loss"} | lm | {f"val_{m}" for m in names}
    per_class = task_name == "classify" and name.startswith(("val_precision_", "val_recall_", "val_f1_"))
    if name not in known and not per_class:
        raise UserError(f"finetune.metric: '{name}' is not a validation metric of {task_name}; expected one of "
                        f"{', '.join(sorted(known))}")


def _sharded_scoring(task, tokenizer, rows: list[dict], recipe: Recipe, accelerator, extra: list = ()):
    """Validation metrics with the prediction split across processes (rank r predicts rows r, r+world, ...);
    every rank gathers all predictions in order and scores them (the engine then takes the main process's
    figures, so every rank makes the same best-checkpoint and early-stopping decisions)."""
    from accelerate.utils import gather_object

    from gptkit import distributed

    rank, world = accelerator.process_index, accelerator.num_processes
    if distributed.lockstep(recipe.distributed, accelerator):  # sharded weights: every rank predicts every row
        rank, world = 0, 1

    def evaluate(model) -> dict[str, float]:
        mine = list(range(rank, len(rows), world))
        preds = task.predict(model, tokenizer, rows if world == 1 else [rows[i] for i in mine], recipe)
        pairs = list(zip(mine, preds))
        if world > 1:
            pairs = gather_object(pairs)
        ordered = [p for _, p in sorted(pairs, key=lambda ip: ip[0])]
        return _scores(task, rows, ordered, recipe, list(extra))

    return evaluate


def _keep_best(recipe: Recipe, task_name: str, run_dir: Path, tokenizer, model, accelerator, save):
    """Every process calls it: the run's model is the best checkpoint by finetune.metric when validation kept one
    (as the Trainer's load_best_model_at_end), else the final weights (gathered when sharded); saved in the run
    directory, and returned on the main process (None elsewhere), unsharded, for scoring the test split."""
    from gptkit import distributed, engine

    best = run_dir / "best"
    sharded = distributed.is_sharded(model)
    if not best.is_dir():
        engine.save_model(accelerator, model, run_dir, save)
    if not accelerator.is_main_process:
        return None
    model = accelerator.unwrap_model(model)
    device = accelerator.device
    if best.is_dir():  # reloaded where training ran (on the CPU, test scoring once took minutes on a GPU machine)
        if not sharded:
            model.to("cpu")  # one model on the accelerator at a time
        model = trained.load_model(best, task_name, recipe).to(device)
        trained.save(model, tokenizer, run_dir)
    elif sharded:
        model = trained.load_model(run_dir, task_name, recipe).to(device)
    return model


def _score_test(recipe, task, run_dir: Path, tokenizer, rows, model, extra: list = ()) -> dict:
    """Scores of the run's model on the test split, written to test_metrics.json."""
    from gptkit.engine import own_forward

    model.eval()
    with own_forward(model):
        preds = task.predict(model, tokenizer, rows, recipe)
        scores = {f"test_{k}": v for k, v in _scores(task, rows, preds, recipe, list(extra)).items()}
    (run_dir / "test_metrics.json").write_text(json.dumps(scores, indent=1))
    log.info("test: %s", ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    return scores
