"""``gptkit prune RUN --mlp FRACTION --out DIR``: structured pruning that makes the model smaller and faster, not
merely sparse: the same share of feed-forward neurons is removed from every block (GPT-2 ``n_inner``, Llama
``intermediate_size``), so the result is an ordinary, smaller checkpoint that plain transformers loads.

A neuron's importance is the first-order estimate of the loss change its removal causes, ``|sum a * dL/da|`` over
the tokens of a few batches (Molchanov et al. 2017): the activations and gradients of the feed-forward output
projection's input. Batches come from the run's own training rows (a fine-tuned generative run: its task's
prompts and targets) or, for a pretraining run or a plain model, from ``--data`` (text) or the recipe's corpus.
A fine-tuned run's recipe goes with the result, so ``gptkit eval`` scores it alike and ``gptkit finetune`` can
recover what was lost (``model.init_from=DIR``).

Attention heads are not pruned: transformers 5 dropped ``prune_heads`` (and ``head_mask``), and GPT-2 and Llama
configs give every block the same head count, tied to the model width in GPT-2, so a checkpoint with fewer heads
would not load; ``--heads`` says so in one line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from gptkit.errors import UserError

log = logging.getLogger(__name__)

HEADS_MESSAGE = ("--heads: transformers 5 removed head pruning (prune_heads, head_mask) and GPT-2/Llama configs give "
                 "every block the same head count (GPT-2: heads x head size = width), so a model with fewer heads "
                 "would not load; prune feed-forward neurons with --mlp FRACTION")


def _mlp_parts(model: Any) -> list[tuple[Any, str]]:
    """Per block: the feed-forward module and its kind ("gpt2": c_fc/c_proj Conv1D; "llama": gate/up/down)."""
    base = getattr(model, "transformer", None) or getattr(model, "model", None)
    blocks = getattr(base, "h", None) or getattr(base, "layers", None)
    parts = []
    for block in blocks or []:
        mlp = block.mlp
        kind = "gpt2" if hasattr(mlp, "c_fc") else "llama" if hasattr(mlp, "down_proj") else None
        if kind is None:
            break
        parts.append((mlp, kind))
    if not parts or len(parts) != len(blocks):
        raise UserError(f"RUN: {type(model).__name__} is not a GPT-2 or Llama-style model; gptkit prune shrinks those")
    return parts


def _down(mlp, kind: str):
    return mlp.c_proj if kind == "gpt2" else mlp.down_proj


def importance(model: Any, batches: list[dict], loss_fn) -> list[torch.Tensor]:
    """Per block, per feed-forward neuron: |sum over tokens of activation x gradient| of the loss."""
    parts = _mlp_parts(model)
    acts: list[torch.Tensor | None] = [None] * len(parts)
    scores = [torch.zeros(_width(m, k)) for m, k in parts]

    def keep(i):
        def hook(module, inputs):
            acts[i] = inputs[0]
            acts[i].retain_grad()
        return hook

    handles = [_down(m, k).register_forward_pre_hook(keep(i)) for i, (m, k) in enumerate(parts)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for i, a in enumerate(acts):
                scores[i] += (a * a.grad).detach().flatten(0, -2).sum(0).abs().float().cpu()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return scores


def _width(mlp, kind: str) -> int:
    return mlp.c_fc.weight.shape[1] if kind == "gpt2" else mlp.up_proj.weight.shape[0]


def shrink(model: Any, keep: list[torch.Tensor]) -> Any:
    """A new model of the same class whose block i keeps the feed-forward neurons ``keep[i]`` (same count each)."""
    parts = _mlp_parts(model)
    width = len(keep[0])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prefix = {id(m): name for name, m in model.named_modules()}
    for (mlp, kind), idx in zip(parts, keep):
        name = prefix[id(mlp)]
        if kind == "gpt2":  # Conv1D weights are (in, out)
            state[f"{name}.c_fc.weight"] = state[f"{name}.c_fc.weight"][:, idx]
            state[f"{name}.c_fc.bias"] = state[f"{name}.c_fc.bias"][idx]
            state[f"{name}.c_proj.weight"] = state[f"{name}.c_proj.weight"][idx, :]
        else:
            for proj in ("gate_proj", "up_proj"):
                state[f"{name}.{proj}.weight"] = state[f"{name}.{proj}.weight"][idx, :]
            state[f"{name}.down_proj.weight"] = state[f"{name}.down_proj.weight"][:, idx]
    config = model.config.__class__.from_dict(model.config.to_dict())
    setattr(config, "n_inner" if parts[0][1] == "gpt2" else "intermediate_size", width)
    smaller = model.__class__(config)
    smaller.load_state_dict(state, strict=True)
    smaller.generation_config = model.generation_config
    return smaller.eval()


def _batches(model, tok, run, data: str | None, n_batches: int, batch_size: int):
    """(batches, loss function): the run's training examples for a generative fine-tune, else blocks of text."""
    from gptkit import engine
    from gptkit.eval_report import read_text
    from gptkit.modeling import context_length

    if run is not None and run.task in ("translate", "summarize", "qa", "multitask") and not data:
        from gptkit import finetune, tasks
        from gptkit.tasks import generative as gen

        task = tasks.load(run.task)
        rows = finetune._splits(run, task)["train"][: n_batches * batch_size]
        examples = task.preprocess(run, tok, rows, "train", model)
        return [examples.batch(list(range(i, min(len(rows), i + batch_size))))
                for i in range(0, len(rows), batch_size)], gen.loss
    files = [data] if data else [f for f in run.data.train_files if f.endswith(".txt")] if run is not None else []
    if not files:
        raise UserError("--data: a text file to measure neuron importance on (this model has no .txt corpus)")
    text = "\n".join(read_text(Path(f), "--data")[: 2_000_000] for f in files)
    ctx = min(context_length(model.config), 256)
    ids = torch.tensor(tok(text)["input_ids"][: n_batches * batch_size * (ctx + 1)])
    blocks = ids[: len(ids) // (ctx + 1) * (ctx + 1)].view(-1, ctx + 1)
    if not len(blocks):
        raise UserError(f"--data: {files[0]} is too short (fewer than {ctx + 1} tokens)")
    batches = [{"input_ids": b[:, :-1], "labels": b[:, 1:]} for b in blocks.split(batch_size)]
    return batches, engine.causal_lm_loss


def run(source: str, out: Path, *, mlp: float | None, heads: float | None, data: str | None = None,
        batches: int = 8, batch_size: int = 8) -> dict:
    from gptkit import hub, trained

    if heads is not None:
        raise UserError(HEADS_MESSAGE)
    if mlp is None or not 0 < mlp < 1:
        raise UserError(f"--mlp: expected the share of feed-forward neurons to remove, in (0, 1); got {mlp}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out: {out} is not empty; choose a new directory")
    path = hub.resolve(source, "RUN").path
    model, tok, run_recipe = trained.load_any(source, "RUN")
    if run_recipe is not None and trained.has_head(run_recipe.task, run_recipe):
        raise UserError(f"RUN: {path} is a {run_recipe.task} model with a task head; gptkit prune takes language models")
    model = model.cpu()
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    parts = _mlp_parts(model)
    width = _width(*parts[0])
    kept = max(1, round(width * (1 - mlp)))
    sample, loss_fn = _batches(model, tok, run_recipe, data, batches, batch_size)
    scores = importance(model, sample, loss_fn)
    keep = [s.topk(kept).indices.sort().values for s in scores]
    before = sum(p.numel() for p in model.parameters())
    smaller = shrink(model, keep)
    after = sum(p.numel() for p in smaller.parameters())
    out.mkdir(parents=True, exist_ok=True)
    smaller.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    trained.write_recipe(run_recipe, out)
    record = {"source": str(path), "mlp": mlp, "neurons_per_block": [width, kept], "parameters": [before, after],
              "importance": "|sum activation x gradient| over %d batches" % len(sample)}
    (out / "prune.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("prune: %s -> %s: feed-forward %d -> %d neurons per block; %.2fM -> %.2fM parameters (%.0f%%)", path,
             out, width, kept, before / 1e6, after / 1e6, 100 * after / before)
    return record
