"""Decoding layer: decoding options, batched and streamed generation.

Used by ``gptkit generate`` (:func:`stream`), ``gptkit eval`` and fine-tuning validation
(:func:`generate_batch`). Models are loaded by :mod:`gptkit.trained`.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TextIO

import torch
from transformers import TextStreamer

from gptkit.errors import UserError
from gptkit.modeling import is_encoder_decoder
from gptkit.tokenizer import prompt_ids

log = logging.getLogger(__name__)


REPETITION_PENALTY = (0.01, 10.0)  # the range generate, eval and serve accept (1.0 = off)


@dataclass
class DecodingOptions:
    """How to decode. Greedy by default; ``do_sample`` switches to (seeded) sampling.

    ``top_k=None``/``top_p=None`` mean "no top-k / nucleus filtering" (transformers would otherwise
    apply its own default of ``top_k=50`` when sampling). ``min_new_tokens`` (0 = off) forbids EOS
    before that many tokens, which the throughput benchmark uses to fix the generated length.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    num_beams: int = 1
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    seed: int | None = None
    min_new_tokens: int = 0

    def _problem(self) -> str | None:
        if self.max_new_tokens < 1:
            return f"max_new_tokens must be >= 1, got {self.max_new_tokens}"
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            return f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
        if self.do_sample and not self.temperature > 0:
            return f"temperature must be > 0 when sampling, got {self.temperature} (do_sample=False is greedy)"
        if self.top_p is not None and not 0 < self.top_p <= 1:
            return f"top_p must be in (0, 1], got {self.top_p}"
        if self.top_k is not None and self.top_k < 1:
            return f"top_k must be >= 1 (or unset), got {self.top_k}"
        if self.num_beams < 1:
            return f"num_beams must be >= 1, got {self.num_beams}"
        if self.num_return_sequences < 1:
            return f"num_return_sequences must be >= 1, got {self.num_return_sequences}"
        if self.seed is not None and not 0 <= self.seed < 2**63:
            return f"seed must be in [0, 2**63), got {self.seed}"
        if (self.num_beams > 1 or not self.do_sample) and self.num_return_sequences > self.num_beams:
            return (
                f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams}) "
                "with greedy or beam search; use num_beams=1 with do_sample=True, or num_beams >= num_return_sequences"
            )
        low, high = REPETITION_PENALTY
        if not low <= self.repetition_penalty <= high:  # (NaN fails too); 1e-308 turned logits into inf, then NaN
            return f"repetition_penalty must be in [{low}, {high:g}] (1.0 = off), got {self.repetition_penalty}"
        return None

    def validate(self) -> DecodingOptions:
        """Raise :class:`UserError` (one line) if the options are impossible; return ``self`` otherwise."""
        problem = self._problem()
        if problem is not None:
            raise UserError(f"decoding options: {problem}")
        return self

    def to_generate_kwargs(self, tokenizer: Any, model: Any = None) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``: the choices gptkit's options make (beams, sampling, lengths,
        repetition penalty) are explicit, so a checkpoint's ``generation_config.json`` cannot change them; its other
        settings (length_penalty, no_repeat_ngram_size, min_length, forced or suppressed tokens) apply as in
        transformers' ``generate`` — what the checkpoint's authors tuned — and :func:`inherited` lists them (eval
        records them). Its end-of-text ids count too, when ``model`` is given (:func:`eos_ids`). Sampling parameters
        are only passed when sampling (transformers warns about them otherwise)."""
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "num_return_sequences": self.num_return_sequences,
            "repetition_penalty": self.repetition_penalty,
            "pad_token_id": pad_id,
            "use_cache": True,
        }
        eos = sorted(eos_ids(model, tokenizer))
        if eos:
            kwargs["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.do_sample:
            kwargs["temperature"] = self.temperature
            kwargs["top_k"] = self.top_k if self.top_k is not None else 0  # 0 disables top-k (default is 50)
            kwargs["top_p"] = self.top_p if self.top_p is not None else 1.0
        return kwargs


_PASSED = {"max_new_tokens", "do_sample", "num_beams", "num_return_sequences", "repetition_penalty", "pad_token_id",
           "use_cache", "eos_token_id", "min_new_tokens", "temperature", "top_k", "top_p", "transformers_version",
           "bos_token_id", "decoder_start_token_id", "_from_model_config"}


def inherited(model) -> dict:
    """The settings of the model's ``generation_config.json`` that ``generate`` applies beyond those gptkit passes
    (:meth:`DecodingOptions.to_generate_kwargs`): what makes its outputs differ from another checkpoint's decoding
    with the same options."""
    config = getattr(model, "generation_config", None)
    diff = config.to_diff_dict() if config is not None else {}
    return {k: v for k, v in sorted(diff.items()) if k not in _PASSED and not k.startswith(("output_", "return_"))}


def check_text(text: str, where: str) -> str:
    """``text`` as a tokenizer can read it: a command-line argument of bytes that are not UTF-8 arrives holding lone
    surrogates (Python's surrogateescape), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where}: not UTF-8 text (is the terminal's encoding UTF-8?)") from None
    return text


def sampling_rule(wants_sample: bool, temperature: float | None) -> tuple[bool, float]:
    """``(do_sample, temperature)`` from what a caller asked: a temperature of 0 is greedy decoding whatever else
    asks for sampling (OpenAI's semantics, which ``gptkit serve`` follows); any other given temperature implies
    sampling (a negative one is left for :meth:`DecodingOptions.validate` to refuse); unset, 1.0."""
    if temperature == 0:
        return False, 1.0
    return wants_sample or temperature is not None, 1.0 if temperature is None else temperature


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end a text: the tokenizer's EOS and the model's generation_config ``eos_token_id`` (an id or a
    list: chat models such as Llama-3 end a turn with ids of their own)."""
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = list(listed) if isinstance(listed, (list, tuple)) else [listed]
    return {int(i) for i in [tokenizer.eos_token_id, *listed] if i is not None}


def decoding_from(ft: Any, seed: int | None = None) -> DecodingOptions:
    """The decoding a recipe's ``finetune`` section asks for when generating for evaluation."""
    beams = ft.num_beams if ft.num_beams is not None else 1 if ft.do_sample else 4  # beams unless sampling
    return DecodingOptions(max_new_tokens=ft.max_new_tokens, num_beams=beams, do_sample=ft.do_sample,
                           temperature=ft.temperature, top_k=ft.top_k, top_p=ft.top_p,
                           repetition_penalty=ft.repetition_penalty, seed=seed if ft.do_sample else None)


def check_context(model: Any, options: DecodingOptions) -> int | None:
    """The model's context size (None when its config has none), once ``max_new_tokens`` is known to fit in it;
    callers that write files check it before they touch any."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and options.max_new_tokens >= limit:
        raise UserError(f"max_new_tokens={options.max_new_tokens} must be < the model's context size ({limit} tokens)")
    return limit


def _encode_prompts(model: Any, tokenizer: Any, prompts: list[str], options: DecodingOptions) -> list[list[int]]:
    """Token ids per prompt; empty prompts start from BOS/EOS. A long prompt keeps its last tokens (decoder-only:
    they must leave room for the new ones) or, for an encoder, its first (as fine-tuning cut them)."""
    encoder = is_encoder_decoder(model.config)
    ids = [prompt_ids(tokenizer, p, encoder) for p in prompts]  # as fine-tuning encoded them
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    limit = check_context(model, options)
    keep = None if limit is None else limit if encoder else limit - options.max_new_tokens
    encoded = []
    for i, seq in enumerate(ids):
        if not seq:
            if start is None:
                raise UserError(f"prompt {i} is empty and the tokenizer has no bos/eos token to start from")
            seq = [start]
        if keep is not None and len(seq) > keep:
            which = "first" if encoder else "last"
            warnings.warn(f"prompt {i} has {len(seq)} tokens; keeping the {which} {keep} to fit the context",
                          stacklevel=3)
            seq = tokenizer(prompts[i], truncation=True, max_length=keep)["input_ids"] if encoder else seq[-keep:]
        encoded.append(list(seq))
    return encoded


def seed_at(seed: int | None, offset: int) -> int | None:
    """The seed of a batch that starts at row ``offset`` of a run seeded ``seed``: each batch draws its own samples
    (one seed for every batch gave row j of each the same draws), the same ones whatever ran before it (a resumed
    evaluation samples as an uninterrupted one). The first batch keeps ``seed`` itself."""
    if seed is None or offset == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}-{offset}".encode()).digest()[:8], "little") >> 1


@contextmanager
def seeded(model: Any, seed: int | None):
    """Seed sampling without touching the caller's random state (validation runs inside a training loop whose
    dropout and data must not depend on whether it sampled)."""
    if seed is None:
        yield
        return
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


PROMPT_TAIL = 5  # prompt tokens decoded before the new ones, as vLLM's detokenizer reads


def continuation(tokenizer: Any, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text of ``new_ids`` as it continues a prompt ending in ``prompt_ids`` (give ``[]`` for an encoder-decoder's
    output, which continues nothing). A SentencePiece (Metaspace) decoder drops the space of a text's first token
    (Llama-2's "▁upon" alone is "upon": "Once" + "upon"), so the new tokens are decoded after the prompt's last few
    and only what follows the prompt's own text is kept."""
    tail = list(prompt_ids[-PROMPT_TAIL:])
    before = tokenizer.decode(tail, skip_special_tokens=True)
    text = tokenizer.decode(tail + list(new_ids), skip_special_tokens=True)
    return text[len(before) :] if text.startswith(before) else tokenizer.decode(new_ids, skip_special_tokens=True)


def generate_batch(
    model: Any, tokenizer: Any, prompts: list[str], options: DecodingOptions, batch_size: int = 32
) -> list[list[str]]:
    """Generate for many prompts in batches; return ``num_return_sequences`` new texts per prompt.

    Prompts are sorted by token length (longest first) to minimise padding, left-padded for
    decoder-only models (attention mask and mask-derived position ids make greedy output independent
    of the batch size), and the results come back in the original prompt order, without the prompt.
    """
    options.validate()
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    encoded = _encode_prompts(model, tokenizer, prompts, options)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    kwargs = options.to_generate_kwargs(tokenizer, model)
    n = options.num_return_sequences
    encoder_decoder = is_encoder_decoder(model.config)
    results: list[list[str]] = [[] for _ in prompts]
    saved = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "right" if encoder_decoder else "left"
    try:
        if tokenizer.pad_token is None:  # tokenizers not loaded by gptkit.trained
            tokenizer.pad_token = tokenizer.eos_token
        from gptkit.progress import bar

        shown = bar(len(order), "generating", "prompt", show_from=8 * batch_size)
        with seeded(model, options.seed), torch.inference_mode(), shown:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = tokenizer.pad({"input_ids": [encoded[i] for i in chunk]}, return_tensors="pt").to(model.device)
                output = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
                # a decoder's output starts with its start token; a decoder-only model's with the prompt
                new_tokens = output[:, 1:] if encoder_decoder else output[:, batch["input_ids"].shape[1] :]
                for j, i in enumerate(chunk):
                    results[i] = [continuation(tokenizer, [] if encoder_decoder else encoded[i], row)
                                  for row in new_tokens[j * n : (j + 1) * n].tolist()]
                shown.update(len(chunk))
    finally:
        tokenizer.padding_side, tokenizer.pad_token = saved
    return results


class _WriterStreamer(TextStreamer):
    """A :class:`TextStreamer` that writes the new text (no prompt) to a file object, decoded after the prompt's last
    tokens (``after_prompt``; see :func:`continuation`)."""

    def __init__(self, tokenizer: Any, out: TextIO, after_prompt: bool = True):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out, self.after_prompt = out, after_prompt

    def put(self, value):
        if not self.next_tokens_are_prompt:
            return super().put(value)
        self.next_tokens_are_prompt = False  # the prompt (a window): its tail is what the new text is decoded after
        ids = (value[0] if len(value.shape) > 1 else value).tolist()
        self.token_cache = ids[-PROMPT_TAIL:] if self.after_prompt else []
        self.print_len = len(self.tokenizer.decode(self.token_cache, **self.decode_kwargs))

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text)  # the caller ends the line once the last chunk is done
        self.out.flush()


def _context_size(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def stream(model: Any, tokenizer: Any, prompt: str, options: DecodingOptions, out: TextIO | None = None) -> list[str]:
    """Write the prompt and its continuation to ``out`` (``sys.stdout`` at call time), as it is produced;
    an encoder-decoder's output is not a continuation, so only the output is written.

    A single sequence without beams is streamed token by token; when prompt + max_new_tokens exceed the
    model's context it keeps going with a sliding window (the whole prompt while the context holds it, then the
    last half context as the prompt of the next chunk), as nanoGPT's sampler crops to its block size. Several
    samples or beams are generated first and printed each under a ``=== sample i/n ===`` header. Returns the
    generated texts (without prompt).
    """
    out = sys.stdout if out is None else out
    options.validate()
    encoder_decoder = is_encoder_decoder(model.config)
    shown = "" if encoder_decoder else prompt
    if options.num_beams > 1 or options.num_return_sequences > 1:
        limit = _context_size(model)
        if limit is not None and options.max_new_tokens >= limit:
            raise UserError(f"--max-new-tokens {options.max_new_tokens}: beams and several samples are generated in "
                            f"one call, within the model's context of {limit} tokens with the prompt; ask for fewer "
                            "(one sequence without beams slides past the context)")
        ids = prompt_ids(tokenizer, prompt, encoder_decoder)
        keep = None if limit is None or encoder_decoder else limit - options.max_new_tokens
        if keep is not None and len(ids) > keep:  # (generate_batch keeps the same last tokens)
            log.warning("the prompt's %d tokens and %d new ones exceed the context of %d tokens: the samples continue "
                        "its last %d", len(ids), options.max_new_tokens, limit, keep)
            shown = "..." + tokenizer.decode(ids[-keep:], skip_special_tokens=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # (said above, once and plainly)
            texts = generate_batch(model, tokenizer, [prompt], options)[0]
        for i, text in enumerate(texts, 1):
            out.write(f"=== sample {i}/{len(texts)} ===\n{shown}{text}\n")
        out.flush()
        return texts
    if encoder_decoder:  # the decoder has its own context: one call, nothing to slide
        input_ids = torch.tensor(_encode_prompts(model, tokenizer, [prompt], options), device=model.device)
        if options.seed is not None:
            torch.manual_seed(options.seed)
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    streamer=_WriterStreamer(tokenizer, out, after_prompt=False),
                                    **options.to_generate_kwargs(tokenizer, model))
        out.write("\n")
        out.flush()
        return [tokenizer.decode(output[0, 1:], skip_special_tokens=True)]
    limit = _context_size(model)
    half = limit // 2 if limit else None
    ids = _encode_prompts(model, tokenizer, [prompt], replace(options, max_new_tokens=1, min_new_tokens=0)
                          if limit else options)[0]  # the windows below cut the rest
    out.write(prompt)
    if options.seed is not None:
        torch.manual_seed(options.seed)
    new: list[int] = []
    streamer = _WriterStreamer(tokenizer, out)
    while len(new) < options.max_new_tokens:
        history, left = ids + new, options.max_new_tokens - len(new)
        n = left if limit is None else min(left, limit - len(history) if len(history) < limit else half)
        window = history[-(limit - n) :] if limit else history  # the whole history while it fits, then half a context
        step = replace(options, max_new_tokens=n, min_new_tokens=min(n, max(0, options.min_new_tokens - len(new))))
        input_ids = torch.tensor([window], device=model.device)
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                                    **step.to_generate_kwargs(tokenizer, model))
        produced = output[0, len(window) :].tolist()
        new += produced
        if len(produced) < step.max_new_tokens or eos_ids(model, tokenizer) & set(produced):
            break  # the model ended the text
    out.write("\n")
    out.flush()
    return [continuation(tokenizer, ids, new)]
