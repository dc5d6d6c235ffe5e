"""The pretraining runner (beside :mod:`gptkit.finetune`): tokenizer + causal LM from scratch (or continued)
on local text.

Verbs: ``check`` (read-only validation, used by ``gptkit validate``) and ``run`` (tokenizer and data,
train through :func:`gptkit.engine.fit`, save through :mod:`gptkit.trained`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from gptkit import corpus
from gptkit import data as data_mod
from gptkit import modeling, rundir, tracking, trained
from gptkit.errors import UserError
from gptkit.recipe import Recipe
from gptkit.tokenizer import build_tokenizer, load_local

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What ``gptkit validate`` prints: the checked inputs and the model's size."""

    run_dir: Path
    train_files: list[str]
    val_files: list[str]
    n_params: int
    memory_bytes: int
    vocab_size: int
    vocab_note: str
    init_only: bool = False  # an encoder-decoder: built by `gptkit init`, trained by `gptkit finetune`


CONTINUE_WITH_ITS_TOKENIZER = ("tokenizer.kind: continuing from model.init_from needs the checkpoint's tokenizer (set "
                               "tokenizer.kind: pretrained and tokenizer.path to the checkpoint directory)")


def check(recipe: Recipe, *, describe: bool = False) -> Plan:
    """Validate inputs without training or tokenizing: files exist, the model builds (on the meta device).
    ``describe`` (``gptkit validate``): an encoder-decoder recipe is described as ``gptkit init`` builds it instead
    of refused as pretraining refuses it."""
    if recipe.task != "pretrain":
        raise UserError(f"task: '{recipe.task}' recipes run with `gptkit finetune`, not `gptkit pretrain`")
    run_dir = rundir.resolve_output(recipe.output.dir)
    if not recipe.data.train_files:
        raise UserError("data.train_files: empty; list at least one text file or glob")
    train = data_mod.resolve_files(recipe.data.train_files, "data.train_files")
    val = data_mod.resolve_files(recipe.data.val_files, "data.val_files") if recipe.data.val_files else []
    # pretraining keeps its tokenizer and token streams there (fine-tuning goes on without it: data.cached_examples)
    rundir.check_writable(data_mod.cache_root(recipe.data), data_mod.cache_setting(recipe.data))
    tok, mcfg = recipe.tokenizer, recipe.model
    if mcfg.init_from:
        modeling.model_dir(mcfg.init_from, "model.init_from")
        if tok.kind != "pretrained":  # before hours of tokenizing, not after
            raise UserError(CONTINUE_WITH_ITS_TOKENIZER)
    cached = _tokenizer_cache_dir(recipe, train)
    known = None  # the tokenizer itself, where it exists before training
    if tok.kind == "pretrained":
        known, note = load_local(tok.path or "", trust_remote_code=mcfg.trust_remote_code), ""
    elif (cached / "tokenizer.json").is_file():
        known, note = load_local(str(cached)), " (tokenizer already trained on this corpus)"
    if known is not None:
        vocab = len(known)
    elif tok.kind == "bpe":
        vocab, note = tok.vocab_size, " (at most; BPE on a small corpus may stop earlier)"
    else:
        vocab, note = 256, " (character vocabulary: counted when the tokenizer is trained; 256 assumed)"
    init_only = mcfg.arch in modeling.ENCODER_DECODERS and not mcfg.init_from
    if init_only and describe:  # as init builds it: a pad token apart from EOS joins a vocabulary without one
        vocab += 1 if known is None or _needs_own_pad(known) else 0
        config = modeling.build_config(mcfg, vocab, 0, vocab - 1)
    else:
        config = modeling.load_config(mcfg, vocab, 0)
        if mcfg.init_from and known is not None and len(known) > config.vocab_size:
            raise UserError(f"tokenizer.path: its {len(known)} tokens do not fit model.init_from's vocabulary of "
                            f"{config.vocab_size}; continue a checkpoint with its own tokenizer")
        positions = modeling.max_positions(config)  # None: no limit (an attention-free or relative-position model)
        if mcfg.init_from and positions is not None and positions < mcfg.context:
            raise UserError(f"model.context: {mcfg.context} exceeds the checkpoint's {positions} positions")
    n_params = modeling.meta_param_count(config)
    t = recipe.train  # activations of the recipe's context, 16-bit under bf16/fp16 mixed precision
    mem = 0 if init_only else modeling.training_memory_bytes(
        config, n_params, t.batch_size, mcfg.context, 2 if t.precision in ("bf16", "fp16") else 4,
        t.gradient_checkpointing)
    return Plan(run_dir, train, val, n_params, mem, vocab, note, init_only)


def _needs_own_pad(tokenizer) -> bool:
    """An encoder-decoder pads with a token apart from EOS (BART freezes the padding embedding at zero)."""
    return tokenizer.pad_token_id in (None, tokenizer.eos_token_id)


def _tokenizer_cache_dir(recipe: Recipe, files: list[str]) -> Path:
    """Where the tokenizer trained for these files and settings is kept (keyed by their contents' stats)."""
    h = hashlib.sha256(b"tokenizer sample 2\n")  # 2: jsonl units measured, non-string cells refused (a change retrains)
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    t = recipe.tokenizer
    h.update(f"{t.kind}|{t.vocab_size}|{recipe.data.text_column}|{recipe.data.sample_by}|{recipe.model.context}".encode())
    # a sample: its size and seed decide the tokenizer (a parquet file may hold more text than its size on disk)
    if sum(os.path.getsize(f) for f in files) > t.train_bytes or any(f.lower().endswith(".parquet") for f in files):
        h.update(f"|{t.train_bytes}|{recipe.train.seed}".encode())
    return data_mod.cache_root(recipe.data) / "tokenizers" / h.hexdigest()[:24]


def existing_tokenizer(recipe: Recipe, train_files: list[str]):
    """The recipe's tokenizer when one exists without training (tokenizer.kind pretrained, or trained on these
    files before and cached); None when :func:`tokenizer_for` would have to train it."""
    known = recipe.tokenizer.kind == "pretrained" or (_tokenizer_cache_dir(recipe, train_files) / "tokenizer.json").is_file()
    return tokenizer_for(recipe, train_files) if known else None


def tokenizer_for(recipe: Recipe, train_files: list[str], run_dir: Path | None = None):
    """Train (or load from the cache) the recipe's tokenizer; corpus text is streamed in batches.

    ``run_dir`` (on resume) holds the tokenizer the run started with, which then wins.
    """
    from transformers import AutoTokenizer

    tok_cfg = recipe.tokenizer
    if run_dir is not None and (run_dir / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(run_dir))
    if tok_cfg.kind == "pretrained":
        return load_local(tok_cfg.path or "", trust_remote_code=recipe.model.trust_remote_code)
    if recipe.model.init_from:
        raise UserError(CONTINUE_WITH_ITS_TOKENIZER)
    cached = _tokenizer_cache_dir(recipe, train_files)
    if (cached / "tokenizer.json").is_file():
        log.info("using cached tokenizer %s", cached)
        return AutoTokenizer.from_pretrained(str(cached))
    settings = data_mod.text_settings(recipe.data)
    units = corpus.plan(train_files, settings)
    chosen = corpus.sample(units, tok_cfg.train_bytes, recipe.train.seed)
    total, used = sum(u.size for u in units), sum(u.size for u in chosen)
    log.info("training the %s tokenizer on %s of %s corpus bytes (%.0f%%%s)", tok_cfg.kind, _mb(used), _mb(total),
             100 * used / max(total, 1), f", a sample seeded {recipe.train.seed}: tokenizer.train_bytes" if used < total
             else "")
    tok = build_tokenizer(tok_cfg, corpus.texts(chosen, settings), recipe.model.context)
    tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp")
    tok.save_pretrained(str(tmp))
    (tmp / "gptkit_tokenizer_training.json").write_text(json.dumps(
        {"kind": tok_cfg.kind, "corpus_bytes": total, "sample_bytes": used, "seed": recipe.train.seed,
         "files": train_files}, indent=1))
    if cached.exists():  # another process finished first; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, cached)
    log.info("trained %s tokenizer: %d tokens", tok_cfg.kind, len(tok))
    return tok


def init(recipe: Recipe, *, overwrite: bool = False, command: list[str] | None = None) -> tuple[Path, int]:
    """An untrained model of the recipe's arch and shape — GPT-2, Llama, or the encoder-decoders BART and T5 — saved
    with its tokenizer (trained on ``data.train_files`` as pretraining trains it, plus a pad token apart from EOS for
    an encoder-decoder): the base ``gptkit finetune`` trains from nothing. Returns the folder and parameter count."""
    from accelerate.utils import set_seed

    if recipe.model.init_from:
        raise UserError("model.init_from: init builds a new model; unset it (a checkpoint is fine-tuned directly)")
    plan = check(recipe, describe=True)  # task, files and shape, as validate checks them
    run_dir = plan.run_dir
    rundir.check(run_dir, recipe, resume=False, overwrite=overwrite, force=False, resumable=False)
    tokenizer = tokenizer_for(recipe, plan.train_files)
    if recipe.model.arch in modeling.ENCODER_DECODERS and _needs_own_pad(tokenizer):
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    config = modeling.build_config(recipe.model, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    set_seed(recipe.train.seed)
    model = modeling.build_model(recipe.model, config, len(tokenizer))
    with rundir.new_run(run_dir, recipe, overwrite=overwrite, command=command or []):
        trained.save(model, tokenizer, run_dir)
    return run_dir, sum(p.numel() for p in model.parameters())


def prepare(recipe: Recipe) -> dict:
    """The tokenizer and the token streams in the cache, without training (the data half of :func:`run`): run
    once before a multi-process launch, whose rank 0 would otherwise tokenize while the others wait at a
    barrier (and time out on a very large corpus)."""
    plan = check(recipe)
    tokenizer = tokenizer_for(recipe, plan.train_files)
    train, val = data_mod.pretrain_splits(recipe.data, tokenizer, recipe.model.context, recipe.train.seed)
    return {"train_tokens": len(train.stream), "val_tokens": len(val.stream) if val else 0,
            "cache": data_mod.cache_root(recipe.data)}


def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def run(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, force: bool = False,
        command: list[str] | None = None) -> dict:
    """Pretrain as the recipe says; the run directory ends up loadable by plain transformers."""
    from accelerate.utils import set_seed
    from transformers.utils import logging as hf_logging

    from gptkit import engine

    hf_logging.disable_progress_bar()
    plan = check(recipe)
    rundir.check(plan.run_dir, recipe, resume=resume, overwrite=overwrite, force=force)
    accelerator = engine.make_accelerator(recipe.train, recipe.distributed)
    with accelerator.main_process_first():  # rank 0 tokenizes; the others then read its cache
        tokenizer = tokenizer_for(recipe, plan.train_files, plan.run_dir if resume else None)
        train, val = data_mod.pretrain_splits(recipe.data, tokenizer, recipe.model.context, recipe.train.seed)
    config = modeling.load_config(recipe.model, len(tokenizer), tokenizer.eos_token_id)
    set_seed(recipe.train.seed)
    model = modeling.build_model(recipe.model, config, len(tokenizer))
    modeling.trainable_precision(model, "full")
    n_params = sum(p.numel() for p in model.parameters())
    engine.check_batch(recipe.train, len(train), accelerator.num_processes)
    smoothing = recipe.train.label_smoothing
    loss_fn = partial(engine.causal_lm_loss, smoothing=smoothing) if smoothing else None
    if recipe.distill.teacher:
        from gptkit import distill

        teacher = distill.load_teacher(recipe, tokenizer, accelerator.device)
        loss_fn = distill.loss_fn(engine.causal_lm_where, teacher, recipe.distill.temperature, recipe.distill.alpha,
                                  smoothing=smoothing)
    rundir.check_disk_space(plan.run_dir, n_params, recipe.train.keep_last)
    fresh = accelerator.is_main_process and not resume  # a resumed run has its tokenizer already
    with rundir.new_run(plan.run_dir, recipe, overwrite=overwrite, command=command or [], make=fresh):
        if fresh:
            tokenizer.save_pretrained(str(plan.run_dir))
        accelerator.wait_for_everyone()
        log.info("model: %s, %.2fM parameters; %d train / %d val blocks of %d tokens", config.model_type,
                 n_params / 1e6, len(train), len(val) if val else 0, recipe.model.context)
        job = engine.Job(model=model, train_data=train, val_data=val, cfg=recipe.train, run_dir=plan.run_dir,
                         resume=resume, loss_fn=loss_fn, eval_loss_fn=engine.causal_lm_loss,
                         distributed=recipe.distributed,
                         on_resumed=partial(rundir.resumed, plan.run_dir, recipe, command or []),
                         on_saved=partial(rundir.started, plan.run_dir))
        metrics = engine.fit(job, accelerator)
    save = lambda m, folder, state: trained.save(m, None, folder, state)  # noqa: E731 - the tokenizer is there
    engine.save_model(accelerator, model, plan.run_dir, save)
    if accelerator.is_main_process:
        tracking.plot(plan.run_dir)
    return metrics
