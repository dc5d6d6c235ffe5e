"""Generated tokens/s of gptkit.generation.generate_batch: batched (default 32) vs one prompt at a time.

Offline and self-contained: a randomly initialised GPT-2 and a byte-level BPE tokenizer trained in code on
data/tinyshakespeare.txt (or a built-in text). Both paths generate exactly max_new_tokens per prompt
(min_new_tokens = max_new_tokens), greedily, in the same run; the project goal is a ratio >= 8x on 2 CPU cores.

    PYTHONPATH=src .venv/bin/python bench/generation_throughput.py [--layers 4 --width 256 --prompts 64 ...]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from gptkit.generation import DecodingOptions, generate_batch

DATA = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
FALLBACK = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 200


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256, help="n_embd")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--context", type=int, default=256, help="n_positions")
    parser.add_argument("--prompts", type=int, default=64, help="number of prompts")
    parser.add_argument("--min-prompt-tokens", type=int, default=4)
    parser.add_argument("--max-prompt-tokens", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="fixed: min_new_tokens is set to it too")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--repeats", type=int, default=1, help="best of N timings per path (machine noise)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([text], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    return tok


def build_prompts(text: str, tok, args: argparse.Namespace) -> list[str]:
    rng = random.Random(args.seed)
    ids = tok(text[:200_000])["input_ids"]
    prompts = []
    for _ in range(args.prompts):
        length = rng.randint(args.min_prompt_tokens, args.max_prompt_tokens)
        start = rng.randrange(0, len(ids) - length)
        prompts.append(tok.decode(ids[start : start + length]))
    return prompts


def timed(model, tok, prompts, options, batch_size) -> tuple[float, int]:
    start = time.perf_counter()
    out = generate_batch(model, tok, prompts, options, batch_size=batch_size)
    seconds = time.perf_counter() - start
    assert len(out) == len(prompts)
    return seconds, len(prompts) * options.max_new_tokens


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    text = DATA.read_text(encoding="utf-8") if DATA.is_file() else FALLBACK
    tok = build_tokenizer(text[:300_000], args.vocab_size)
    torch.manual_seed(args.seed)
    config = GPT2Config(n_layer=args.layers, n_head=args.heads, n_embd=args.width, n_positions=args.context,
                        vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    prompts = build_prompts(text, tok, args)
    options = DecodingOptions(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    print(f"model: GPT-2 {args.layers} layers x {args.width} wide, vocab {len(tok)}, {n_params:.1f}M params; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, {args.max_new_tokens} new tokens each")

    generate_batch(model, tok, prompts[:2], options, batch_size=2)  # warm-up
    batched_s = single_s = float("inf")
    for _ in range(args.repeats):  # interleaved, so that load from other processes hits both paths alike
        seconds, tokens = timed(model, tok, prompts, options, args.batch_size)
        batched_s = min(batched_s, seconds)
        single_s = min(single_s, timed(model, tok, prompts, options, 1)[0])
    batched, single = tokens / batched_s, tokens / single_s
    print(f"batch {args.batch_size:>3}: {batched:9.1f} generated tokens/s ({batched_s:.2f} s)")
    print(f"batch   1: {single:9.1f} generated tokens/s ({single_s:.2f} s)")
    print(f"speed-up: {batched / single:.1f}x")


if __name__ == "__main__":
    main()
