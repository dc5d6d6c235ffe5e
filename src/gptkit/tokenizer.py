"""Tokenizers: train byte-level BPE or a character vocabulary on the corpus, or load a local one.

Training streams over the corpus in batches (``texts`` is any iterable of string batches), so the
corpus is never held in memory whole. The result is a ``transformers`` fast tokenizer that
``AutoTokenizer.from_pretrained(run_dir)`` loads without gptkit.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from gptkit.errors import UserError
from gptkit.recipe import TokenizerConfig

EOS = "<|endoftext|>"
UNK = "<unk>"
_NO_TEXT = "tokenizer: no text to train on; expected some text in data.train_files"


def _wrap(tok, model_max_length: int):
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=UNK if tok.token_to_id(UNK) is not None else None
    )
    wrapped.model_max_length = model_max_length
    return wrapped


def train_char(texts: Iterable[list[str]], model_max_length: int):
    """One token per distinct character of the corpus, plus EOS and UNK."""
    from tokenizers import Tokenizer, decoders, models

    chars: set[str] = set()
    for batch in texts:
        for t in batch:
            chars.update(t)
    if not chars:
        raise UserError(_NO_TEXT)
    vocab = {c: i for i, c in enumerate([EOS, UNK, *sorted(chars - {EOS, UNK})])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.add_special_tokens([EOS, UNK])
    tok.decoder = decoders.Fuse()
    return _wrap(tok, model_max_length)


def train_bpe(texts: Iterable[list[str]], vocab_size: int, model_max_length: int):
    """Byte-level BPE (GPT-2 style): never produces an unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    seen = []

    def flat() -> Iterator[str]:
        for batch in texts:
            if not seen and any(batch):
                seen.append(True)
            yield from batch

    tok.train_from_iterator(flat(), trainer=trainer)
    if not seen:
        raise UserError(_NO_TEXT)
    release_freed_memory()
    return _wrap(tok, model_max_length)


def release_freed_memory() -> None:
    """Hand the heap freed by a big job back to the system (glibc keeps it otherwise: ~1 GB that tokenizer training
    freed, held through the whole tokenization that follows). A no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_local(path: str, field: str = "tokenizer.path", trust_remote_code: bool = False):
    """A tokenizer from a local directory or a hub id (resolved through the local Hugging Face cache)."""
    from transformers import AutoTokenizer

    from gptkit import hub

    p = hub.resolve(path, field).path
    try:
        tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{field}: '{path}' holds no loadable tokenizer ({str(e).splitlines()[0]})") from None
    if tok.eos_token is None:
        raise UserError(f"{field}: tokenizer in '{path}' has no EOS token; gptkit needs one between documents")
    return tok


def build_tokenizer(cfg: TokenizerConfig, texts: Iterable[list[str]], context: int):
    """A newly trained tokenizer of the kind the recipe asks for (char or bpe) on ``texts``."""
    if cfg.kind == "char":
        return train_char(texts, context)
    return train_bpe(texts, cfg.vocab_size, context)


@contextmanager
def all_cores():
    """Batch encodings inside run on every core, unless the user set TOKENIZERS_PARALLELISM themselves. The CLI
    switches tokenizers' thread pool off by default (a fork after it has run warns and may deadlock) and marks that
    in the environment, which its subprocesses (sweep trials) inherit."""
    if os.environ.get("GPTKIT_TOKENIZER_THREADS") != "default-off":
        yield
        return
    before, os.environ["TOKENIZERS_PARALLELISM"] = os.environ.get("TOKENIZERS_PARALLELISM", "false"), "true"
    try:
        yield
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = before


def prompt_ids(tokenizer, text: str, encoder: bool = False) -> list[int]:
    """Token ids of a prompt, encoded the same way in training, evaluation and generation. An encoder's input
    takes the tokenizer's special tokens (T5's </s>, BART's <s>...</s>). A decoder-only prompt starts with BOS
    when the tokenizer puts one there (Llama-style tokenizers; GPT-2's adds nothing) and never ends in EOS, which
    would tell the model the text is over."""
    return prompts_ids(tokenizer, [text], encoder)[0]


def prompts_ids(tokenizer, texts: list[str], encoder: bool = False) -> list[list[int]]:
    """:func:`prompt_ids` of many prompts in one call (a fast tokenizer encodes the batch on every core)."""
    if not texts:
        return []
    if encoder:
        return tokenizer(texts, verbose=False)["input_ids"]
    ids = plain_ids(tokenizer, texts)
    return [[tokenizer.bos_token_id, *i] for i in ids] if adds_bos(tokenizer) else ids


def plain_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts without special tokens: ``tokenizer(texts, add_special_tokens=False)``, through the
    Rust tokenizer's batch encode directly where nothing (truncation, padding) is set on it — transformers' conversion
    of each encoding to Python costs a third as much again as the encoding."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts a sequence with its BOS token when asked for special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    cached = getattr(tokenizer, "_gptkit_adds_bos", None)
    if cached is None:
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        special = tokenizer("a")["input_ids"]
        cached = len(special) > len(plain) and special[0] == bos and plain[:1] != [bos]
        tokenizer._gptkit_adds_bos = cached
    return cached
