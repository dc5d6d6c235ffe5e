"""GPU pretraining throughput and model FLOPs utilisation (MFU) of `gptkit pretrain` on the GPT-2 small recipe.

Not a test, and only meaningful on a GPU. Runs `gptkit pretrain pretrain/gpt2-small` for a few steps per
setting (bf16 + torch.compile, the same with the plain output layer, bf16 eager, fp32/TF32 eager), then prints tokens/s (median over logged
intervals after the first, so compilation is excluded) and MFU = tokens/s x FLOPs/token / peak, with
FLOPs/token = 6N + 12·L·T·d (PaLM appendix B, as nanoGPT counts it).

    python bench/pretrain_mfu.py [--steps 60] [--peak-tflops 989] [--settings compile,plainhead,eager,fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "compile": ["train.precision=bf16", "train.compile=true"],
    # the same with the model's full logits and a plain cross-entropy (GPTKIT_PLAIN_HEAD=1) instead of the output
    # layer fused with the loss in chunks: what that lever is worth on this GPU
    "plainhead": ["train.precision=bf16", "train.compile=true"],
    "eager": ["train.precision=bf16", "train.compile=false"],
    "fp32": ["train.precision=fp32", "train.compile=false"],
}


def run(setting: str, steps: int, extra: list[str], out: Path) -> tuple[float, dict]:
    run_dir = out / setting
    cmd = [sys.executable, "-m", "gptkit", "pretrain", "pretrain/gpt2-small", f"output.dir={run_dir}", "--overwrite",
           f"train.max_steps={steps}", "train.log_every=5", f"train.save_every={steps}", f"train.eval_every={steps}",
           "train.eval_batches=2", "train.warmup_steps=5", *SETTINGS[setting], *extra]
    env = dict(os.environ, GPTKIT_PLAIN_HEAD="1" if setting == "plainhead" else "0")
    subprocess.run(cmd, check=True, env=env)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train_tokens_per_s"] for r in rows if "train_tokens_per_s" in r][1:]
    return statistics.median(rates), json.loads((run_dir / "config.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--settings", default="compile,plainhead,eager,fp32")
    p.add_argument("overrides", nargs="*", help="extra recipe overrides, e.g. train.batch_size=32")
    args = p.parse_args()
    os.environ.setdefault("GPTKIT_CACHE", tempfile.mkdtemp(prefix="gptkit-bench-cache-"))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    results = []
    with tempfile.TemporaryDirectory() as d:
        for setting in args.settings.split(","):
            tok_s, cfg = run(setting, args.steps, args.overrides, Path(d))
            config = AutoConfig.for_model(**cfg)
            with torch.device("meta"):
                n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
            n -= config.n_positions * config.n_embd  # position embeddings do no multiply-adds
            flops_per_token = 6 * n + 12 * config.n_layer * config.n_positions * config.n_embd
            results.append((setting, tok_s, tok_s * flops_per_token / (args.peak_tflops * 1e12)))
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{name}, torch {torch.__version__}; GPT-2 small ({n / 1e6:.0f}M non-embedding-position params)")
    for setting, tok_s, mfu in results:
        print(f"{setting:8s} {tok_s:12,.0f} tokens/s   MFU {100 * mfu:5.1f}%")


if __name__ == "__main__":
    main()
