"""The ``gptkit`` command: parse arguments, load the recipe, dispatch. No training logic lives here.

Heavy libraries (torch, transformers, datasets) are imported inside the commands, so ``--help``
answers instantly. User errors print one ``error:`` line and exit 2; bugs keep their traceback.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from gptkit.errors import Interrupted, TrainingStopped, UserError

app = typer.Typer(
    help="Pretrain, fine-tune, evaluate and sample GPT-style models offline, from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
recipes_app = typer.Typer(help="List the bundled recipes, or show one.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")

Overrides = Annotated[Optional[list[str]], typer.Argument(help="Recipe overrides: key.path=value (e.g. train.lr=3e-4).")]
RecipeArg = Annotated[str, typer.Argument(help="Recipe file, or a bundled recipe name such as pretrain/tiny.")]
# fine-tuning and evaluation get examples of their own: pretrain/tiny is not a fine-tuning recipe, nor train.lr the
# setting one changes most
FinetuneOverrides = Annotated[Optional[list[str]], typer.Argument(
    help="Recipe overrides: key.path=value (e.g. finetune.method=lora data.columns.text=sentence).")]
FinetuneRecipeArg = Annotated[str, typer.Argument(
    help="Recipe file, or a bundled recipe name such as classify/sst2-tiny or translate/multi30k-tiny.")]


def _setup_offline_and_logging() -> None:
    # Hub ids are resolved by gptkit.hub (local cache first; a download only when HF_HUB_OFFLINE is not set);
    # everything else reads local files: datasets never needs the hub.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if "TOKENIZERS_PARALLELISM" not in os.environ:  # off by default; gptkit's own batch encodes turn it on
        os.environ.update(TOKENIZERS_PARALLELISM="false", GPTKIT_TOKENIZER_THREADS="default-off")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    main_rank = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="gptkit: %(message)s")
    for noisy in ("transformers", "datasets", "accelerate", "torch", "httpx", "filelock", "matplotlib", "mlflow",
                  "alembic", "wandb", "torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


LAUNCHER_CONFIGS = "accelerate"  # recipes/accelerate/: Accelerate and DeepSpeed configs to copy, not recipes


def bundled_recipes_dir() -> Path:
    here = Path(__file__).resolve().parent
    for cand in (here / "_bundled" / "recipes", here.parents[1] / "recipes"):
        if cand.is_dir():
            return cand
    return here / "_bundled" / "recipes"


def resolve_recipe_path(name: str) -> Path:
    """A path as given, else a bundled recipe name (with or without .yaml)."""
    p = Path(name)
    if p.is_file():  # a folder of the same name (./pretrain) is not a recipe: look among the bundled ones
        return p
    root = bundled_recipes_dir()
    for cand in (root / name, root / f"{name}.yaml"):
        if cand.is_file():
            return cand
    if p.is_dir():
        raise UserError(f"{name}: is a directory, expected a YAML recipe file (nor is it a bundled recipe; "
                        "`gptkit recipes` lists them)")
    raise UserError(f"{name}: recipe file not found (nor a bundled recipe; `gptkit recipes` lists them)")


def _load(recipe: str, overrides: list[str] | None, task: str | None = None):
    """The recipe, its data.columns checked against the task the command runs (--task wins over the recipe's), and
    its DeepSpeed config found."""
    from gptkit.recipe import check_columns, check_deepspeed_config, load_recipe

    path = resolve_recipe_path(recipe)
    rec = load_recipe(path, overrides or [])

    def source(*keys: str) -> str:
        return "command-line override" if any(o.split("=", 1)[0].startswith(keys) for o in overrides or []) else str(path)

    check_columns(rec, task or rec.task, source("data.columns", "finetune.tasks"))
    check_deepspeed_config(rec, source("distributed"))
    return rec


@app.command()
def pretrain(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's latest complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run already in output.dir.")] = False,
    force: Annotated[bool, typer.Option("--force", help="With --resume: accept a recipe that changed.")] = False,
    prepare: Annotated[bool, typer.Option("--prepare", help="Only train the tokenizer and tokenize the corpus into "
                                          "the cache (once, before a multi-process launch), then stop.")] = False,
) -> None:
    """Train a tokenizer and a GPT-style causal LM from scratch (or continue one) on local text."""
    from gptkit import pretrain as task

    rec = _load(recipe, overrides, "pretrain")
    if prepare:
        ready = task.prepare(rec)
        typer.echo(f"prepared: {ready['train_tokens']:,} training and {ready['val_tokens']:,} validation tokens in "
                   f"{ready['cache']}; `gptkit pretrain` with this recipe starts training at once")
        return
    metrics = task.run(rec, resume=resume, overwrite=overwrite, force=force, command=sys.argv)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in ("train_loss", "val_loss", "val_perplexity"))
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"done: {shown or f'no steps left (train.max_steps {rec.train.max_steps} reached)'}; model saved in "
                   f"{rec.output.dir}")


@app.command()
def init(
    recipe: RecipeArg,
    overrides: Overrides = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the folder already in output.dir.")] = False,
) -> None:
    """Build an untrained model of the recipe's shape (GPT-2, Llama, or the encoder-decoders BART and T5) with its
    tokenizer trained on data.train_files: a base that `gptkit finetune` trains from nothing."""
    from gptkit import pretrain as task

    rec = _load(recipe, overrides)
    out, n = task.init(rec, overwrite=overwrite, command=sys.argv)
    typer.echo(f"initialised: {rec.model.arch}, {n:,} parameters (untrained), with its tokenizer, in {out}")


@app.command()
def finetune(
    recipe: FinetuneRecipeArg,
    overrides: FinetuneOverrides = None,
    task: Annotated[Optional[str], typer.Option("--task", help="classify, qa, translate, summarize or multitask (wins over the recipe).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's latest complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run already in output.dir.")] = False,
    force: Annotated[bool, typer.Option("--force", help="With --resume: accept a recipe that changed.")] = False,
) -> None:
    """Adapt a local checkpoint or a cached hub model to a task (classify, qa, translate, summarize, or multitask:
    several of them in one model), full or LoRA."""
    from gptkit import finetune as ft
    from gptkit.tasks import FINETUNE_TASKS

    if task is not None and task not in FINETUNE_TASKS:
        raise UserError(f"--task: '{task}' is not a fine-tuning task; expected one of {', '.join(FINETUNE_TASKS)}")
    rec = _load(recipe, overrides, task)
    name = task or rec.task
    if name not in FINETUNE_TASKS:  # (--task was checked above: this is the recipe's)
        hint = "; run it with `gptkit pretrain`" if name == "pretrain" else ""
        raise UserError(f"task: '{name}' is not a fine-tuning task; expected one of {', '.join(FINETUNE_TASKS)} "
                        f"(in the recipe, or --task){hint}")
    metrics = ft.run(rec, name, resume=resume, overwrite=overwrite, force=force, command=sys.argv)
    if os.environ.get("RANK", "0") == "0":
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("val_", "test_")))
        best = f"the best checkpoint, step {metrics['best_step']}: " if "best_step" in metrics else ""
        typer.echo(f"done: {best}{shown or f'no steps left (train.max_steps {rec.train.max_steps} reached)'}; "
                   f"saved in {rec.output.dir}")


@app.command()
def distill(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's latest complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run already in output.dir.")] = False,
    force: Annotated[bool, typer.Option("--force", help="With --resume: accept a recipe that changed.")] = False,
) -> None:
    """Train a student on a teacher's soft targets as well as the data (the recipe's distill section): pretraining
    or a generative task, as the recipe's task says."""
    rec = _load(recipe, overrides)
    if not rec.distill.teacher:
        raise UserError(f"{recipe}: distill.teacher: gptkit distill needs a teacher (a run or model folder)")
    if rec.task == "pretrain":
        pretrain(recipe, overrides, resume=resume, overwrite=overwrite, force=force, prepare=False)
    else:
        finetune(recipe, overrides, task=None, resume=resume, overwrite=overwrite, force=force)


@app.command()
def export(
    run_dir: Annotated[str, typer.Argument(help="A fine-tuning run directory (LoRA or full).")],
    merge: Annotated[bool, typer.Option("--merge", help="Accepted for older scripts and changes nothing: export "
                                        "always merges a LoRA run's adapters.")] = False,
    out: Annotated[Optional[str], typer.Option("--out", help="Output directory (default: RUN_DIR/merged).")] = None,
) -> None:
    """Write a standalone checkpoint of a fine-tuning run's model that plain transformers loads (from_pretrained),
    with the run's recipe: a LoRA run's adapters merged into its base (heads included); a full fine-tune's weights
    copied as they are."""
    from gptkit import trained

    path = trained.export(Path(run_dir), Path(out) if out else Path(run_dir) / "merged")
    if trained.is_adapter_dir(Path(run_dir)):
        typer.echo(f"merged model written to {path} (LoRA adapters merged into the base)")
    else:
        typer.echo(f"standalone model written to {path} (a full fine-tune: its weights as they are)")


@app.command("eval")
def eval_(
    recipe: Annotated[Optional[str], typer.Argument(help="Recipe file or bundled name (e.g. translate/multi30k-tiny): "
                                                    "evaluates its output.dir run (model.init_from when that holds no "
                                                    "model) on data.test_files (data.val_files when it has none).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="Recipe overrides: key.path=value (e.g. output.dir=runs/other data.test_files=[test.jsonl]).")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="translate, summarize, qa, classify or lm.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Fine-tuned run, local model directory, or Hugging Face hub id (ORG/NAME[@REV]).")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Examples (jsonl/csv/json/parquet; .txt for lm).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Recipe split: test, validation or train.")] = None,
    predictions: Annotated[Optional[str], typer.Option("--predictions", help="Score this JSONL of predictions.")] = None,
    references: Annotated[Optional[str], typer.Option("--references", help="JSONL of references for --predictions.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Output folder (default: MODEL_DIR/eval-TASK; "
                                               "eval-TASK-SPLIT for --split, eval-TASK-NAME for --data NAME.jsonl).")
                   ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples (lm: windows) per batch.")] = 16,
    num_beams: Annotated[Optional[int], typer.Option("--num-beams", help="Beam width (default: the run's, else 4; 1 when sampling).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Tokens generated per example.")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Sample instead of greedy/beam decoding.")] = False,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature (implies --sample).")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Sample from the k likeliest tokens (implies --sample).")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass (implies --sample).")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(help="Penalty > 1 discourages repeats.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate the first N examples only.")] = None,
    columns: Annotated[Optional[list[str]], typer.Option("--columns", help="field=column (repeatable).")] = None,
    stride: Annotated[Optional[int], typer.Option("--stride", help="lm: window stride (default: context/2).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue after the last prediction written.")] = False,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Resamples for 95% confidence intervals (0 = off).")] = 0,
    few_shot: Annotated[int, typer.Option("--few-shot", help="Demonstrations from --train before each prompt.")] = 0,
    train: Annotated[Optional[str], typer.Option("--train", help="Examples to draw --few-shot demonstrations from.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seeds sampling, demonstrations and bootstrap resampling.")] = 0,
    rouge_tokenizer: Annotated[Optional[str], typer.Option("--rouge-tokenizer", help="summarize: default (rouge_score's, English) or unicode (any script); default: the run's.")] = None,
    metric: Annotated[Optional[list[str]], typer.Option("--metric", help="A Hugging Face evaluate module (local .py or folder, or a name in the local evaluate cache) scored beside the built-ins (repeatable; needs gptkit[metrics]).")] = None,
) -> None:
    """Score a model (or existing predictions): BLEU/chrF, ROUGE, SQuAD EM/F1, accuracy, perplexity."""
    from gptkit import evaluate

    opts = evaluate.Options(task=task, model=model, data=data, split=split, predictions=predictions,
                            references=references, out=out, batch_size=batch_size, num_beams=num_beams,
                            max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_k=top_k,
                            top_p=top_p, repetition_penalty=repetition_penalty, limit=limit, columns=columns or [], stride=stride,
                            resume=resume, bootstrap=bootstrap, few_shot=few_shot, train=train, seed=seed,
                            rouge_tokenizer=rouge_tokenizer, metrics=metric or [])
    result = evaluate.run(opts, _load(recipe, overrides) if recipe else None)
    typer.echo(evaluate.table(result))
    typer.echo(f"wrote {result['out']}: metrics.json, report.md" + (", predictions.jsonl" if result["mode"] == "model" else ""))


augment_app = typer.Typer(help="Make training data: back-translation.", no_args_is_help=True)
app.add_typer(augment_app, name="augment")


@augment_app.command("backtranslate")
def augment_backtranslate(
    model: Annotated[str, typer.Option("--model", help="A translate run trained in the reverse direction (target -> source).")],
    data: Annotated[str, typer.Option("--data", help="Monolingual target-language text, JSON lines.")],
    out: Annotated[str, typer.Option("--out", help="Synthetic pairs to write (JSON lines: source, target, synthetic).")],
    column: Annotated[str, typer.Option("--column", help="The field of --data holding the text.")] = "target",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sentences per batch.")] = 32,
    limit: Annotated[Optional[int], typer.Option("--limit", help="The first N sentences only.")] = None,
    num_beams: Annotated[Optional[int], typer.Option("--num-beams", help="Beam width (default: the run's).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Tokens per translation.")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Sample instead of greedy/beam (more varied sources).")] = False,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature (implies --sample).")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Sample from the k likeliest tokens (implies --sample).")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass (implies --sample).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seeds sampling.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue after the last complete line of --out.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out.")] = False,
) -> None:
    """Translate target-language text with a reverse model into synthetic (source, target) pairs."""
    from gptkit import augment

    result = augment.backtranslate(augment.Options(
        model=model, data=data, out=out, column=column, batch_size=batch_size, limit=limit, num_beams=num_beams,
        max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        resume=resume, overwrite=overwrite))
    typer.echo(f"wrote {result['pairs']} synthetic pairs to {result['out']}; skipped {result['skipped_empty']} "
               f"of {result['sentences']} sentences whose back-translation came out empty")


@app.command()
def sweep(
    recipe: RecipeArg,
    space: Annotated[str, typer.Option("--space", help="Search space YAML: recipe fields -> distributions, metric, trials.")],
    overrides: Overrides = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Sweep folder (default: sweeps/<recipe name>).")] = None,
    storage: Annotated[Optional[str], typer.Option("--storage", help="Shared study database (postgresql://..., sqlite:///..., journal:PATH) for several workers.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the sweep in --out (an interrupted trial runs again).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the sweep already in --out.")] = False,
) -> None:
    """Hyperparameter search with Optuna: each trial is a gptkit run in OUT/trial-NNN (needs gptkit[sweep])."""
    from gptkit import sweep as sw

    path = resolve_recipe_path(recipe)
    folder = Path(out) if out else Path("sweeps") / path.stem
    result = sw.run(path, overrides or [], Path(space), folder, storage=storage, resume=resume, overwrite=overwrite)
    rows = result["trials"]
    if rows:
        cols = [c for c in rows[0] if c not in ("run_dir", "error", "worker")]
        typer.echo(" | ".join(cols))
        for r in rows:
            typer.echo(" | ".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    best = result.get("best")
    if not best:  # a sweep without a result is a failed command (exit 2 when every trial failed with a user error)
        typer.echo(f"error: no trial finished ({len(rows)} trial(s): {', '.join(sorted({r['state'] for r in rows}))}); "
                   f"their errors are in {result['out']}/trials.csv and the trial-NNN.log files", err=True)
        raise typer.Exit(2 if result["user_errors_only"] else 1)
    typer.echo(f"best: trial {best['trial']}, {result['metric']} {best['value']:.6g}; wrote {result['out']}: "
               "trials.csv, best.yaml, history.png")


@app.command()
def validate(recipe: RecipeArg, overrides: Overrides = None) -> None:
    """Resolve and check a recipe without training: inputs exist, model size, memory, launch line."""
    from gptkit.recipe import recipe_to_yaml
    from gptkit import pretrain as task
    from gptkit import distill, rundir, tracking

    rec = _load(recipe, overrides)
    run_dir = rundir.resolve_output(rec.output.dir)
    rundir.check_writable(run_dir, "output.dir")  # what the run would find first
    tracking.check(rec.train.trackers, run_dir)
    if rec.task != "pretrain":
        from gptkit import finetune as ft

        lines = ft.describe(rec, rec.task)
        teacher = distill.validate_line(rec, None)
        typer.echo(recipe_to_yaml(rec).rstrip())
        typer.echo("---")
        typer.echo("\n".join(lines))
    else:
        plan = task.check(rec, describe=True)
        teacher = None if plan.init_only else distill.validate_line(rec, plan.train_files)
        typer.echo(recipe_to_yaml(rec).rstrip())
        typer.echo("---")
        typer.echo(f"inputs: {len(plan.train_files)} train file(s), {len(plan.val_files)} validation file(s): all found")
        typer.echo(f"model: {rec.model.arch}, {plan.n_params:,} parameters (vocabulary {plan.vocab_size}{plan.vocab_note})")
        if plan.init_only:
            typer.echo(f"run: gptkit init {shlex.join([recipe, *(overrides or [])])}  (an untrained encoder-decoder and "
                       f"its tokenizer in {plan.run_dir}; `gptkit finetune` translate or summarize trains it)")
            return
        typer.echo(f"estimated training memory per process: {plan.memory_bytes / 2**30:.2f} GiB "
                   f"(fp32 weights, grads, AdamW state, activations of {rec.train.batch_size} x {rec.model.context} "
                   f"tokens{', gradient checkpointing' if rec.train.gradient_checkpointing else ''})")
    if teacher:
        typer.echo(f"teacher: {teacher}")
    where = tracking.destinations(rec.train.trackers, run_dir)
    typer.echo(f"metrics: {run_dir / 'metrics.jsonl'}" + (f"; trackers: {', '.join(where)}" if where else ""))
    args = shlex.join([recipe, *(overrides or [])])  # the same launch lines for every task, pasteable into a shell
    command = "pretrain" if rec.task == "pretrain" else "finetune"
    typer.echo(f"launch: accelerate launch --num_processes 1 -m gptkit {command} {args}")
    typer.echo(f"    or: torchrun --nproc_per_node 1 -m gptkit {command} {args}")


@app.command()
def generate(
    model_dir: Annotated[str, typer.Argument(help="A gptkit run directory, any local model directory, or a Hugging Face hub id "
                                          "(ORG/NAME[@REV]).")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 100,
    sample: Annotated[bool, typer.Option("--sample", help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature (implies --sample); 0 is greedy "
                                                         "decoding, as in gptkit serve and the OpenAI API.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Sample from the k likeliest tokens (implies --sample).")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass (implies --sample).")] = None,
    num_beams: Annotated[int, typer.Option(help="Beam search width (1 = no beam search).")] = 1,
    repetition_penalty: Annotated[float, typer.Option(help="Penalty > 1 discourages repeats.")] = 1.0,
    num_samples: Annotated[int, typer.Option(help="Sequences to return.")] = 1,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling.")] = None,
) -> None:
    """Continue a prompt with a trained model: greedy, beam, temperature, top-k, top-p; streams tokens.

    An encoder-decoder model (T5, BART) reads the prompt and prints only its output."""
    from gptkit import generation

    generation.check_text(prompt, "--prompt")
    do_sample, temperature = generation.sampling_rule(sample or top_k is not None or top_p is not None, temperature)
    opts = generation.DecodingOptions(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_beams=num_beams,
        repetition_penalty=repetition_penalty,
        num_return_sequences=num_samples,
        seed=seed,
    )
    opts.validate()
    from gptkit import trained

    model, tokenizer = trained.load_lm(model_dir)
    generation.stream(model, tokenizer, prompt, opts)


@app.command()
def serve(
    model_dir: Annotated[str, typer.Argument(help="A gptkit run, its best/, or a local/cached hub model directory.")],
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port; the log line says which).")] = 8000,
    name: Annotated[Optional[str], typer.Option(help="Model name clients use (default: the folder's name).")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="GPTKIT_API_KEY",
                                                   help="Require 'Authorization: Bearer KEY' on /v1/ routes.")] = None,
    max_batch: Annotated[int, typer.Option(help="Most sequences generated together in one batch.")] = 32,
    wait_ms: Annotated[float, typer.Option(help="How long the first request of a batch waits for others.")] = 5.0,
    max_tokens: Annotated[int, typer.Option(help="Most tokens one completion may ask for.")] = 1024,
    max_request_bytes: Annotated[int, typer.Option(help="Largest request body accepted.")] = 1 << 20,
    drain_seconds: Annotated[float, typer.Option(help="On SIGTERM, how long in-flight requests may finish.")] = 30.0,
    generation_config: Annotated[bool, typer.Option(
        help="Sampling a request leaves out (temperature, top_p, top_k, repetition_penalty) from the model's "
             "generation_config.json, as vLLM does; --no-generation-config: OpenAI's defaults.")] = True,
) -> None:
    """Serve a model over HTTP: OpenAI-compatible completions and chat (streaming too), and a fine-tuned run's
    task (POST /v1/classify, /v1/qa, /v1/translate, /v1/summarize). Needs gptkit[serve]."""
    from gptkit import serve as serving

    serving.run(model_dir, host=host, port=port, name=name, api_key=api_key, max_batch=max_batch, wait_ms=wait_ms,
                max_tokens=max_tokens, max_request_bytes=max_request_bytes, drain_seconds=drain_seconds,
                generation_config=generation_config)


@app.command()
def quantize(
    model_dir: Annotated[str, typer.Argument(help="A gptkit run, its best/, or a local/cached hub model directory.")],
    method: Annotated[str, typer.Option(help="int8 (per-channel int8 weights) or int4 (groups of 32).")] = "int8",
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: <model>-<method>).")] = None,
) -> None:
    """Post-training weight quantization with torchao into a folder that from_pretrained, eval, generate and serve
    load (GPT-2's Conv1D layers rewritten as nn.Linear first). Needs gptkit[quantize]."""
    from gptkit import quantize as quantizing

    target = out or Path(f"{str(model_dir).rstrip('/')}-{method}")
    quantizing.run(model_dir, method, target)


@app.command()
def prune(
    model_dir: Annotated[str, typer.Argument(help="A gptkit run, its best/, or a local/cached hub model directory.")],
    mlp: Annotated[Optional[float], typer.Option(help="Share of feed-forward neurons removed from every block.")] = None,
    layers: Annotated[Optional[int], typer.Option(help="Whole blocks removed (those the loss misses least).")] = None,
    heads: Annotated[Optional[float], typer.Option(help="Share of attention heads removed from every block "
                                                   "(Llama-style models).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: <model>-pruned).")] = None,
    data: Annotated[Optional[str], typer.Option(help="Text to measure importance on (default: the run's data).")] = None,
    batches: Annotated[int, typer.Option(help="Batches the importance is summed over.")] = 8,
) -> None:
    """Structured pruning: remove the least important blocks (--layers), attention heads (--heads) and/or feed-forward
    neurons (--mlp) into a smaller checkpoint that plain transformers loads; fine-tune it afterwards to recover."""
    from gptkit import prune as pruning

    pruning.run(model_dir, out or Path(f"{str(model_dir).rstrip('/')}-pruned"), mlp=mlp, heads=heads, layers=layers,
                data=data, batches=batches)


@recipes_app.callback()
def recipes_list(ctx: typer.Context) -> None:
    """List the bundled recipes with their one-line descriptions."""
    if ctx.invoked_subcommand is not None:
        return
    import yaml

    root = bundled_recipes_dir()
    for path in sorted(root.rglob("*.yaml")):
        if path.name.startswith("_") or path.relative_to(root).parts[0] == LAUNCHER_CONFIGS:
            continue
        desc = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        typer.echo(f"{str(path.relative_to(root).with_suffix('')):<28} {desc}")


@recipes_app.command("schema")
def recipes_schema() -> None:
    """Print every recipe field with its default and meaning (from the schema itself)."""
    from gptkit.recipe import schema_reference

    typer.echo(schema_reference())


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="Bundled recipe name, e.g. pretrain/tiny.")]) -> None:
    """Print a bundled recipe file as written."""
    typer.echo(resolve_recipe_path(name).read_text().rstrip())


TRAINING_COMMANDS = ("pretrain", "finetune", "distill")  # the commands that run on every process of a launch


def _env_int(name: str, default: int) -> int:
    """A launcher's variable (torchrun and accelerate set them): set by hand to text, it is the user's error."""
    value = os.environ.get(name, str(default))
    try:
        number = int(value)
    except ValueError:
        raise UserError(f"environment variable {name}: expected a non-negative integer (set by torchrun or accelerate "
                        f"launch), got {value!r}") from None
    if number < 0:
        raise UserError(f"environment variable {name}: expected a non-negative integer, got {value!r}")
    return number


def _idle_rank(args: list[str]) -> bool:
    """Under torchrun / accelerate launch, a command that does not train (eval, generate, augment, ...) runs on the
    main process alone: the others exit at once (each used to repeat the work and append to the same files)."""
    world, rank, local = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    for name, value in (("RANK", rank), ("LOCAL_RANK", local)):
        if "WORLD_SIZE" in os.environ and value >= max(world, 1):  # (a launcher sets them together)
            raise UserError(f"environment variable {name}: {value} is not below WORLD_SIZE {world} (a launcher sets "
                            "them together; unset them to run one process)")
    command = next((a for a in args if not a.startswith("-")), None)
    if world <= 1 or command in TRAINING_COMMANDS:
        return False
    if rank == 0:
        logging.getLogger("gptkit").info("%s runs on the main process; the launch's %d other processes have nothing "
                                         "to do", command, world - 1)
    return rank != 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps user errors to exit code 2 with one line, keeps tracebacks for bugs."""
    try:  # recent typer vendors click; older ones use the click package
        from typer._click.exceptions import UsageError
    except ImportError:
        from click.exceptions import UsageError

    _setup_offline_and_logging()
    try:
        if _idle_rank(argv if argv is not None else sys.argv[1:]):
            sys.exit(0)
        code = app(args=argv, prog_name="gptkit", standalone_mode=False)
    except UsageError as e:
        ctx = f" (gptkit {e.ctx.info_name})" if e.ctx and e.ctx.info_name != "gptkit" else ""
        typer.echo(f"error: {e.format_message()}{ctx}; see --help", err=True)
        sys.exit(2)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except TrainingStopped as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(3)
    except Interrupted as e:
        typer.echo(f"{e}. Resume with the same command plus --resume.", err=True)
        sys.exit(128 + e.signum)
    except typer.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
