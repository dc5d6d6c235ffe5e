"""`gptkit eval`: score a model, or existing predictions, on a task; write metrics, predictions and a report.

Ways in: ``--predictions P --references R`` (no model); ``--model DIR`` with ``--data FILE`` (or, for a gptkit run,
its recipe's split); a recipe: its ``output.dir`` run (``best/`` when kept, as finetune's test scores), else its
``model.init_from``, on ``data.test_files``, else ``data.val_files``. ``--task lm``: sliding-window perplexity.
Predictions are appended to ``predictions.jsonl`` and flushed batch by batch, so ``--resume`` continues after the
last one written. ``eval.json``, written first, says what an output folder evaluates.

This module decides what runs: options, model, data and recipe, predictions batch by batch, perplexity. Reading
files, scoring and the output folder's files (eval.json, predictions.jsonl, metrics.json, report.md, the printed
table) are :mod:`gptkit.eval_report`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from gptkit import metrics, rundir, user_metrics
from gptkit.errors import UserError
from gptkit.recipe import column_fields_check
from gptkit.modeling import TOKENIZER_FILES, is_encoder_decoder
from gptkit.eval_report import (INPUTS, REFERENCE, append, file_hashes, finish, pair, parse_columns, prepare_out,
                                iter_fields, read_fields, read_text, reference_of, sha256, write_outputs)
from gptkit.eval_report import table  # noqa: F401  (cli prints evaluate.table(result))

if TYPE_CHECKING:
    from gptkit.generation import DecodingOptions

log = logging.getLogger(__name__)

TASKS = ("translate", "summarize", "qa", "classify", "lm")
CLASSIFY_PROMPT = "{text}\nLabel:"  # classify with a causal LM: which " <label>" is likeliest after it
CLASSIFY_PAIR_PROMPT = "{text}\n{text_pair}\nLabel:"  # ... when the rows have a second text (MRPC-style pairs)


@dataclass
class Options:
    task: str | None = None
    model: str | None = None
    data: str | None = None
    split: str | None = None
    predictions: str | None = None
    references: str | None = None
    out: str | None = None
    batch_size: int = 16
    num_beams: int | None = None
    max_new_tokens: int | None = None
    sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    limit: int | None = None
    columns: list[str] = field(default_factory=list)
    stride: int | None = None
    resume: bool = False
    bootstrap: int = 0
    few_shot: int = 0
    train: str | None = None
    seed: int = 0
    rouge_tokenizer: str | None = None  # None: the run's finetune.rouge_tokenizer, else rouge_score's default
    metrics: list[str] = field(default_factory=list)  # evaluate modules scored beside the built-ins (--metric)


def _decoding_flags(opts: Options) -> list[str]:
    """The decoding options given on the command line, as flags."""
    names = ("max_new_tokens", "num_beams", "temperature", "top_k", "top_p", "repetition_penalty")
    return [f"--{k.replace('_', '-')}" for k in names if getattr(opts, k) is not None] + (["--sample"] if opts.sample
                                                                                        else [])


def _no_decoding(opts: Options, what: str) -> None:
    """Decoding options where no text is generated are refused, not ignored (the figure would not be what they
    asked for, nor change with them)."""
    flags = _decoding_flags(opts)
    if flags:
        raise UserError(f"{flags[0]}: {what} generates no text; decoding options do not apply (drop "
                        f"{', '.join(flags)})")


# ------------------------------------------------------------------------------------------- models
def load_model(raw: str, task: str):
    """(model, tokenizer, run recipe or None) for scoring ``task`` (:func:`gptkit.trained.load_any`); a run whose
    head belongs to another task is refused."""
    from gptkit import trained

    model, tok, run = trained.load_any(raw, "--model")
    if run is not None and run.task != task and trained.has_head(run.task, run):
        raise UserError(f"--model: {raw} has a {run.task} head (fine-tuned for {run.task}); it cannot do {task}")
    return model, tok, run


def fingerprint(path: Path) -> dict:
    """sha256 of what defines a model: weights, configs and tokenizer files (not logs, runs or eval outputs)."""
    files = {p.name: sha256(p) for p in sorted(Path(path).iterdir()) if p.is_file() and
             (p.suffix in (".safetensors", ".bin", ".model", ".txt") or p.name in TOKENIZER_FILES or
              p.name.endswith(("config.json", "special_tokens_map.json")))}
    return {"path": str(path), "sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest(), "files": files}


@dataclass
class Ctx:
    task: str
    model: object
    tok: object
    recipe: object
    template: str
    decoding: DecodingOptions  # gptkit.generation is imported where a model is loaded (it pulls in torch)
    labels: list[str] | None  # classify with a causal LM: the labels whose likelihood is compared
    shots: list[dict]
    few_shot: int
    seed: int


def prompt(ctx: Ctx, row: dict, index: int | None = None) -> str:
    """The task prompt, after K demonstrations drawn by a generator seeded with (seed, example index)."""
    from gptkit.tasks.generative import render

    demos = random.Random(f"{ctx.seed}-{index}").sample(ctx.shots, ctx.few_shot) if index is not None else []
    golds = [reference_of(ctx.task, d, "--train") for d in demos]
    fields = {**row, "text_pair": row.get("text_pair") or ""} if ctx.task == "classify" else row  # pairs may lack it
    answers = [(g or [""])[0] if isinstance(g, list) else g for g in golds]  # qa: the first answer, "" for none
    return "".join(f"{prompt(ctx, d)} {a}\n\n" for d, a in zip(demos, answers)) + render(ctx.template, fields, "prompt")


def label_scores(ctx: Ctx, prompts: list[str]) -> list[str]:
    """Per prompt, the label whose tokens (after a space) have the highest summed log-probability. The sequences
    (prompt + label, for every label) run ``len(prompts)`` at a time and the output layer only on the label
    tokens' positions (:func:`gptkit.modeling.logits_where`): never batch x labels x length x vocabulary
    log-probabilities (4 GB at batch 16 for a 50k vocabulary and four labels)."""
    import torch

    from gptkit.modeling import context_length, logits_where
    from gptkit.tokenizer import prompt_ids

    tails = [ctx.tok(" " + label, add_special_tokens=False)["input_ids"] for label in ctx.labels]
    seqs = [((prompt_ids(ctx.tok, p) + tail)[-context_length(ctx.model.config):], tail) for p in prompts
            for tail in tails]
    totals, pad, device = [], ctx.tok.pad_token_id or 0, ctx.model.device
    for lo in range(0, len(seqs), max(1, len(prompts))):
        part = seqs[lo : lo + len(prompts)]
        width = max(len(s) for s, _ in part)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s, _ in part], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in part], device=device)
        keep = torch.zeros_like(ids, dtype=torch.bool)
        for j, (s, tail) in enumerate(part):  # the positions that predict the label's tokens
            keep[j, len(s) - len(tail) - 1 : len(s) - 1] = True
        targets = torch.tensor([t for _, tail in part for t in tail], device=device)
        with torch.inference_mode():
            logp = logits_where(ctx.model, keep, input_ids=ids, attention_mask=mask).float().log_softmax(-1)
        picked = logp.gather(1, targets[:, None])[:, 0].tolist()
        for _, tail in part:
            totals.append(sum(picked[: len(tail)]))
            picked = picked[len(tail) :]
    n = len(ctx.labels)
    return [ctx.labels[max(range(n), key=lambda c: totals[i * n + c])] for i in range(len(prompts))]


def predict_batch(ctx: Ctx, rows: list[dict], start: int) -> list[str]:
    """One batch: the task module's predict (classifier head, span head, or generation through generate_batch);
    with a causal LM, classify by label likelihood; few-shot generates itself (cut at the first newline)."""
    from gptkit import generation
    from gptkit.tasks import classify, load

    if ctx.task == "classify" and ctx.labels is None:
        return classify.predict(ctx.model, ctx.tok, rows, ctx.recipe)
    seed = generation.seed_at(ctx.recipe.train.seed, start) if ctx.decoding.do_sample else ctx.recipe.train.seed
    if ctx.task != "classify" and not ctx.few_shot:
        recipe = ctx.recipe.model_copy(update={"train": ctx.recipe.train.model_copy(update={"seed": seed})})
        return [str(p) for p in load(ctx.task).predict(ctx.model, ctx.tok, rows, recipe)]
    prompts = [prompt(ctx, r, start + j) for j, r in enumerate(rows)]
    if ctx.task == "classify":
        return label_scores(ctx, prompts)
    decoding = replace(ctx.decoding, seed=seed) if ctx.decoding.do_sample else ctx.decoding
    texts = generation.generate_batch(ctx.model, ctx.tok, prompts, decoding, batch_size=len(rows))
    return [t[0].split("\n")[0].strip() for t in texts]


def check_first(ctx: Ctx, row: dict) -> None:
    """The errors the first batch would meet, raised before the output folder is written: max_new_tokens past
    the model's context, a prompt naming a field the rows lack, extractive qa's windows leaving the context no
    room. (An eval.json written first would make the corrected re-run "an evaluation of something else".)"""
    from gptkit import generation
    from gptkit.tasks import qa

    if ctx.task == "classify" and ctx.labels is None:  # a classifier head: no prompt, no generation
        return
    if ctx.task == "qa" and not ctx.few_shot and qa._extractive(ctx.recipe):
        qa.check_room(ctx.recipe, ctx.tok, ctx.model)
        return
    if ctx.labels is None:
        generation.check_context(ctx.model, ctx.decoding)
    else:  # label likelihood: each label's tokens, after at least one token of prompt, within the context
        from gptkit.modeling import context_length

        room = context_length(ctx.model.config) - 1
        for label in ctx.labels:
            n = len(ctx.tok(" " + label, add_special_tokens=False)["input_ids"])
            if n > room:
                raise UserError(f"classify label {label!r} is {n} tokens; the model's context "
                                f"({room + 1}) leaves its prompt no room (labels must be at most {room} tokens)")
    prompt(ctx, row, 0)


def _remove_if(condition: bool, out: Path) -> None:
    """Remove the output folder this run created when a UserError stops it before anything was predicted."""
    if condition:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


SPANS = ("max_answer_tokens", "null_score_diff_threshold")  # extractive qa's choice of answer, as decoding is a text's
DECODING = ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", *SPANS)


def make_ctx(opts: Options, task: str, model, tok, run, rows: list[dict], shots: list[dict], given=None) -> Ctx:
    """The run's own recipe when it was trained for this task (prompt, decoding, qa_mode), with the decoding of
    the recipe ``given`` on the command line (its file and overrides) for this task; else that recipe (a recipe
    scoring its base before fine-tuning), else the task's defaults (qa: generative); decoding options given as
    eval's own flags win."""
    from gptkit import generation
    from gptkit.recipe import Recipe
    from gptkit.tasks import classify, load
    from gptkit.trained import has_head

    same = run is not None and run.task == task
    ours = given is not None and given.task == task
    recipe = run if same else given if ours else Recipe(task=task)
    if same and ours:  # the run's prompt and inputs, as trained; the decoding the recipe given sets (file, overrides)
        asked = {k: getattr(given.finetune, k) for k in DECODING if k in given.finetune.model_fields_set}
        changed = {k: v for k, v in asked.items() if v != getattr(run.finetune, k)}
        if changed:
            log.info("eval: decoding of the recipe given: %s (the run's: %s)", changed,
                     {k: getattr(run.finetune, k) for k in changed})
            recipe = recipe.model_copy(update={"finetune": recipe.finetune.model_copy(update=changed)})
    given = {k: getattr(opts, k) for k in ("max_new_tokens", "num_beams", "temperature", "top_k", "top_p",
                                           "repetition_penalty") if getattr(opts, k) is not None}
    sampling = opts.sample or any(k in given for k in ("temperature", "top_k", "top_p"))
    if sampling:  # plain sampling unless --num-beams asks for beam sampling
        given = {"num_beams": 1, **given, "do_sample": True}
    if not same:  # a plain model: prompts are fitted to its context, not to a training max_length
        given = {"max_length": 10**9, **given}
    ft = recipe.finetune.model_copy(update={**given, **({} if same or task != "qa" else {"qa_mode": "generative"})})
    recipe = recipe.model_copy(update={"finetune": ft, "train": recipe.train.model_copy(update={"seed": opts.seed})})
    decoding = generation.decoding_from(ft, opts.seed)
    decoding.validate()
    head = same and has_head(task, recipe)  # load_model gave a head
    if head and opts.few_shot:
        raise UserError(f"--few-shot: {task} model has a task head; demonstrations need a causal LM")
    labels = classify.label_names(rows + shots) if task == "classify" and not same else None
    if task == "classify":
        _no_decoding(opts, "classifying by label likelihood" if labels is not None else "a classify head")
        if labels is not None:
            log.info("eval: %s has no classify head: each label (%s) is scored by its likelihood after the prompt",
                     opts.model or "the model", ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else ""))
    elif task == "qa" and head:
        _no_decoding(opts, "an extractive qa head (it picks a span of the context)")
    if is_encoder_decoder(model.config) and (opts.few_shot or labels is not None):
        what = "--few-shot: demonstrations need" if opts.few_shot else "--task classify: label likelihoods need"
        raise UserError(f"{what} a decoder-only model; {opts.model or 'the model'} is an encoder-decoder "
                        f"({model.config.model_type})")
    pairs = task == "classify" and any(r.get("text_pair") not in (None, "") for r in rows + shots)
    template = ft.prompt or (CLASSIFY_PAIR_PROMPT if pairs else CLASSIFY_PROMPT if task == "classify" else
                             load(task).PROMPT)
    return Ctx(task, model, tok, recipe, template, decoding, labels, shots, opts.few_shot, opts.seed)


# ------------------------------------------------------------------------------------------- modes
def _structured(path: Path) -> bool:
    from gptkit.corpus import FORMATS

    return FORMATS.get(path.suffix.lower(), "text") != "text"


def _lm_text(path: Path, settings) -> str:
    """A --task lm file's text: a text file whole; a jsonl/json/csv/parquet file (a pretraining recipe's val or
    test files) read as pretraining reads it (:mod:`gptkit.corpus`): the data.text_column cells, one document each,
    joined by a blank line — never its JSON syntax."""
    from gptkit import corpus

    if not _structured(path):
        return read_text(path, "--data")
    if not path.is_file():
        raise UserError(f"--data: {path} not found")
    return "\n\n".join(t for unit in corpus.plan([str(path)], settings) for t in corpus.read(unit, settings)[0])


def run_lm(opts: Options, model_path: str, data: list[Path], out: Path, recipe=None) -> dict:
    """Perplexity of a causal LM on text files, strided sliding windows (:func:`gptkit.modeling.sliding_nll`): the
    files joined by a blank line and tokenized whole, as Hugging Face's perplexity guide does (``tokenizer(text)``,
    special tokens and all), the ids kept as one int32 array. Rows files give their ``recipe``'s data.text_column
    (default ``text``)."""
    import numpy as np

    from gptkit import corpus
    from gptkit.data import text_settings
    from gptkit.modeling import context_length, sliding_nll

    settings = text_settings(recipe.data) if recipe is not None else corpus.Settings()
    text = "\n\n".join(_lm_text(p, settings) for p in data)
    model, tok, _ = load_model(model_path, "lm")
    if is_encoder_decoder(model.config):
        raise UserError(f"--task lm: perplexity needs a decoder-only model; {model_path} is an encoder-decoder "
                        f"({model.config.model_type})")
    ids = np.asarray(tok(text, verbose=False)["input_ids"], dtype=np.int32)
    del text
    context = context_length(model.config)
    stride = opts.stride or max(1, context // 2)
    if len(ids) < 2 or not 1 <= stride <= context:
        raise UserError(f"--data has {len(ids)} tokens (need >= 2)" if len(ids) < 2 else
                        f"--stride must be in [1, {context}] (the model's context), got {stride}")
    model_fp, data_fp = fingerprint(Path(model_path)), file_hashes(data)
    columns = {"text_column": list(settings.text_columns)} if any(map(_structured, data)) else {}
    prepare_out(out, {"mode": "lm", "model": model_fp["sha256"], "data": data_fp, "stride": stride, **columns}, False, 0)
    started = time.time()
    nll, n, n_windows = sliding_nll(model, ids, context, stride, opts.batch_size)
    result = {"task": "lm", "mode": "lm", "metrics": {"perplexity": metrics.perplexity_from_nll(nll, n),
                                                      "nll_per_token": nll / n, "bits_per_token": nll / n / math.log(2)},
              "signatures": {"perplexity": f"sliding window: context {context}, stride {stride}, " + (
                  "all tokens but the first" if stride < context or len(ids) <= context else
                  "non-overlapping: each window's first token unscored")},
              "counts": {"tokens": len(ids), "scored": n, "windows": n_windows}, "out": str(out),
              "settings": {"context": context, "stride": stride, "batch_size": opts.batch_size,
                           "seconds": round(time.time() - started, 3)},
              "model": model_fp, "data": data_fp}
    write_outputs(out, result, [])
    return result


def _task_view(run, task: str, index: int | None = None):
    """A multi-task run as one of its tasks sees it (files, columns, prompt): task ``index``, else the first
    of kind ``task``; any other run as it is."""
    if run is None or run.task != "multitask":
        return run
    from gptkit.tasks import multitask

    kinds = [s.task for s in run.finetune.tasks]
    index = index if index is not None else kinds.index(task) if task in kinds else None
    return run if index is None else multitask.sub_recipe(run, index)


def _read_data(task: str, data: list[Path], fields: tuple, optional: tuple, cols: dict, limit: int | None):
    """(rows, references, what make_ctx surveys): the first ``limit`` rows of the --data files, read no further
    (memory flat in the files' size) — but for classify every row's label and whether it has a text_pair, kept as
    one row per kind (the label set is the whole data's, whatever --limit)."""
    rows, refs, kinds = [], [], {}
    for path in data:
        for r in iter_fields(path, "--data", fields, optional, cols):
            if task == "classify":
                kinds.setdefault((str(r["label"]), r.get("text_pair") not in (None, "")), r)
            if limit is None or len(rows) < limit:
                rows.append(r)
                refs.append(reference_of(task, r, f"--data: {path}: line {r['_line']}"))
            elif task != "classify":
                return rows, refs, rows
    return rows, refs, list(kinds.values()) if task == "classify" else rows


def run_model(opts: Options, task: str, model_path: str, data: list[Path], out: Path, columns: dict,
              index: int | None = None, loaded: tuple | None = None, given=None) -> dict:
    """Predict batch by batch, appending each batch to predictions.jsonl, then score everything written.
    ``loaded``: (model, tokenizer, run, fingerprint) already loaded (a multi-task run's tasks share them)."""
    from gptkit import generation

    model, tok, run, model_fp = loaded or (*load_model(model_path, task), fingerprint(Path(model_path)))
    run = _task_view(run, task, index)
    fields, optional = (*INPUTS[task], REFERENCE[task]), ("text_pair",) if task == "classify" else ()
    column_fields_check(columns, (*fields, *optional, "id"), "--columns")  # a typo was dropped in silence
    cols = {**(run.data.columns if run is not None and run.task == task else {}), **columns}
    rows, refs, every = _read_data(task, data, fields, optional, cols, opts.limit)
    run_extra = run.finetune.extra_metrics if run is not None and run.task == task else []
    extra = user_metrics.load(list(dict.fromkeys([*run_extra, *opts.metrics])), "--metric", refs)
    if opts.few_shot and not opts.train:
        raise UserError("--few-shot needs --train FILE to draw the demonstrations from")
    if opts.train and not opts.few_shot:
        raise UserError("--train: the file --few-shot K draws demonstrations from; add --few-shot K or drop --train")
    tp = Path(opts.train or "")
    shots = read_fields(tp, "--train", fields, optional, cols) if opts.few_shot else []
    if len(shots) < opts.few_shot:
        raise UserError(f"--few-shot {opts.few_shot}: {tp} has only {len(shots)} examples")
    ctx = make_ctx(opts, task, model, tok, run, every, shots, given)  # labels: from all rows, whatever --limit
    extractive = task == "qa" and ctx.recipe.finetune.qa_mode == "extractive" and not opts.few_shot
    identity = {"mode": "model", "task": task, "model": model_fp["sha256"], "data": file_hashes(data),
                "columns": cols, "template": ctx.template, "decoding": asdict(ctx.decoding),
                "generation_config": generation.inherited(model), "labels": ctx.labels,
                "few_shot": opts.few_shot, "train": sha256(tp) if shots else None, "seed": opts.seed if shots else None,
                **({"spans": {k: getattr(ctx.recipe.finetune, k) for k in SPANS}} if extractive else {})}
    check_first(ctx, rows[0])
    created = not out.exists()
    preds = [k["prediction"] for k in prepare_out(out, identity, opts.resume, len(rows))]
    started, resumed_at = time.time(), len(preds)
    for start in range(len(preds), len(rows), opts.batch_size):
        chunk = rows[start : start + opts.batch_size]
        try:
            new = predict_batch(ctx, chunk, start)
        except UserError:
            _remove_if(created and not preds, out)  # nothing predicted: the corrected re-run starts afresh
            raise
        append(out / "predictions.jsonl", [{"index": start + j, **({"id": r["id"]} if "id" in r else {}),
                                            "prediction": p, "reference": refs[start + j]}
                                           for j, (r, p) in enumerate(zip(chunk, new))])
        preds += new
        log.info("eval: %d/%d examples predicted", len(preds), len(rows))
    settings = {**{k: v for k, v in identity.items() if k not in ("mode", "task", "model", "data")},
                "batch_size": opts.batch_size, "limit": opts.limit, "resumed_at": resumed_at if opts.resume else None,
                "bootstrap": opts.bootstrap, "seconds": round(time.time() - started, 3)}
    base = {"mode": "model", "settings": settings, "model": model_fp, "data": identity["data"]}
    return finish(out, base, task, rows, preds, refs, opts.bootstrap, opts.seed,
                  opts.rouge_tokenizer or ctx.recipe.finetune.rouge_tokenizer, extra,
                  no_answer=task == "qa" and ctx.recipe.finetune.no_answer)


def run_predictions(opts: Options, task: str) -> dict:
    """Score a predictions file against a references file; no model is loaded."""
    if not (opts.predictions and opts.references) or opts.model or opts.data or opts.resume or task == "lm":
        raise UserError("eval: --predictions and --references go together, for a text task, without --model/--data")
    ppath, rpath, cols = Path(opts.predictions), Path(opts.references), parse_columns(opts.columns)
    column_fields_check(cols, (REFERENCE[task], *INPUTS[task], "id"), "--columns")
    preds = read_fields(ppath, "--predictions", ("prediction",))
    refs = read_fields(rpath, "--references", (REFERENCE[task],), INPUTS[task], cols)
    pairs = pair(preds, refs, ppath, rpath)
    bad = [p for p, _ in pairs if isinstance(p["prediction"], bool) or not isinstance(p["prediction"], (str, int))]
    if bad:  # an int is a class id; true/false, null, lists are not predictions
        raise UserError(f"--predictions: {ppath}: line {bad[0]['_line']}: prediction must be a string, got "
                        f"{json.dumps(bad[0]['prediction'])}")
    gold = [reference_of(task, r, f"--references: {rpath}: line {r['_line']}") for _, r in pairs]
    extra = user_metrics.load(opts.metrics, "--metric", gold)
    data = file_hashes([ppath, rpath])
    out = Path(opts.out or f"eval-{task}")
    prepare_out(out, {"mode": "predictions", "task": task, "data": data, "columns": cols}, False, 0)
    base = {"mode": "predictions", "settings": {"columns": cols, "bootstrap": opts.bootstrap}, "data": data}
    return finish(out, base, task, [r for _, r in pairs], [str(p["prediction"]) for p, _ in pairs], gold,
                  opts.bootstrap, opts.seed, opts.rouge_tokenizer or "default", extra)


# ------------------------------------------------------------------------------------------- entry
def _data(opts: Options, recipe) -> tuple[list[Path], str]:
    """--data, else the recipe's (or the run's) split: data.test_files, falling back to data.val_files."""
    from gptkit.data import resolve_files

    if opts.data and opts.split:
        raise UserError("--split picks a split of the recipe (test, validation, train); drop it when giving --data")
    if opts.data or recipe is None:
        if not opts.data:
            raise UserError("--data: give the file to evaluate on (or a recipe / run whose data.test_files to use)")
        return [Path(f) for f in resolve_files([opts.data], "--data")], ""
    split = opts.split or ("test" if recipe.data.test_files else "validation")
    field = _split_field(split)
    if not getattr(recipe.data, field):
        raise UserError(f"data.{field}: empty in the recipe; set it or pass --data FILE")
    return [Path(f) for f in resolve_files(getattr(recipe.data, field), f"data.{field}")], split


def _split_field(split: str) -> str:
    fields = {"test": "test_files", "validation": "val_files", "train": "train_files"}
    if split not in fields:
        raise UserError(f"--split: '{split}' is not one of {', '.join(fields)}")
    return fields[split]


def _recipe_model(recipe) -> str:
    """A recipe's model: its output.dir run (best/ when kept), else model.init_from (the base checkpoint)."""
    out = rundir.resolve_output(recipe.output.dir)
    if any((out / f).is_file() for f in ("config.json", "adapter_config.json")):
        return str(out / "best" if (out / "best").is_dir() else out)
    if not recipe.model.init_from:
        raise UserError(f"output.dir: {out} holds no trained model and model.init_from is not set; pass --model DIR")
    log.info("eval: %s holds no trained model; evaluating model.init_from %s", out, recipe.model.init_from)
    return recipe.model.init_from


def run_multitask(opts: Options, recipe, model_path: str, home: Path) -> dict:
    """Each task of a multi-task run that has the split (files, columns, prompt), into OUT/<task name>/, and
    OUT/metrics.json: every task's metrics and ``score``, the mean of their primary metrics — the tasks and figures
    of the run's test_metrics.json for the test split. No --split: test, or validation when no task has test files."""
    from gptkit.data import resolve_files
    from gptkit.tasks import multitask

    if opts.data:
        raise UserError("--data: a multi-task run is scored on each task's own split; to score one task on a file, "
                        "add --task (translate, summarize or qa)")
    subs = {name: multitask.sub_recipe(recipe, i) for i, name in enumerate(multitask._names(recipe))}
    split = opts.split or ("test" if any(sub.data.test_files for sub in subs.values()) else "validation")
    field = _split_field(split)
    chosen = {name: (i, sub) for i, (name, sub) in enumerate(subs.items()) if getattr(sub.data, field)}
    if not chosen:
        raise UserError(f"--split: '{split}': no task of this multi-task run has finetune.tasks[].{field}")
    files = {name: [Path(f) for f in resolve_files(getattr(sub.data, field), f"finetune.tasks[{i}].{field}")]
             for name, (i, sub) in chosen.items()}  # every task's files are checked before any is scored
    for name in subs.keys() - chosen.keys():
        log.info("eval: task %s has no %s; not scored", name, field)
    out = Path(opts.out) if opts.out else home / f"eval-multitask{'-' + split if split != 'test' else ''}"
    metrics, counts, data, parts = {}, {}, {}, {}
    loaded = (*load_model(model_path, "multitask"), fingerprint(Path(model_path)))  # once for all its tasks
    created = not out.exists()
    # the folder is checked as a single task's is, before any task is scored: never another evaluation's, nor
    # a folder of the user's whose metrics.json and report.md this would overwrite
    prepare_out(out, {"mode": "multitask", "model": loaded[3]["sha256"], "split": split, "tasks": sorted(chosen)},
                opts.resume, 0)
    for name, (i, sub) in chosen.items():
        log.info("eval: task %s (%s) on %s", name, sub.task, ", ".join(map(str, files[name])))
        try:
            part = run_model(opts, sub.task, model_path, files[name], out / name,
                             {**sub.data.columns, **parse_columns(opts.columns)}, i, loaded, given=sub)
        except UserError:
            _remove_if(created and not parts, out)  # the first task's error: the corrected re-run starts afresh
            raise
        metrics.update({f"{name}_{k}": v for k, v in part["metrics"].items()})
        metrics[f"_{name}"] = part["metrics"][multitask.PRIMARY[sub.task]]
        counts[name], parts[name] = part["counts"]["examples"], part["out"]
        data.update(part["data"])
    primaries = [metrics.pop(f"_{n}") for n in counts]
    metrics["score"] = sum(primaries) / len(primaries)
    result = {"task": "multitask", "mode": "multitask", "model": {"path": model_path}, "data": data,
              "metrics": metrics, "counts": counts, "tasks": parts, "out": str(out)}
    write_outputs(out, result, [])
    return result


def run(opts: Options, recipe=None) -> dict:
    """Resolve mode, task, model, data and output folder; evaluate; return what metrics.json holds."""
    from gptkit import hub

    named = opts.model or (_recipe_model(recipe) if recipe is not None and not opts.predictions else None)
    model_path = named and str(hub.resolve(named, "--model", weights=True).path)  # a hub id: its cached snapshot
    run_recipe, home = rundir.run_of(Path(model_path).expanduser()) if model_path else (None, Path("."))
    if named and not Path(named).expanduser().is_dir():
        home = Path(".")  # default output beside the user, never inside the Hugging Face cache
    if not (model_path or opts.predictions or opts.references):
        raise UserError("eval: pass --model DIR with --data FILE, a RECIPE, or --predictions with --references")
    if opts.batch_size < 1 or (opts.limit is not None and opts.limit < 1) or min(opts.bootstrap, opts.few_shot) < 0:
        raise UserError("--batch-size and --limit must be >= 1; --bootstrap and --few-shot >= 0")
    if opts.rouge_tokenizer not in (None, *metrics.ROUGE_TOKENIZERS):
        raise UserError(f"--rouge-tokenizer: expected {' or '.join(metrics.ROUGE_TOKENIZERS)}, got {opts.rouge_tokenizer!r}")
    source = recipe or run_recipe
    task = opts.task or (None if source is None else "lm" if source.task == "pretrain" else source.task)
    if task == "multitask" and source is not None and source.task == "multitask" and model_path:
        return run_multitask(opts, source, model_path, home)
    source = _task_view(source, task) if task in TASKS else source  # one task of a multi-task run: its split
    if task not in TASKS:
        raise UserError(f"--task: '{task}' is not an eval task; expected one of {', '.join(TASKS)} (multitask: a "
                        "multi-task run or recipe)" if task else
                        "eval: --task is required (translate, summarize, qa, classify or lm)")
    if opts.predictions or opts.references:
        return run_predictions(opts, task)
    data, split = _data(opts, source)
    # the recipe's test split: eval-<task>; another split: eval-<task>-<split>; --data FILE: eval-<task>-<its name>
    name = split if split else data[0].stem if len(data) == 1 else f"{data[0].stem}-and-{len(data) - 1}-more"
    out = Path(opts.out) if opts.out else home / f"eval-{task}{'-' + name if name != 'test' else ''}"
    log.info("eval: %s on %s (%s) -> %s", model_path, ", ".join(map(str, data)), task, out)
    if task == "lm":
        if opts.metrics:
            raise UserError("--metric: evaluate modules score text tasks; perplexity (lm) takes none")
        if opts.resume:
            raise UserError("--resume: perplexity has no predictions to resume; run it again")
        _no_decoding(opts, "perplexity (lm)")
        if opts.limit is not None or opts.bootstrap:  # not silently ignored: the figure would not be what was asked
            raise UserError(f"{'--limit' if opts.limit is not None else '--bootstrap'}: perplexity (lm) scores every "
                            "token of --data; cut the file instead" + ("" if opts.limit is not None else
                                                                        ", and takes no confidence interval"))
        return run_lm(opts, model_path, data, out, source)
    columns = {**(recipe.data.columns if recipe is not None else {}), **parse_columns(opts.columns)}
    return run_model(opts, task, model_path, data, out, columns, given=source if recipe is not None else None)
