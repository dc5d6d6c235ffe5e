"""``gptkit prune RUN [--layers N] [--heads FRACTION] [--mlp FRACTION] --out DIR``: structured pruning that makes the
model smaller and faster, not merely sparse. Whole blocks go (``n_layer`` / ``num_hidden_layers``), then the same
share of attention heads (Llama-style models: ``num_attention_heads``/``num_key_value_heads`` with ``head_dim`` kept)
and of feed-forward neurons (GPT-2 ``n_inner``, Llama ``intermediate_size``) from every remaining block, so the result
is an ordinary, smaller checkpoint that plain transformers loads.

A block's importance is measured: how much the loss rises without it (Minitron's depth criterion). A neuron's or a
head's is the first-order estimate of the loss change its removal causes, ``|sum a * dL/da|`` over the tokens of a
few batches (Molchanov et al. 2017), at the input of the feed-forward / attention output projection; a key/value
head is scored with the query heads that share it and goes with them. Batches come from the run's own training rows (a fine-tuned generative run: its task's
prompts and targets) or, for a pretraining run or a plain model, from ``--data`` (text) or the recipe's corpus.
A fine-tuned run's recipe goes with the result, so ``gptkit eval`` scores it alike and ``gptkit finetune`` can
recover what was lost (``model.init_from=DIR``).

GPT-2's heads are not pruned: transformers 5 dropped ``prune_heads`` (and ``head_mask``), and a GPT-2 config ties
heads x head size to the model width in every block, so a GPT-2 with fewer heads would not load; ``--heads`` says
so in one line there.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from gptkit import rundir
from gptkit.errors import UserError

log = logging.getLogger(__name__)

HEADS_MESSAGE = ("--heads: GPT-2 ties heads x head size to the model width in every block (and transformers 5 removed "
                 "prune_heads), so a GPT-2 with fewer heads would not load; --heads prunes Llama-style models (their "
                 "head_dim is free); prune this one with --layers N or --mlp FRACTION")


def _blocks_of(model: Any) -> tuple[str, Any]:
    """(dotted name, ModuleList) of the transformer blocks: GPT-2 ``transformer.h``, Llama ``model.layers``."""
    for name in ("transformer.h", "model.layers"):
        try:
            return name, model.get_submodule(name)
        except AttributeError:
            continue
    raise UserError(f"RUN: {type(model).__name__} is not a GPT-2 or Llama-style model; gptkit prune shrinks those")


def _rebuild(model: Any, state: dict, **config: Any) -> Any:
    """A new model of ``model``'s class from ``state`` with ``config`` fields changed (strict load: every weight fits)."""
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    for key, value in config.items():
        setattr(cfg, key, value)
    smaller = model.__class__(cfg)
    smaller.load_state_dict(state, strict=True)
    smaller.generation_config = model.generation_config
    return smaller.eval()


def _state(model: Any) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _first_order(model: Any, modules: list, batches: list[dict], loss_fn, group=None) -> list[torch.Tensor]:
    """Per module, per input feature (or per ``group(features)``): ``|sum over a batch's tokens of activation x
    dL/dactivation|`` summed over batches — the first-order estimate of the loss change when that input is zeroed
    (Molchanov et al. 2017: the absolute value per batch, then accumulated)."""
    acts: list[torch.Tensor | None] = [None] * len(modules)
    sums: list[Any] = [0.0] * len(modules)

    def keep(i):
        def hook(module, inputs):
            acts[i] = inputs[0]
            acts[i].retain_grad()
        return hook

    handles = [m.register_forward_pre_hook(keep(i)) for i, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for i, a in enumerate(acts):
                v = (a * a.grad).detach().flatten(0, -2).sum(0).float().cpu()
                sums[i] = sums[i] + (group(v) if group else v).abs()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return sums


# --- whole blocks ---------------------------------------------------------------------------------------------------

def drop_layers(model: Any, drop: list[int]) -> Any:
    """A new model of the same class without the blocks ``drop`` (the others keep their order and weights)."""
    name, blocks = _blocks_of(model)
    kept = [i for i in range(len(blocks)) if i not in set(drop)]
    state = {}
    for key, value in _state(model).items():
        if key.startswith(name + "."):
            index, rest = key[len(name) + 1:].split(".", 1)
            if int(index) in kept:
                state[f"{name}.{kept.index(int(index))}.{rest}"] = value
        else:
            state[key] = value
    changes: dict[str, Any] = {"n_layer" if name == "transformer.h" else "num_hidden_layers": len(kept)}
    if getattr(model.config, "layer_types", None):
        changes["layer_types"] = [model.config.layer_types[i] for i in kept]
    return _rebuild(model, state, **changes)


def layer_importance(model: Any, batches: list[dict], loss_fn) -> list[float]:
    """Per block: the relative rise of the loss on ``batches`` when that block alone is removed (Minitron's depth
    score: measured, not estimated)."""
    def loss() -> float:
        with torch.no_grad():
            return sum(float(loss_fn(model, b)) for b in batches)

    name, blocks = _blocks_of(model)
    parent_name, attr = name.rsplit(".", 1)
    parent = model.get_submodule(parent_name)
    base, rises = loss(), []
    try:  # each block left out of the list in turn: no copy of the weights (a 7B base is not cloned per block)
        for i in range(len(blocks)):
            setattr(parent, attr, torch.nn.ModuleList(b for j, b in enumerate(blocks) if j != i))
            rises.append(loss() / base - 1)
    finally:
        setattr(parent, attr, blocks)
    return rises


# --- feed-forward neurons -------------------------------------------------------------------------------------------

def _mlp_kind(mlp: Any) -> str | None:
    """"conv1d": GPT-2's c_fc/c_proj ``Conv1D`` (weights stored (in, out)); "linear": c_fc/c_proj ``nn.Linear``
    (GPTBigCode, what ``gptkit quantize`` rewrites a GPT-2 as; weights (out, in)); "llama": gate/up/down; else None.
    Decided by the modules' types, not their names: both GPT-2 and GPTBigCode call them c_fc/c_proj."""
    from transformers.pytorch_utils import Conv1D

    fc, proj = getattr(mlp, "c_fc", None), getattr(mlp, "c_proj", None)
    if isinstance(fc, Conv1D) and isinstance(proj, Conv1D):
        return "conv1d"
    if isinstance(fc, torch.nn.Linear) and isinstance(proj, torch.nn.Linear):
        return "linear"
    if all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        return "llama"
    return None


def _mlp_parts(model: Any) -> list[tuple[Any, str]]:
    """Per block: the feed-forward module and its kind (see :func:`_mlp_kind`)."""
    blocks = _blocks_of(model)[1]
    parts = []
    for block in blocks:
        mlp = getattr(block, "mlp", None)
        kind = None if mlp is None else _mlp_kind(mlp)
        if kind is None:
            break
        parts.append((mlp, kind))
    if not parts or len(parts) != len(blocks):
        raise UserError(f"RUN: {type(model).__name__} is not a GPT-2 or Llama-style model; gptkit prune shrinks those")
    return parts


def _down(mlp, kind: str):
    return mlp.down_proj if kind == "llama" else mlp.c_proj


def _width(mlp, kind: str) -> int:
    return {"conv1d": lambda: mlp.c_fc.weight.shape[1], "linear": lambda: mlp.c_fc.weight.shape[0],
            "llama": lambda: mlp.up_proj.weight.shape[0]}[kind]()


def importance(model: Any, batches: list[dict], loss_fn) -> list[torch.Tensor]:
    """Per block, per feed-forward neuron: |sum over tokens of activation x gradient| of the loss."""
    return _first_order(model, [_down(m, k) for m, k in _mlp_parts(model)], batches, loss_fn)


def shrink(model: Any, keep: list[torch.Tensor]) -> Any:
    """A new model of the same class whose block i keeps the feed-forward neurons ``keep[i]`` (same count each)."""
    parts = _mlp_parts(model)
    state = _state(model)
    prefix = {id(m): name for name, m in model.named_modules()}
    for (mlp, kind), idx in zip(parts, keep):
        name = prefix[id(mlp)]
        if kind == "conv1d":  # Conv1D weights are (in, out)
            state[f"{name}.c_fc.weight"] = state[f"{name}.c_fc.weight"][:, idx]
            state[f"{name}.c_fc.bias"] = state[f"{name}.c_fc.bias"][idx]
            state[f"{name}.c_proj.weight"] = state[f"{name}.c_proj.weight"][idx, :]
        elif kind == "linear":  # nn.Linear weights are (out, in)
            state[f"{name}.c_fc.weight"] = state[f"{name}.c_fc.weight"][idx, :]
            if f"{name}.c_fc.bias" in state:
                state[f"{name}.c_fc.bias"] = state[f"{name}.c_fc.bias"][idx]
            state[f"{name}.c_proj.weight"] = state[f"{name}.c_proj.weight"][:, idx]
        else:
            for proj in ("gate_proj", "up_proj"):
                state[f"{name}.{proj}.weight"] = state[f"{name}.{proj}.weight"][idx, :]
                if f"{name}.{proj}.bias" in state:  # mlp_bias=True; down_proj's bias is per output, kept whole
                    state[f"{name}.{proj}.bias"] = state[f"{name}.{proj}.bias"][idx]
            state[f"{name}.down_proj.weight"] = state[f"{name}.down_proj.weight"][:, idx]
    return _rebuild(model, state, **{"intermediate_size" if parts[0][1] == "llama" else "n_inner": len(keep[0])})


# --- attention heads (Llama-style: q/k/v/o projections, a free head_dim) ---------------------------------------------

def _attentions(model: Any) -> list[Any]:
    blocks = _blocks_of(model)[1]
    attns = [getattr(b, "self_attn", None) for b in blocks]
    if not all(a is not None and hasattr(a, "o_proj") and hasattr(a, "k_proj") for a in attns) or \
            not hasattr(model.config, "head_dim"):
        raise UserError(HEADS_MESSAGE)
    return attns


def _head_shape(model: Any) -> tuple[int, int, int]:
    """(key/value heads, query heads per key/value head, head size)."""
    cfg = model.config
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    return kv, cfg.num_attention_heads // kv, cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads


def head_importance(model: Any, batches: list[dict], loss_fn) -> list[torch.Tensor]:
    """Per block, per key/value head with its query heads (a group; one head each without GQA): |sum over tokens and
    the group's output features of activation x gradient| at the attention output projection's input."""
    kv, rep, size = _head_shape(model)
    return _first_order(model, [a.o_proj for a in _attentions(model)], batches, loss_fn,
                        group=lambda v: v.view(kv, rep * size).sum(1))


def shrink_heads(model: Any, keep: list[torch.Tensor]) -> Any:
    """A new model whose block i keeps the key/value heads ``keep[i]`` and their query heads (same count each)."""
    kv, rep, size = _head_shape(model)
    state = _state(model)
    prefix = {id(m): name for name, m in model.named_modules()}
    for attn, groups in zip(_attentions(model), keep):
        name = prefix[id(attn)]
        kv_rows = (groups[:, None] * size + torch.arange(size)).flatten()
        q_rows = (groups[:, None] * rep * size + torch.arange(rep * size)).flatten()
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            for part in ("weight", "bias"):
                if f"{name}.{proj}.{part}" in state:
                    state[f"{name}.{proj}.{part}"] = state[f"{name}.{proj}.{part}"][rows]
        state[f"{name}.o_proj.weight"] = state[f"{name}.o_proj.weight"][:, q_rows]
    kept = len(keep[0])
    return _rebuild(model, state, num_attention_heads=kept * rep, num_key_value_heads=kept, head_dim=size)


def _batches(model, tok, run, data: str | None, n_batches: int, batch_size: int):
    """(batches, loss function): the run's training examples for a generative fine-tune, else blocks of text."""
    from gptkit import engine
    from gptkit.eval_report import read_head
    from gptkit.modeling import context_length

    if run is not None and run.task in ("translate", "summarize", "qa", "multitask") and not data:
        from gptkit import finetune, tasks
        from gptkit.tasks import generative as gen

        task = tasks.load(run.task)
        rows = finetune.splits(run, task)["train"][: n_batches * batch_size]
        examples = task.preprocess(run, tok, rows, "train", model)
        return [examples.batch(list(range(i, min(len(rows), i + batch_size))))
                for i in range(0, len(rows), batch_size)], gen.loss
    from gptkit.data import resolve_files

    files = [data] if data else [f for f in resolve_files(run.data.train_files, "data.train_files")  # globs
                                 if f.endswith(".txt")] if run is not None else []
    if not files:
        raise UserError("--data: a text file to measure neuron importance on (this model has no .txt corpus)")
    if data and Path(data).suffix.lower() not in (".txt", ".md", ""):
        raise UserError(f"--data: {data}: expected plain text (.txt); its lines are read as they are, so a "
                        f"{Path(data).suffix} file would measure importance on its markup")
    text = "\n".join(read_head(Path(f), "--data", 2_000_000) for f in files)  # far more than the batches take
    ctx = min(context_length(model.config), 256)
    ids = torch.tensor(tok(text)["input_ids"][: n_batches * batch_size * (ctx + 1)])
    blocks = ids[: len(ids) // (ctx + 1) * (ctx + 1)].view(-1, ctx + 1)
    if not len(blocks):
        raise UserError(f"--data: {files[0]} is too short (fewer than {ctx + 1} tokens)")
    batches = [{"input_ids": b[:, :-1], "labels": b[:, 1:]} for b in blocks.split(batch_size)]
    return batches, engine.causal_lm_loss


def _quantization_of(path: Path) -> Any:
    """The ``quantization_config`` of the model folder's config.json (None: none, or no readable config)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # an adapter folder, or a config transformers will report on when it loads it
    return config.get("quantization_config") if isinstance(config, dict) else None


def _refuse_quantized(path: Path, quantization: Any) -> None:
    if not quantization:
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) else \
        getattr(quantization, "quant_method", None)
    method = getattr(method, "value", method)
    raise UserError(f"RUN: {path} is quantized{f' ({method})' if method else ''}; prune works on unquantized weights; "
                    "prune first, then quantize")


def run(source: str, out: Path, *, mlp: float | None = None, heads: float | None = None, layers: int | None = None,
        data: str | None = None, batches: int = 8, batch_size: int = 8) -> dict:
    from gptkit import hub, trained

    if mlp is None and layers is None and heads is None:
        raise UserError("prune: say what to remove: --layers N (whole blocks), --heads FRACTION (attention heads of "
                        "every block) and/or --mlp FRACTION (feed-forward neurons of every block)")
    if heads is not None and not 0 < heads < 1:
        raise UserError(f"--heads: expected the share of attention heads to remove, in (0, 1); got {heads}")
    if mlp is not None and not 0 < mlp < 1:
        raise UserError(f"--mlp: expected the share of feed-forward neurons to remove, in (0, 1); got {mlp}")
    if batches < 1:
        raise UserError(f"--batches: must be at least 1, got {batches}")
    rundir.check_out_folder(out)
    path = hub.resolve(source, "RUN", weights=True).path
    _refuse_quantized(path, _quantization_of(path))
    model, tok, run_recipe = trained.load_any(source, "RUN")
    _refuse_quantized(path, getattr(model.config, "quantization_config", None))  # e.g. adapters on a quantized base
    if run_recipe is not None and trained.has_head(run_recipe.task, run_recipe):
        raise UserError(f"RUN: {path} is a {run_recipe.task} model with a task head; gptkit prune takes language models")
    model = model.cpu()
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    n_blocks = len(_blocks_of(model)[1])
    if layers is not None and not 0 < layers < n_blocks:
        raise UserError(f"--layers: expected how many of the model's {n_blocks} blocks to remove, 1 to "
                        f"{n_blocks - 1}; got {layers}")
    if heads is not None:  # a GPT-2, or a share that rounds to no head, is refused here, before any work
        _attentions(model)
        kv, rep, _ = _head_shape(model)
        if max(1, round(kv * (1 - heads))) == kv:
            raise UserError(f"--heads: removing {heads:g} of {kv} key/value head(s) per block (each goes with its "
                            f"{rep} query heads) removes none; ask for more")
    if mlp is not None:  # as --heads: a share that rounds to no neuron is refused before any work
        width = _width(*_mlp_parts(model)[0])
        if max(1, round(width * (1 - mlp))) == width:
            raise UserError(f"--mlp: removing {mlp:g} of {width} feed-forward neurons per block removes none; ask for "
                            "more")
    sample, loss_fn = _batches(model, tok, run_recipe, data, batches, batch_size)
    before = sum(p.numel() for p in model.parameters())
    record: dict[str, Any] = {"source": str(Path(path).resolve())}
    if layers:
        rise = layer_importance(model, sample, loss_fn)
        drop = sorted(sorted(range(n_blocks), key=lambda i: rise[i])[:layers])
        model = drop_layers(model, drop)
        record.update(layers_removed=drop, loss_rise_without_each_block=[round(r, 4) for r in rise])
        log.info("prune: blocks %s removed (loss without each block: %s)", drop,
                 ", ".join(f"{r:+.1%}" for r in rise))
    if heads is not None:
        kv, rep, _ = _head_shape(model)
        kept = max(1, round(kv * (1 - heads)))
        scores = head_importance(model, sample, loss_fn)
        model = shrink_heads(model, [s.topk(kept).indices.sort().values for s in scores])
        record.update(heads=heads, heads_per_block=[kv * rep, kept * rep], key_value_heads_per_block=[kv, kept])
        log.info("prune: attention %d -> %d heads per block (%d -> %d key/value heads)", kv * rep, kept * rep, kv, kept)
    if mlp is not None:
        parts = _mlp_parts(model)
        width = _width(*parts[0])
        kept = max(1, round(width * (1 - mlp)))
        scores = importance(model, sample, loss_fn)
        model = shrink(model, [s.topk(kept).indices.sort().values for s in scores])
        record.update(mlp=mlp, neurons_per_block=[width, kept])
        log.info("prune: feed-forward %d -> %d neurons per block", width, kept)
    after = sum(p.numel() for p in model.parameters())
    record.update(parameters=[before, after], importance=f"over {len(sample)} batches of the run's data: blocks by the "
                  "loss rise without each, heads and neurons by |sum activation x gradient|")
    with rundir.new_folder(out) as staging:  # a failed save leaves no half model folder
        model.save_pretrained(str(staging))
        tok.save_pretrained(str(staging))
        trained.write_recipe(run_recipe, staging)
        (staging / "prune.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("prune: %s -> %s: %.2fM -> %.2fM parameters (%.0f%%)", path, out, before / 1e6, after / 1e6,
             100 * after / before)
    return record
