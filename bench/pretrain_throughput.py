"""Pretraining throughput: `gptkit pretrain` against a plain transformers `Trainer`, same model/data/machine.

Not a test: it prints tokens/s for both and the ratio (goal: gptkit >= 1.2x). Both train the same
GPT-2 shape on the same character-level tinyshakespeare blocks with the same batch size, optimizer
(AdamW, weight decay, grad clipping 1.0), warmup + cosine schedule and number of steps; neither
evaluates or checkpoints inside the timed window. gptkit's figure is tokens / time inside its loop
(from metrics.jsonl); the Trainer's is its own `train_runtime`.

The Trainer runs twice: with `GPT2Config`'s default activation (gelu_new, what a user writing a
Trainer script gets) and with gptkit's exact model config (exact gelu, one fused kernel), so the
printout separates what gptkit's model defaults buy from what its loop (fused AdamW, no per-step
framework overhead) buys. On a GPU both sides use bf16 and torch.compile (the Trainer's `bf16=True,
torch_compile=True`); on a CPU fp32 eager, where bf16 without AMX is slower and compile buys ~8%.

    python bench/pretrain_throughput.py [--steps 300] [--layers 4] [--width 128] [--context 64] [--batch 12]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def gpu() -> bool:
    """On a GPU both sides run at their best settings: bf16 and torch.compile; on a CPU, fp32 eager."""
    import torch

    return torch.cuda.is_available()


def gptkit_run(args, tmp: Path) -> tuple[float, float]:
    from gptkit.cli import main

    recipe = {
        "tokenizer": {"kind": "char"},
        "model": {"n_layer": args.layers, "n_head": 4, "n_embd": args.width, "context": args.context},
        "data": {"train_files": [str(ROOT / "data" / "tinyshakespeare.txt")], "val_fraction": 0.0},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": 1e-3, "min_lr": 1e-4,
                  "warmup_steps": 10, "log_every": 10, "save_every": args.steps, "eval_every": args.steps,
                  "compile": gpu()},  # precision "auto": bf16 on a GPU
        "output": {"dir": str(tmp / "gptkit-run")},
    }
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(recipe))
    try:
        main(["pretrain", str(path), "--overwrite"])
    except SystemExit as e:
        if e.code:
            raise
    rows = [json.loads(line) for line in (tmp / "gptkit-run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train_tokens_per_s"] for r in rows if "train_tokens_per_s" in r]
    # each row covers log_every steps: the harmonic mean weights the intervals by their duration
    tok_s = len(rates) / sum(1 / r for r in rates)
    loss = [r["train_loss"] for r in rows if "train_loss" in r][-1]
    return tok_s, loss


def trainer_run(args, tmp: Path, activation: str) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, Trainer, TrainingArguments

    from gptkit import data as data_mod
    from gptkit.recipe import DataConfig

    tok = AutoTokenizer.from_pretrained(str(tmp / "gptkit-run"))  # the same character vocabulary
    cfg = DataConfig(train_files=[str(ROOT / "data" / "tinyshakespeare.txt")])
    stream = data_mod.token_stream(cfg.train_files, cfg, tok, "bench")
    T = args.context

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return (len(stream) - 1) // T

        def __getitem__(self, i):
            x = torch.from_numpy(stream[i * T : i * T + T].astype("int64"))
            return {"input_ids": x, "labels": x}

    config = GPT2Config(vocab_size=len(tok), n_positions=T, n_embd=args.width, n_layer=args.layers, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function=activation)
    torch.manual_seed(1337)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    targs = TrainingArguments(
        output_dir=str(tmp / "trainer-run"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=1e-3, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, warmup_steps=10,
        lr_scheduler_type="cosine", logging_steps=10, save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=not gpu(), dataloader_num_workers=0, disable_tqdm=True, seed=1337,
        bf16=gpu(), torch_compile=gpu(),  # the Trainer's best settings on a GPU, as gptkit's
    )
    out = Trainer(model=model, args=targs, train_dataset=Blocks()).train()
    return out.metrics["train_samples_per_second"] * T, out.metrics["train_loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=12)
    args = p.parse_args()
    os.environ.setdefault("GPTKIT_CACHE", tempfile.mkdtemp(prefix="gptkit-bench-cache-"))
    import torch

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        g_tok, g_loss = gptkit_run(args, tmp)
        g_wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        h_tok, h_loss = trainer_run(args, tmp, "gelu_new")  # GPT2Config's default: what a Trainer user gets
        h_wall = time.perf_counter() - t0
        s_tok, s_loss = trainer_run(args, tmp, "gelu")  # gptkit's model config exactly: isolates the loop
    print(f"\nmodel: GPT-2 {args.layers} layers x {args.width}, context {args.context}, batch {args.batch}, "
          f"{args.steps} steps; torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    print(f"gptkit pretrain            : {g_tok:10,.0f} tokens/s  (last train loss {g_loss:.3f}, command wall {g_wall:.1f}s)")
    print(f"HF Trainer, GPT2Config()   : {h_tok:10,.0f} tokens/s  (mean train loss {h_loss:.3f}, wall {h_wall:.1f}s)")
    print(f"HF Trainer, gptkit's config: {s_tok:10,.0f} tokens/s  (mean train loss {s_loss:.3f})")
    print(f"ratio vs Trainer as users configure it: {g_tok / h_tok:.2f}x  (goal >= 1.2x)")
    print(f"ratio vs Trainer on gptkit's exact model: {g_tok / s_tok:.2f}x  (the loop alone)")


if __name__ == "__main__":
    main()
