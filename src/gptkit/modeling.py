"""Models: a transformers config from the recipe's size spec, or a local checkpoint directory."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from gptkit.errors import UserError
from gptkit.recipe import ModelConfig


# Files that carry a vocabulary (any one will do); tokenizer_config.json alone cannot build a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")

def model_dir(path: str, field: str) -> Path:
    """The checkpoint folder of a local directory or a hub id (its snapshot in the local Hugging Face cache,
    :mod:`gptkit.hub`), or one clear error."""
    from gptkit import hub

    p = hub.resolve(path, field, weights=True).path
    if not (p / "config.json").is_file():
        raise UserError(f"{field}: '{path}' has no config.json; expected a Hugging Face checkpoint directory")
    return p


def build_config(cfg: ModelConfig, vocab_size: int, eos_id: int, pad_id: int | None = None):
    """A transformers config for a fresh model of the recipe's shape (its vocabulary padded to ``vocab_multiple``).
    Encoder-decoders (bart, t5) have ``n_layer`` blocks in each stack and need a ``pad_id`` apart from EOS (BART's
    padding embedding is frozen at zero, and it ties the output layer); BART's decoder starts from EOS, T5's from pad."""
    from transformers import BartConfig, GPT2Config, LlamaConfig, T5Config

    vocab_size = -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
    ffn = cfg.intermediate_size or 4 * cfg.n_embd
    if cfg.arch == "bart":
        return BartConfig(vocab_size=vocab_size, d_model=cfg.n_embd, encoder_layers=cfg.n_layer,
                          decoder_layers=cfg.n_layer, encoder_attention_heads=cfg.n_head,
                          decoder_attention_heads=cfg.n_head, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                          max_position_embeddings=cfg.context, dropout=cfg.dropout or 0.0, attention_dropout=0.0,
                          activation_dropout=0.0, activation_function=cfg.activation or "gelu",
                          pad_token_id=pad_id, bos_token_id=eos_id, eos_token_id=eos_id, decoder_start_token_id=eos_id,
                          forced_eos_token_id=None, tie_word_embeddings=cfg.tie_embeddings)
    if cfg.arch == "t5":
        return T5Config(vocab_size=vocab_size, d_model=cfg.n_embd, d_kv=cfg.n_embd // cfg.n_head, d_ff=ffn,
                        num_layers=cfg.n_layer, num_heads=cfg.n_head, dropout_rate=cfg.dropout or 0.0,
                        pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id,
                        tie_word_embeddings=cfg.tie_embeddings)

    if cfg.arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=cfg.context,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.intermediate_size,
            activation_function=cfg.activation or "gelu",
            resid_pdrop=cfg.dropout or 0.0,
            embd_pdrop=cfg.dropout or 0.0,
            attn_pdrop=cfg.dropout or 0.0,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            tie_word_embeddings=cfg.tie_embeddings,
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.intermediate_size or 4 * cfg.n_embd,
        hidden_act=cfg.activation or "silu",
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head or cfg.n_head,
        max_position_embeddings=cfg.context,
        attention_dropout=cfg.dropout or 0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def load_config(cfg: ModelConfig, vocab_size: int, eos_id: int):
    """The config of the model a recipe trains: a checkpoint's own, or one built from the size spec."""
    if cfg.init_from:
        config = base_config(cfg.init_from, trust_remote_code=cfg.trust_remote_code)  # (resolves the path once)
        if is_encoder_decoder(config):
            raise UserError(f"model.init_from: {cfg.init_from} is an encoder-decoder ({config.model_type}); pretrain continues "
                            "decoder-only (GPT-style) models")
        return config
    if cfg.arch in ENCODER_DECODERS:
        raise UserError(f"model.arch: {cfg.arch} is an encoder-decoder; pretrain trains decoder-only (GPT-style) models. "
                        "`gptkit init` builds it untrained with its tokenizer, `gptkit finetune` (translate, summarize) "
                        "trains it")
    return build_config(cfg, vocab_size, eos_id)


ENCODER_DECODERS = ("bart", "t5")


def quiet_loading() -> None:
    """No "Loading weights" progress bars: transformers reads HF_HUB_DISABLE_PROGRESS_BARS only when it is first
    imported, which may be before the CLI sets it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def is_encoder_decoder(config) -> bool:
    """Whether a config describes an encoder-decoder (T5, BART, Marian, ...) rather than a decoder-only LM."""
    return bool(getattr(config, "is_encoder_decoder", False))


# Model types whose logits are exactly ``lm_head(final hidden state)`` (no logit scaling or soft-capping after it).
PLAIN_HEAD_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3"})


def _plain_head(model):
    """The output layer of a plain, unsharded model (itself, or under DDP / torch.compile / PEFT) of a
    :data:`PLAIN_HEAD_TYPES` type with a bias-free ``nn.Linear`` head; None for anything else (FSDP and DeepSpeed
    shards, encoder-decoders, heads with a bias, scaling or an adapter)."""
    import os
    import sys

    import torch
    from transformers import PreTrainedModel

    if os.environ.get("GPTKIT_PLAIN_HEAD") == "1":  # benchmarks compare against the full logits (bench/*.py)
        return None
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    peft = sys.modules.get("peft")  # any other wrapper (DeepSpeed's engine, FSDP1) may hold the head's weight sharded
    if not (isinstance(model, PreTrainedModel) or peft is not None and isinstance(model, peft.PeftModel)):
        return None
    if getattr(model.config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or hasattr(head.weight, "ds_id") or \
            type(head.weight) is not torch.nn.Parameter:  # a DTensor shard (FSDP2), or ZeRO-3 partitioned
        return None
    return head


@contextmanager
def _passthrough(head):
    """Inside, ``head`` returns its input: the model's "logits" are its final hidden states."""
    head.forward = lambda hidden: hidden
    try:
        yield
    finally:
        del head.forward


def logits_where(model, keep, **inputs):
    """The logits of the positions where ``keep`` (batch x positions, bool) is True, as (N, vocab) in row-major
    order. Where the model allows (:func:`_plain_head`), the output layer runs on those positions only: the
    prompt and padding of a fine-tuning batch cost no vocabulary projection — with GPT-2's 50k vocabulary that
    projection is most of a small model's step — and no batch x length x vocab logits are held."""
    head = _plain_head(model)
    return model(**inputs).logits[keep] if head is None else head(_hidden(model, head, keep, inputs))


def _chunk_rows(vocab: int, device_type: str = "cpu") -> int:
    """Rows of logits per chunk: 64 MiB of float32 on a CPU (a 1k vocabulary: 16k rows; GPT-2's 50k: 333, measured
    best here), 1 GiB on an accelerator, where each chunk's handful of kernel launches must stay small against its
    work (GPT-2's vocabulary: 5,340 rows, three chunks for 16 x 1024 positions)."""
    return max(1, (2**24 if device_type == "cpu" else 2**28) // vocab)


def _soft_terms(z, zt, temperature: float):
    """Distillation terms of float logits: the student's and teacher's log-probabilities at temperature T over
    their common vocabulary (a vocabulary padded for speed has extra rows), the teacher's probabilities, and
    KL(teacher || student) per row."""
    v = min(z.shape[-1], zt.shape[-1])
    ls, lt = (z[:, :v] / temperature).log_softmax(-1), (zt[:, :v] / temperature).log_softmax(-1)
    pt = lt.exp()
    return ls, pt, (pt * (lt - ls)).sum(-1)


@cache
def _linear_cross_entropy():
    """An autograd function: the summed loss of ``hidden @ weight.T`` against ``targets`` — cross-entropy (with label
    smoothing ``eps``: against ``(1 - eps) onehot + eps / vocab``, as torch's ``label_smoothing``), or with a
    teacher ``(1 - alpha) CE + alpha T^2 KL(teacher_T || student_T)`` — each row times its weight, a chunk of rows
    at a time, with the gradients computed in the forward pass. No (rows x vocab) logits outlive their chunk —
    16 x 1024 positions with GPT-2's vocabulary have 3.3 GB of float32 logits, held two or three times over by a
    plain cross-entropy — and the backward pass only scales the stored gradients. The same FLOPs as the plain
    head and loss (measured ~10% faster on CPU: less memory traffic)."""
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, row_weights, teacher_hidden, teacher_weight, alpha, temperature,
                    eps, grad_enabled):
            # (under no_grad an input still "needs" its gradient: no backward comes, so none is computed)
            need_h, need_w = (grad_enabled and n for n in ctx.needs_input_grad[:2])
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            gh = torch.empty_like(hidden) if need_h else None
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            step = _chunk_rows(weight.shape[0], hidden.device.type)
            for s in range(0, hidden.shape[0], step):
                h, y = hidden[s : s + step], targets[s : s + step]
                z = (h @ weight.t()).float()
                lse = z.logsumexp(-1)
                per_row = lse - z.gather(1, y[:, None]).squeeze(1)
                if eps:
                    per_row = (1 - eps) * per_row + eps * (lse - z.mean(-1))
                if teacher_hidden is not None:
                    zt = (teacher_hidden[s : s + step] @ teacher_weight.t()).float()
                    ls, pt, kl = _soft_terms(z, zt, temperature)
                    per_row = (1 - alpha) * per_row + alpha * temperature**2 * kl
                w = None if row_weights is None else row_weights[s : s + step].float()
                loss += (per_row if w is None else per_row * w).sum()
                if need_h or need_w:
                    g = z.sub_(lse[:, None]).exp_()  # d CE / d z = softmax - one-hot, in place of the logits
                    g[torch.arange(len(y), device=g.device), y] -= 1 - eps
                    if eps:
                        g.sub_(eps / g.shape[1])
                    if teacher_hidden is not None:  # d (alpha T^2 KL) / d z = alpha T (softmax(z / T) - teacher_T)
                        g.mul_(1 - alpha)[:, : pt.shape[1]].add_(alpha * temperature * (ls.exp() - pt))
                    if w is not None:
                        g.mul_(w[:, None])
                    g = g.to(h.dtype)
                    if need_h:
                        gh[s : s + step] = g @ weight
                    if need_w:
                        gw += g.t() @ h
            ctx.save_for_backward(*(t for t in (gh, gw) if t is not None))
            ctx.weight_dtype = weight.dtype
            return loss

        @staticmethod
        def backward(ctx, grad):
            saved, (need_h, need_w) = list(ctx.saved_tensors), ctx.needs_input_grad[:2]
            gh = saved.pop(0) if need_h else None
            gh = gh * grad.to(gh.dtype) if need_h else None
            gw = (saved.pop(0) * grad).to(ctx.weight_dtype) if need_w else None
            return gh, gw, None, None, None, None, None, None, None, None

    return LinearCrossEntropy


def _rows(x, keep):
    """The kept positions of a (batch x positions x features) tensor as rows (``keep`` None: all)."""
    return x.flatten(0, 1) if keep is None else x[keep]


def _hidden(model, head, keep, inputs):
    """The final hidden states of the kept positions (rows x width): the model run with its head passed through."""
    with _passthrough(head):
        return _rows(model(**inputs).logits, keep)


def scored_cross_entropy(model, keep, targets, weights=None, teacher=None, temperature: float = 1.0,
                         alpha: float = 0.0, smoothing: float = 0.0, **inputs):
    """The summed cross-entropy of the positions where ``keep`` (batch x positions, bool; None: all) is True
    against ``targets`` (one per kept position, row-major), each position's loss times its ``weights`` entry
    (None: 1); ``smoothing`` is label smoothing (torch's ``label_smoothing``: the target is ``(1 - smoothing)
    onehot + smoothing / vocab``). With a ``teacher`` (same inputs, no gradients) the loss per position is
    ``(1 - alpha) CE + alpha T^2 KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al.).
    On plain heads (:func:`_plain_head`) the output layers run on the kept positions only, fused with the loss
    and chunked (:func:`_linear_cross_entropy`); otherwise from the models' logits, the same formula."""
    import torch

    head = _plain_head(model)
    teacher_head = None if teacher is None else _plain_head(teacher)
    if head is not None and (teacher is None or teacher_head is not None):
        hidden = _hidden(model, head, keep, inputs)
        t_hidden = t_weight = None
        if teacher is not None:
            with torch.no_grad():
                t_hidden, t_weight = _hidden(teacher, teacher_head, keep, inputs), teacher_head.weight
        return _linear_cross_entropy().apply(hidden, head.weight, targets, weights, t_hidden, t_weight, alpha,
                                             temperature, smoothing, torch.is_grad_enabled())
    z = _rows(model(**inputs).logits, keep).float()
    per_row = torch.nn.functional.cross_entropy(z, targets, reduction="none", label_smoothing=smoothing)
    if teacher is not None:
        with torch.no_grad():
            zt = _rows(teacher(**inputs).logits, keep).float()
        per_row = (1 - alpha) * per_row + alpha * temperature**2 * _soft_terms(z, zt, temperature)[2]
    return (per_row if weights is None else per_row * weights).sum()


def lm_class(config):
    """The Auto class of a config's language model: sequence-to-sequence for encoder-decoders, else causal."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if is_encoder_decoder(config) else AutoModelForCausalLM


def base_config(path: str, field: str = "model.init_from", trust_remote_code: bool = False):
    """The config of a local checkpoint directory, or one clear error."""
    from transformers import AutoConfig

    p = model_dir(path, field)
    try:
        return AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{field}: cannot read {p / 'config.json'}: {first}") from None


def describe_arch(config) -> str:
    """``gpt2``, or ``bart (encoder-decoder)``: what ``gptkit validate`` prints for a base model."""
    return f"{config.model_type} (encoder-decoder)" if is_encoder_decoder(config) else config.model_type


# the config fields transformers' models read their dropout probabilities from (GPT-2, Llama/Mistral/Qwen, BART/
# Marian, T5, BERT-style)
DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout",
                  "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "activation_dropout", "dropout_rate")


def dropout_fields(config, p: float) -> dict:
    """``model.dropout`` for a base: each dropout field its config has, set to ``p``."""
    fields = {f: p for f in DROPOUT_FIELDS
              if isinstance(getattr(config, f, None), int | float) and not isinstance(getattr(config, f), bool)}
    if not fields:
        raise UserError(f"model.dropout: the base's config ({config.model_type}) has none of the dropout fields "
                        f"gptkit sets ({', '.join(DROPOUT_FIELDS)}); leave model.dropout unset")
    return fields


def load_kwargs(cfg: ModelConfig) -> dict:
    """How every model of a recipe loads: attention kernel, weight dtype, remote code, and ``model.dropout`` (when
    set) in each of the base's dropout fields."""
    kwargs = {"attn_implementation": cfg.attn_implementation, "dtype": cfg.dtype,
              "trust_remote_code": cfg.trust_remote_code}
    if cfg.dropout is not None and cfg.init_from:
        kwargs |= dropout_fields(base_config(cfg.init_from, trust_remote_code=cfg.trust_remote_code), cfg.dropout)
    return kwargs


def trainable_precision(model, method: str) -> None:
    """Train in fp32 or bf16: LoRA's trainable parts (adapters, task heads) are made fp32 whatever the base's
    dtype; fp16 weights cannot be trained directly (their gradients cannot be unscaled), so that is refused."""
    import torch

    if method == "lora":
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    if any(p.requires_grad and p.dtype == torch.float16 for p in model.parameters()):
        raise UserError("model.dtype: float16 weights cannot be trained directly (fp16 gradients cannot be "
                        "unscaled); use bfloat16 or float32, or finetune.method: lora on the float16 base")


def build_model(cfg: ModelConfig, config, n_tokens: int | None = None):
    """The causal LM: weights from ``init_from`` when set, else randomly initialised (an encoder-decoder config: the
    sequence-to-sequence LM); a new model whose vocabulary
    is padded past the tokenizer's ``n_tokens`` never generates the padding ids (its generation config suppresses
    them, for transformers' ``generate`` too)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    if cfg.trust_remote_code:
        logging.getLogger(__name__).warning("model.trust_remote_code is true: running code from %s", cfg.init_from)

    if cfg.init_from:
        try:
            return AutoModelForCausalLM.from_pretrained(model_dir(cfg.init_from, "model.init_from"), **load_kwargs(cfg))
        except (OSError, ValueError, SafetensorError) as e:  # a torn weights file: SafetensorError
            raise UserError(f"model.init_from: cannot load '{cfg.init_from}': {str(e).splitlines()[0]}") from None
    model = lm_class(config).from_config(config, attn_implementation=cfg.attn_implementation)
    if n_tokens is not None and config.vocab_size > n_tokens:
        model.generation_config.suppress_tokens = list(range(n_tokens, config.vocab_size))
    return model


def max_positions(config) -> int | None:
    """Positions the model can attend over; None for relative-position models without a limit (T5)."""
    n = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(n) if n else None


UNLIMITED_WINDOW = 1024


def context_length(config) -> int:
    """Tokens one window may span: the model's positions, else UNLIMITED_WINDOW for a model without a limit
    (Mamba, T5's relative positions) — its perplexity windows and scored prompts are cut to that many."""
    return max_positions(config) or UNLIMITED_WINDOW


def meta_param_count(config) -> int:
    """Parameter count without allocating weights (the model is built on the meta device); encoder-decoders
    count both stacks (their causal-LM class would be the decoder alone)."""
    import torch

    with torch.device("meta"):
        model = lm_class(config).from_config(config)
    return sum(p.numel() for p in model.parameters())


def activation_bytes(config, batch_size: int, tokens: int, bytes_per_act: int = 4, checkpointing: bool = False) -> int:
    """Peak activation memory of one training micro-batch of ``batch_size`` x ``tokens``.

    The usual per-layer estimate (~34·B·T·d plus 5·B·heads·T² for attention scores, Korthikanti et al. 2022,
    at 2 bytes per value) scaled to ``bytes_per_act``; with gradient checkpointing only each layer's input is
    kept, plus one layer recomputed at a time. The logits (B·T·V in fp32, and their gradient) come on top.
    """
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    H = getattr(config, "num_attention_heads", None) or 0  # an attention-free model (Mamba): no T² scores
    B, T = batch_size, tokens
    layer = (34 * B * T * d + 5 * B * H * T * T) * bytes_per_act // 2
    kept = L * B * T * d * bytes_per_act + layer if checkpointing else L * layer
    return kept + 2 * B * T * V * 4


def training_memory_bytes(config, n_params: int, batch_size: int, tokens: int, bytes_per_act: int = 4,
                          checkpointing: bool = False) -> int:
    """Rough peak memory of one training process: fp32 weights + grads + AdamW moments + the activations of one
    micro-batch of ``batch_size`` x ``tokens``."""
    return 16 * n_params + activation_bytes(config, batch_size, tokens, bytes_per_act, checkpointing)


# Perplexity: the model side (summed NLL over sliding windows); metrics.perplexity_from_nll turns it into a figure.
def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window: each token after the first is scored once, with the
    longest left context the window allows (the Hugging Face strided-perplexity recipe)."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def sliding_nll(model, ids, context: int, stride: int, batch_size: int) -> tuple[float, int, int]:
    """(summed NLL in nats, tokens scored, windows); windows of equal length run batch_size at a time. ``ids``: a
    list or a (memory-mapped) numpy array of token ids; a progress bar shows on a terminal."""
    import numpy as np
    import torch

    from gptkit.progress import bar

    groups: list[list] = []
    for w in windows(len(ids), context, stride):
        same = groups and len(groups[-1]) < batch_size and groups[-1][0][1] - groups[-1][0][0] == w[1] - w[0]
        groups[-1].append(w) if same else groups.append([w])
    total, count = 0.0, 0
    shown = bar(len(groups), "perplexity", "batch", show_from=2)
    with torch.inference_mode(), shown:
        for group in groups:
            shown.update()
            rows = np.stack([np.asarray(ids[b:e], dtype=np.int64) for b, e, _ in group])
            x = torch.from_numpy(rows).to(model.device)
            keep = torch.zeros_like(x, dtype=torch.bool)  # the positions predicting the window's scored tokens
            for j, (b, e, first) in enumerate(group):
                keep[j, first - b - 1 : e - b - 1] = True
                count += e - first
            targets = torch.cat([x[j, first - b : e - b] for j, (b, e, first) in enumerate(group)])
            # the output layer on the scored positions only, chunked: no windows x length x vocab log-probabilities
            total += scored_cross_entropy(model, keep, targets, input_ids=x).item()
    return total, count, sum(map(len, groups))
