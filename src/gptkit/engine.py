"""The one training loop. Every command that trains calls :func:`fit`; tasks only supply data and a loss.

Design choices that make runs reproducible and resumable:
- Data order is a pure function of (seed, step): a seeded permutation per epoch over example
  indices, cut into global batches of ``batch_size × processes × grad_accum``. Rank r's micro-batch m
  of step s is a fixed slice of it, so a 2-process run sees exactly the examples of a 1-process run
  with the same global batch, and a resumed run needs only the step number.
- The learning rate is a pure function of the step (:func:`lr_at`), set on the optimizer each step.
- Checkpoints (see :mod:`gptkit.checkpoint`) are atomic and hold weights, optimizer and RNG states.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit import checkpoint, distributed, modeling
from gptkit.errors import Interrupted, TrainingStopped, UserError
from gptkit.recipe import DistributedConfig, TrainConfig
from gptkit.tracking import Tracker

log = logging.getLogger(__name__)


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``it`` (0-based): linear warmup, then cosine/linear decay to min_lr."""
    if it < cfg.warmup_steps:
        return cfg.lr * (it + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    ratio = min(1.0, (it - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio)) if cfg.schedule == "cosine" else 1.0 - ratio
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights), never on biases and norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def causal_lm_where(batch: dict) -> tuple[None, torch.Tensor, dict]:
    """What a pretraining block scores — every position (None), against its labels (already shifted, see
    :class:`gptkit.data.Blocks`) — and the model's inputs: the arguments of :func:`gptkit.modeling.scored_cross_entropy`."""
    return None, batch["labels"].flatten(), {"input_ids": batch["input_ids"]}


def causal_lm_loss(model, batch: dict, smoothing: float = 0.0) -> torch.Tensor:
    """Summed next-token cross-entropy, ``smoothing`` its label smoothing (the output layer fused with the loss where
    the model allows: :func:`gptkit.modeling.scored_cross_entropy`)."""
    keep, targets, inputs = causal_lm_where(batch)
    return modeling.scored_cross_entropy(model, keep, targets, smoothing=smoothing, **inputs)


def all_tokens(batch: dict) -> int:
    """What :func:`causal_lm_loss` sums over: every label."""
    return batch["labels"].numel()


class DataOrder:
    """A seeded permutation per epoch, read as one endless stream of example indices."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _perm_for(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def take(self, pos: int, count: int) -> tuple[list[int], list[int]]:
        """Example indices at stream positions [pos, pos+count), and the epoch each belongs to."""
        epochs = [p // self.n for p in range(pos, pos + count)]
        return [int(self._perm_for(e)[p % self.n]) for e, p in zip(epochs, range(pos, pos + count))], epochs


class _StopOnSignal:
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit. Second: exit at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        log.warning("%s received: checkpointing after this step (send again to exit at once)", signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def make_accelerator(train: TrainConfig, dist: DistributedConfig | None = None):
    """An Accelerator with the recipe's precision ('auto' = bf16 where the GPU supports it) and its sharding
    strategy (:func:`gptkit.distributed.accelerator_kwargs`)."""
    from accelerate import Accelerator

    precision = train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("bf16", "fp16") and not torch.cuda.is_available():
        raise UserError(f"train.precision: {precision} needs a GPU; use fp32 or auto on this machine")
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (Ampere+); no effect on CPU
    torch.backends.cudnn.allow_tf32 = True
    extra = distributed.accelerator_kwargs(train, dist) if dist is not None else {}
    return Accelerator(mixed_precision="no" if precision == "fp32" else precision, cpu=not torch.cuda.is_available(),
                       **extra)


@contextmanager
def own_forward(model):
    """Run ``model`` with its own forward instead of accelerate's mixed-precision wrapper (autocast around
    every call). For evaluation: generation is launch-bound, and per-op autocast casts made it 3.9x slower
    on an H100 (96 SciTLDR summaries, beam 4, GPT-2 small: 12.8 s under bf16 autocast, 3.3 s in fp32); it
    also makes validation metrics those of the fp32 weights that are saved and that `gptkit eval` scores."""
    original = model.__dict__.get("_original_forward")
    if original is None:
        yield model
        return
    wrapped = model.__dict__["forward"]
    model.forward = original
    try:
        yield model
    finally:
        model.forward = wrapped


@dataclass
class Job:
    """What a task hands to :func:`fit`.

    ``train_data`` offers ``len()`` and ``batch(indices, epochs)`` (the epoch of each index, for data that
    varies per epoch); ``val_data`` offers ``len()`` and ``batch(indices)``.

    ``loss_fn(model, batch)`` returns a loss *summed* over items (target tokens, or examples) and
    ``count_fn(batch)`` the number of those items, read off the batch alone. A step divides the summed loss
    by the items of all its micro-batches on all processes (as transformers' ``num_items_in_batch``), so
    gradient accumulation and process count never change the gradient. Validation uses ``eval_loss_fn`` /
    ``eval_count_fn`` (default: the training pair), and reports their ratio as ``val_loss``.
    """

    model: torch.nn.Module
    train_data: Any
    val_data: Any | None
    cfg: TrainConfig
    run_dir: Path
    loss_fn: Callable[[Any, dict], torch.Tensor] | None = None  # summed; None: next-token cross-entropy
    count_fn: Callable[[dict], int] | None = None  # items loss_fn sums over; None: every label (all_tokens)
    eval_loss_fn: Callable[[Any, dict], torch.Tensor] | None = None  # validation pair (None: the training one)
    eval_count_fn: Callable[[dict], int] | None = None
    resume: bool = False
    evaluate: Callable[[Any], dict[str, float]] | None = None  # task metrics on validation (model unwrapped;
    # called on every process, which may each predict a shard)
    select: str | None = None  # logged metric that picks the best model, saved to run_dir/best
    select_higher: bool | None = None  # its direction (None: lower for val_loss / val_perplexity, higher otherwise)
    perplexity: bool = True  # val_perplexity beside val_loss: a language model's loss (not a task head's)
    patience: int | None = None  # stop after this many evaluations without a better `select`
    save: Callable[..., None] | None = None  # save(model, folder, state_dict): writes a model folder (best/), from
    # state_dict when not None (gathered from shards); None: save_pretrained
    distributed: DistributedConfig | None = None  # sharding (None: whatever the Accelerator was built with)
    on_resumed: Callable[[], None] | None = None  # main process, once the checkpoint has loaded (records the resume)
    on_saved: Callable[[], None] | None = None  # main process, after each checkpoint (the run has one of its own now)


@torch.no_grad()
def evaluate_loss(model, data, loss_fn, count_fn, batch_size: int, max_batches: int | None, accelerator,
                  lockstep: bool = False, grad_accum: int = 1) -> float:
    """Summed loss / items over ``max_batches`` global validation batches (``batch_size`` x processes x
    ``grad_accum`` examples each, as training's), sharded across processes. A limited evaluation reads a fixed
    seeded sample of the split (the same every time, and for any split of one global batch into processes and
    micro-batches), as nanoGPT estimates on random batches; None reads all of it in order. ``lockstep`` (sharded
    weights): every process runs as many forward passes, the surplus ones discarded."""
    model = model if lockstep else _without_ddp(model)
    model.eval()
    world = accelerator.num_processes
    limit = min(len(data), max_batches * batch_size * world * grad_accum) if max_batches else len(data)
    order = np.arange(len(data)) if limit == len(data) else np.sort(np.random.default_rng(0).permutation(len(data))[:limit])
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    n_batches = math.ceil(limit / batch_size)
    end = math.ceil(n_batches / world) * world if lockstep else n_batches
    for b in range(accelerator.process_index, end, world):
        idx = [int(i) for i in order[b * batch_size : min(limit, (b + 1) * batch_size)]] if b < n_batches else [0]
        batch = data.batch(idx)
        loss = loss_fn(model, to_device(batch, accelerator.device)).item()
        if b < n_batches:
            total += torch.tensor([loss, count_fn(batch)], device=total.device, dtype=total.dtype)
    total = accelerator.reduce(total, "sum")
    model.train()
    return float(total[0] / total[1].clamp(min=1))


def _without_ddp(model):
    """The module DistributedDataParallel wraps: evaluation syncs no gradients, and DDP's forward broadcasts the
    module's buffers (a Llama's rotary inv_freq) on the first call after a training step, a collective a process with
    no validation batch never joins (the two then wait for each other for good). A compiled DDP model is evaluated
    uncompiled."""
    from torch.nn.parallel import DistributedDataParallel

    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return inner.module if isinstance(inner, DistributedDataParallel) else model


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a batch; on GPUs through pinned memory so the copy overlaps the previous step's kernels."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def _loss_metrics(job: Job, model, accelerator, batches: int | None) -> dict[str, float]:
    loss_fn = job.eval_loss_fn or job.loss_fn or causal_lm_loss
    count_fn = job.eval_count_fn or job.count_fn or all_tokens
    val = evaluate_loss(model, job.val_data, loss_fn, count_fn, job.cfg.batch_size, batches, accelerator,
                        lockstep=distributed.lockstep(job.distributed, accelerator), grad_accum=job.cfg.grad_accum)
    return {"val_loss": val, **({"val_perplexity": math.exp(min(val, 50.0))} if job.perplexity else {})}


def _full_final(job: Job, final: bool) -> bool:
    """The last evaluation reads the whole split while the earlier ones read a sample of it."""
    return final and job.cfg.full_final_eval and job.cfg.eval_batches is not None


def _validate(job: Job, model, accelerator, final: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics to log, metrics best/ is judged by). They differ only in the last evaluation of the whole split
    (full_final_eval): best/ compares like with like, the loss on the seeded sample the earlier evaluations read."""
    metrics: dict[str, float] = {}
    judged: dict[str, float] = {}
    if job.val_data is not None:
        metrics = _loss_metrics(job, model, accelerator, None if _full_final(job, final) else job.cfg.eval_batches)
        if _full_final(job, final) and job.select in metrics:
            judged = _loss_metrics(job, model, accelerator, job.cfg.eval_batches)
    if job.evaluate is not None:
        raw = accelerator.unwrap_model(model, keep_torch_compile=False)
        raw.eval()
        with own_forward(raw), distributed.root_gathered(raw):
            metrics.update({f"val_{k}": v for k, v in job.evaluate(raw).items()})
        raw.train()
    if distributed.is_sharded(model):
        distributed.reshard(model)
    if accelerator.num_processes > 1:  # decisions (best, early stop) are the main process's, on every rank
        from accelerate.utils import broadcast_object_list

        metrics, judged = broadcast_object_list([(metrics, judged)], from_process=0)[0]
    return metrics, {**metrics, **judged}


def _track_best(job: Job, model, accelerator, metrics: dict, counters: dict, step: int) -> bool:
    """Save the model to ``best/`` when ``job.select`` improves; True when patience has run out."""
    if not job.select:
        return False
    if job.select not in metrics:
        raise UserError(f"finetune.metric: '{job.select}' is not among the validation metrics {sorted(metrics)}")
    value = metrics[job.select]
    lower = job.select in ("val_loss", "val_perplexity") if job.select_higher is None else not job.select_higher
    best = counters.get("best")
    if math.isfinite(value) and (best is None or (value < best if lower else value > best)):  # NaN: never best
        counters.update(best=value, best_step=step, stale=0, best_metrics=dict(metrics))
        state = distributed.full_state_dict(accelerator, model)  # collective when sharded
        tmp, final, old = job.run_dir / ".best.tmp", job.run_dir / "best", job.run_dir / ".best.old"

        def write() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            write_model(accelerator.unwrap_model(model, keep_torch_compile=False), tmp, state, job.save)
            (tmp / BEST_STEP).write_text(json.dumps({"step": step}) + "\n")  # which evaluation it is (a resume checks)
            if final.exists():  # never a moment without a complete best/ (or its .old twin)
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)

        error = _on_every_process(accelerator, write if accelerator.is_main_process else lambda: None)
        if error is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingStopped(f"could not write {final} (step {step}'s model, the best so far): "
                                  f"{_write_error(error, job.run_dir)}; {_then(job.run_dir / 'checkpoints')}")
        return False
    counters["stale"] = counters.get("stale", 0) + 1
    return job.patience is not None and counters["stale"] >= job.patience


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _on_every_process(accelerator, work: Callable[[], Any]) -> BaseException | None:
    """Every process runs ``work`` (the main one's writes, or each one's own); then all of them learn, in one
    all-reduce, whether any could not write — a full disk on one process stops every process at the same point
    instead of leaving the others waiting in the next collective. The error, or on a process that wrote its part
    a stand-in naming how many others could not. Any other exception (a bug) is agreed the same way, then raised
    where it happened, and the others stop with one line."""
    error = None
    try:
        work()
    except Exception as e:  # noqa: BLE001 - every process must reach the all-reduce; a bug is re-raised after it
        error = e
    if accelerator.num_processes > 1:
        bug = error is not None and not isinstance(error, _WRITE_ERRORS)
        flags = [float(error is not None and not bug), float(bug)]
        unwritten, crashed = (int(n) for n in accelerator.reduce(torch.tensor(flags, device=accelerator.device), "sum"))
        if error is None and crashed:
            raise TrainingStopped(f"{crashed} other process{'es' if crashed > 1 else ''} failed while saving "
                                  "(its error is above)")
        if error is None and unwritten:
            error = OSError(f"{unwritten} other process{'es' if unwritten > 1 else ''} could not write")
    if error is not None and not isinstance(error, _WRITE_ERRORS):
        raise error
    return error


def _then(root: Path) -> str:
    last = checkpoint.latest(root)
    return (f"the last good checkpoint is {last}: free space, then run the same command with --resume" if last
            else "there is no earlier checkpoint: free space, then start again with --overwrite")


def _save(job: Job, step: int, model, opt, accelerator, counters: dict) -> None:
    root = job.run_dir / "checkpoints"
    tmp = checkpoint.tmp_dir(root, step)
    main = accelerator.is_main_process
    for work in (lambda: main and tmp.mkdir(parents=True, exist_ok=True),
                 lambda: _write_checkpoint(job, tmp, step, model, opt, accelerator, counters),
                 lambda: main and checkpoint.finalize(root, step, job.cfg.keep_last)):
        error = _on_every_process(accelerator, work)
        if error is not None:  # a full disk: the torn checkpoint goes, the last good one stays
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingStopped(f"could not write checkpoint {checkpoint.step_dir(root, step).name}: "
                                  f"{_write_error(error, root)}; {_then(root)}")
    if main and job.on_saved is not None:
        job.on_saved()
    accelerator.wait_for_everyone()


def _write_checkpoint(job: Job, tmp: Path, step: int, model, opt, accelerator, counters: dict) -> None:
    """Every process: the sharded state first (a collective, whose errors reach every process), then each one's
    own files."""
    from safetensors.torch import save_model

    sharded = distributed.save_state(tmp, model, opt, accelerator)  # every process writes its shards
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        if not sharded:
            save_model(accelerator.unwrap_model(model, keep_torch_compile=False), str(tmp / "model.safetensors"))
            torch.save(opt.state_dict(), tmp / "optimizer.pt")
        if accelerator.scaler is not None:  # fp16: the loss scale and its growth tracker, for an exact resume
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **counters}))


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError; torch.save's RuntimeError ("basic_ios::clear: iostream error", "unexpected
    pos"), which names no errno; safetensors' own error type."""
    from safetensors import SafetensorError

    return OSError, RuntimeError, SafetensorError


_WRITE_ERRORS = _write_errors()


def _write_error(e: BaseException, where: Path) -> str:
    """The error's first line and the space left where it wrote: one line that says whether the disk is full."""
    from gptkit.rundir import size

    detail = (e.strerror if isinstance(e, OSError) and e.strerror else
              (str(e).strip().splitlines() or [type(e).__name__])[0][:200])
    try:
        free = f"{size(shutil.disk_usage(where if where.exists() else where.parent).free)} free on that disk"
    except OSError:
        free = "free space unknown"
    return f"{detail} ({free} at {where})"


def _load(job: Job, model, opt, accelerator) -> tuple[int, dict, dict]:
    from safetensors.torch import load_model

    root = job.run_dir / "checkpoints"
    ckpt = checkpoint.latest(root)
    if ckpt is None:  # (every one damaged: rundir.check found them)
        from gptkit.rundir import no_checkpoint

        raise UserError(no_checkpoint(root))
    raw = accelerator.unwrap_model(model, keep_torch_compile=False)
    try:
        if not distributed.load_state(ckpt, model, opt, accelerator):
            # several CPU processes report "cpu:0", which safetensors and torch.load refuse
            device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)
            load_model(raw, str(ckpt / "model.safetensors"), device=device)
            opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location=device))
        if accelerator.scaler is not None and (ckpt / "scaler.pt").is_file():
            accelerator.scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=True))
    except (RuntimeError, ValueError, KeyError) as e:  # e.g. --force across a change of model shape
        detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:3])  # torch's first line names nothing
        raise UserError(f"--resume: {ckpt} does not fit this recipe's model ({detail[:240]})") from None
    rng_file = ckpt / f"rng-{accelerator.process_index}.pt"
    rng = torch.load(rng_file if rng_file.exists() else ckpt / "rng-0.pt", weights_only=True)
    state = json.loads((ckpt / "state.json").read_text())
    log.info("resuming from %s (step %d)", ckpt.name, state["step"])
    return state.pop("step"), state, rng


def _restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def write_model(raw, folder: Path, state: dict | None, save: Callable[..., None] | None = None) -> None:
    """Main process: a model folder from the model, or from ``state`` (weights gathered from shards)."""
    if save is not None:
        save(raw, folder, state)
    else:
        raw.save_pretrained(str(folder), state_dict=state)
    if state is not None:
        distributed.plain_architectures(folder)


def save_model(accelerator, model, folder: Path, save: Callable[..., None] | None = None) -> None:
    """Every process calls it: ``folder`` gets the whole model (gathered when sharded), written by the main one."""
    state = distributed.full_state_dict(accelerator, model)
    error = _on_every_process(accelerator, lambda: accelerator.is_main_process and write_model(
        accelerator.unwrap_model(model, keep_torch_compile=False), Path(folder), state, save))
    if error is not None:  # a full disk: the checkpoints hold the trained weights
        last = checkpoint.latest(Path(folder) / "checkpoints")
        then = (f"; checkpoint {last.name} holds the weights: free space, then run the same command with --resume "
                "to write the model" if last else "")
        raise TrainingStopped(f"could not write the model to {folder}: {_write_error(error, Path(folder))}{then}")
    accelerator.wait_for_everyone()


def backward_step(model, batches: list[dict], loss_fn, count_fn, accelerator) -> tuple[torch.Tensor, float]:
    """Accumulate the gradient of one optimizer step over its micro-batches: each summed loss is divided by the
    items of every micro-batch on every process (all-reduced first), so the gradient equals that of the whole
    global batch at once. Returns (this process's summed loss, detached; the global item count)."""
    world = accelerator.num_processes
    local = float(sum(count_fn(b) for b in batches))
    items = float(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum")) if world > 1 else local
    # DDP and FSDP average gradients over processes: world / items makes it a sum / items
    scale = world / max(items, 1.0) * distributed.loss_scale(accelerator)
    loss_sum = torch.zeros((), device=accelerator.device)
    for m, batch in enumerate(batches):
        with distributed.no_sync(accelerator, model, skip=m < len(batches) - 1):
            # the whole loss under the run's autocast, not only the model's forward: the output layer fused with the
            # loss (modeling.scored_cross_entropy) and a distillation teacher run outside the model
            with accelerator.autocast():
                loss = loss_fn(model, to_device(batch, accelerator.device))
            accelerator.backward(loss * scale)
        loss_sum += loss.detach().float()
    return loss_sum, max(items, 1.0)


BEST_STEP = "gptkit_best.json"  # in best/: the step whose model it is


def _forget_newer_best(job: Job, counters: dict, accelerator) -> None:
    """best/ written by the interrupted run after the checkpoint a resume starts from is not the checkpoint's best:
    a resume that never beat the checkpoint's best kept a model of the abandoned steps while reporting another step
    (a changed lr, or GPU nondeterminism). Such a best/ goes, and the resumed run picks its best from its own
    evaluations. (A best/ without its step, from an older gptkit, is kept.)"""
    marker = job.run_dir / "best" / BEST_STEP
    try:
        step = json.loads(marker.read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return
    accelerator.wait_for_everyone()  # every process has read it before the main one removes it
    kept = counters.get("best_step")
    if step == kept:
        return
    for key in ("best", "best_step", "best_metrics"):
        counters.pop(key, None)
    counters["stale"] = 0
    if accelerator.is_main_process:
        log.warning("best/ holds step %s's model, written after the checkpoint this run resumes from (whose best was "
                    "step %s): removed; the best is picked again from here on", step, kept)
        shutil.rmtree(job.run_dir / "best", ignore_errors=True)


def _nonfinite(params: list, like: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """1 when a gradient of ``params`` holds inf or NaN, else 0 (a 1-element tensor like ``like``, for the step's
    all-reduce: no host sync of its own): from clipping's total ``norm`` when there is one, else from each gradient's
    norm (each process its own gradients; FSDP2: its shards)."""
    if norm is not None:
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # (a DTensor under FSDP2)
        return (~torch.isfinite(torch.as_tensor(norm, dtype=torch.float32))).reshape(1).to(like.device, like.dtype)
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in params) if g is not None]
    if not grads:
        return like.new_zeros(1)
    norms = torch.stack([n.float().to(like.device) for n in torch._foreach_norm(grads)])
    return (~torch.isfinite(norms)).any().reshape(1).to(like.dtype)


def _clipper(model, accelerator) -> Callable[[float], Any]:
    """Gradient-norm clipping: torch's own (foreach) on the trainable parameters where Accelerate would do no
    more than call it (no fp16 loss scale to undo, no sharding, no DeepSpeed) — its wrapper cost ~0.8 ms a step,
    3% of a nanoGPT-sized CPU step — else Accelerate's."""
    from accelerate.utils import DistributedType

    plain = accelerator.scaler is None and accelerator.distributed_type in (
        DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU) and not distributed.is_sharded(model)
    if not plain:
        return lambda max_norm: accelerator.clip_grad_norm_(model.parameters(), max_norm)
    params = [p for p in model.parameters() if p.requires_grad]
    return lambda max_norm: torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def check_batch(cfg: TrainConfig, n_examples: int, processes: int) -> None:
    """Refuse a global batch larger than the training set (an epoch would repeat inside one step)."""
    per_step = cfg.batch_size * cfg.grad_accum * processes
    if per_step > n_examples:
        raise UserError(
            f"train.batch_size: {cfg.batch_size} x grad_accum {cfg.grad_accum} x {processes} process(es) = {per_step} "
            f"examples per step, but the training data has only {n_examples}; lower the batch or add data"
        )


def fit(job: Job, accelerator) -> dict[str, float]:
    """Train ``job.model`` for ``cfg.max_steps`` optimizer steps; returns the last logged metrics, and where
    ``job.select`` kept a best model its step (``best_step``) and validation metrics (``best_metrics``)."""
    from tqdm.auto import tqdm

    cfg, main = job.cfg, accelerator.is_main_process
    model, loss_fn, count_fn = job.model, job.loss_fn or causal_lm_loss, job.count_fn or all_tokens
    if main and 0 < cfg.max_steps <= cfg.warmup_steps:  # easy to reach by shortening a bundled recipe's max_steps
        log.warning("train.warmup_steps %d >= train.max_steps %d: the learning rate never reaches train.lr %g (its "
                    "peak is %.2g)", cfg.warmup_steps, cfg.max_steps, cfg.lr, cfg.lr * cfg.max_steps / (cfg.warmup_steps + 1))
    if cfg.gradient_checkpointing:  # transformers 5 renamed it; older releases only have the first name
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    cpu_fsdp = distributed.wants_cpu_fsdp(job.distributed, accelerator)
    if cpu_fsdp:  # before the optimizer: its parameters are the shards
        distributed.shard(model, job.distributed, accelerator.num_processes)
    # the fused kernel is ~3x faster than the per-tensor loop on CPU too (bench/pretrain_throughput.py)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            fused=accelerator.device.type in ("cuda", "cpu"))
    if cpu_fsdp:
        opt = accelerator.prepare(opt)
    else:
        model, opt = accelerator.prepare(model, opt)
    if cfg.compile:
        model = torch.compile(model)
    start, counters, rng = _load(job, model, opt, accelerator) if job.resume else (0, {"bad_steps": 0}, None)
    if job.resume:
        _forget_newer_best(job, counters, accelerator)
    if main:
        checkpoint.clean_partial(job.run_dir / "checkpoints")
        if job.resume and job.on_resumed is not None:
            job.on_resumed()
    clip = _clipper(model, accelerator)
    # a finite loss can still give a non-finite gradient (an overflow in backward): its step is skipped as a
    # non-finite loss's, never applied (fp16's loss scaler skips such steps itself; DeepSpeed keeps its own grads)
    from accelerate.utils import DistributedType

    trainable = [p for p in model.parameters() if p.requires_grad]
    check_grads = accelerator.scaler is None and accelerator.distributed_type != DistributedType.DEEPSPEED
    tracker = Tracker(job.run_dir, main, resume_step=start if job.resume else None, trackers=cfg.trackers)
    order = DataOrder(len(job.train_data), cfg.seed)
    world, rank, accum, B = accelerator.num_processes, accelerator.process_index, cfg.grad_accum, cfg.batch_size
    global_batch = B * world * accum
    # examples of the data order consumed: a resume on another process count (another global batch) goes on from
    # there, neither training on examples again nor skipping any
    done = counters.pop("examples", start * global_batch)
    saved_batch = counters.pop("global_batch", global_batch)
    if main:  # a launcher that quietly started one process shows here (accelerate launch on CPU without --multi_cpu)
        log.info("%d process%s x batch %d x %d accumulation = global batch %d", world, "es" * (world > 1), B, accum,
                 global_batch)
    if job.resume and saved_batch != global_batch:
        log.warning("resuming with global batches of %d examples (%d x %d processes x %d accumulation); the checkpoint's "
                    "were %d: training goes on from example %d of the data order", global_batch, B, world, accum,
                    saved_batch, done)
    # a live bar on a terminal; in logs (CI, clusters) one line per log_every steps instead
    live = main and sys.stderr.isatty()
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not live, unit="step", dynamic_ncols=True)
    t_start = time.perf_counter()
    last: dict[str, float] = {}
    # the running train loss since the last log line is checkpointed: a resume logs the same figures
    run_loss, run_steps = counters.pop("run_loss", 0.0), counters.pop("run_steps", 0)
    tokens, t0 = 0, time.perf_counter()
    first = start + 1
    if counters.get("stopped_early"):  # a finished run: early stopping ended it, a resume has nothing to do
        log.info("the run stopped early at step %d (finetune.patience); nothing left to train", start)
        first = cfg.max_steps + 1
    if rng is not None:
        _restore_rng(rng)
    model.train()  # from_pretrained hands back a model in eval mode: dropout (LoRA's too) would be off
    status = "FINISHED"
    try:  # a tracker run is closed however training ends, and says how it ended
        with _StopOnSignal() as stop:
            for step in range(first, cfg.max_steps + 1):
                lr = lr_at(step - 1, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                batches = [job.train_data.batch(*order.take(done + (step - 1 - start) * global_batch + (m * world + rank) * B, B))
                           for m in range(accum)]
                loss_sum, items = backward_step(model, batches, loss_fn, count_fn, accelerator)
                # one collective per step: the summed loss, tokens (padded batches differ per process) and whether
                # any process got a signal
                local = [float(stop.signum or 0), float(sum(b["input_ids"].numel() for b in batches))]
                # clipping's total norm tells whether a gradient is non-finite (else a norm is taken for it alone);
                # fp16 clips after: its unscale_ must be followed by a step, and a non-finite loss skips it
                clip_first = cfg.grad_clip > 0 and check_grads
                norm = clip(cfg.grad_clip) if clip_first else None
                flags = torch.cat([loss_sum.reshape(1), torch.tensor(local, device=loss_sum.device, dtype=loss_sum.dtype),
                                   _nonfinite(trainable, loss_sum, norm) if check_grads else loss_sum.new_zeros(1)])
                flags = accelerator.reduce(flags, "sum") if world > 1 else flags
                loss_total, signals, step_tokens, bad_grads = flags.tolist()  # one host sync
                step_loss, signum = loss_total / items, int(signals) and (stop.signum or signal.SIGTERM)
                tokens += int(step_tokens)
                what = "loss" if not math.isfinite(step_loss) else "gradient" if bad_grads else None
                if what:  # the update is skipped; the step's log, eval and save are not
                    opt.zero_grad(set_to_none=True)
                    counters["bad_steps"] += 1
                    if counters["bad_steps"] > cfg.skip_nonfinite:
                        last_good = checkpoint.latest(job.run_dir / "checkpoints")
                        then = (f"the last good checkpoint is {last_good}: lower train.lr (or allow skips with "
                                "train.skip_nonfinite) and continue with --resume --force" if last_good else
                                "no checkpoint was written yet: lower train.lr (or allow skips with "
                                "train.skip_nonfinite) and start again")
                        raise TrainingStopped(f"non-finite {what} at step {step}; stopped without saving it; {then}")
                    log.warning("non-finite %s at step %d: batch skipped (%d so far)", what, step, counters["bad_steps"])
                else:
                    if cfg.grad_clip > 0 and not clip_first:
                        clip(cfg.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    run_loss, run_steps = run_loss + step_loss, run_steps + 1
                bar.update(1)
                if (step % cfg.log_every == 0 or step == cfg.max_steps) and run_steps:
                    tok_s = tokens / (time.perf_counter() - t0)
                    last = {"train_loss": run_loss / run_steps, "train_lr": lr, "train_tokens_per_s": tok_s}
                    tracker.log(step, last)
                    bar.set_postfix(loss=f"{last['train_loss']:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}")
                    if main and not live:
                        eta = (time.perf_counter() - t_start) / (step - start) * (cfg.max_steps - step)
                        log.info("step %d/%d: loss %.4f, lr %.2e, %.0f tok/s, ETA %ds", step, cfg.max_steps,
                                 last["train_loss"], lr, tok_s, eta)
                    run_loss, run_steps, tokens, t0 = 0.0, 0, 0, time.perf_counter()
                stop_early = False
                paused = time.perf_counter()  # evaluation and checkpoints do not count in train_tokens_per_s
                if (job.val_data is not None or job.evaluate) and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                    metrics, judged = _validate(job, model, accelerator, final=step == cfg.max_steps)
                    tracker.log(step, metrics)
                    last.update(metrics)
                    if main:
                        msg = f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                        bar.write(msg) if live else log.info(msg)
                    stop_early = _track_best(job, model, accelerator, judged, counters, step)
                    if stop_early:
                        counters["stopped_early"] = True
                if step % cfg.save_every == 0 or step == cfg.max_steps or signum or stop_early:
                    _save(job, step, model, opt, accelerator, {**counters, "run_loss": run_loss, "run_steps": run_steps,
                                                               "examples": done + (step - start) * global_batch,
                                                               "global_batch": global_batch})
                t0 += time.perf_counter() - paused
                if stop_early:
                    log.info("early stopping at step %d: %s has not improved for %d evaluations", step, job.select,
                             job.patience)
                    break
                if signum:
                    raise Interrupted(step, signum)
    except Interrupted:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        bar.close()
        tracker.close(status)
    if counters.get("best_step") is not None:  # the model a run keeps (best/) is that step's, not the last
        last = {**last, "best_step": counters["best_step"], "best_metrics": counters.get("best_metrics", {})}
    return last  # (the caller plots loss.png once the model is saved: tracking.plot)
