"""GPU pretraining throughput and model FLOPs utilisation (MFU) of `gptkit pretrain` on the GPT-2 small recipe,
with nanoGPT's `train.py` side by side on the same tokens, shape, batch and precision.

Not a test, and only meaningful on a GPU. Runs `gptkit pretrain pretrain/gpt2-small` for a few steps per
setting, then prints tokens/s (median over logged intervals after the first, so compilation is excluded) and
MFU = tokens/s x FLOPs/token / peak, with FLOPs/token = 6N + 12·L·T·d (PaLM appendix B, as nanoGPT counts it;
N without the position embeddings). Settings:
  compile    bf16 + torch.compile (the recipe's own)
  plainhead  the same with the model's full logits and a plain cross-entropy (GPTKIT_PLAIN_HEAD=1) instead of the
             output layer fused with the loss in chunks: what that lever is worth on this GPU
  nopad      the same with the vocabulary unpadded (model.vocab_multiple=1; the recipe pads to 128)
  eager      bf16 without compile
  fp32       fp32 (TF32 matmuls) without compile
With `--nanogpt PATH` (a checkout of https://github.com/karpathy/nanoGPT; not vendored) its `train.py` runs in a
temporary copy on gptkit's tokens of the same corpus (written as its train.bin / val.bin, the vocabulary size of
gptkit's padded model in meta.pkl), with GPT-2's biases, the same micro-batch, accumulation, context, steps and
precision as the first setting, and its per-iteration times give its tokens/s and MFU by the same formula.
`--smoke` runs a tiny shape in fp32 on the CPU (both sides) to check the plumbing, not to measure.

    python bench/pretrain_mfu.py [--steps 60] [--peak-tflops 989] [--settings compile,plainhead,nopad,eager,fp32]
                                 [--nanogpt PATH] [--smoke] [recipe overrides, e.g. train.batch_size=32]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "compile": ["train.precision=bf16", "train.compile=true"],
    "plainhead": ["train.precision=bf16", "train.compile=true"],
    "nopad": ["train.precision=bf16", "train.compile=true", "model.vocab_multiple=1"],
    "eager": ["train.precision=bf16", "train.compile=false"],
    "fp32": ["train.precision=fp32", "train.compile=false"],
    "cpu": ["train.precision=fp32", "train.compile=false"],  # --smoke
}
SMOKE = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.context=64", "tokenizer.vocab_size=512",
         "train.batch_size=4", "train.grad_accum=2"]


def run(setting: str, steps: int, extra: list[str], corpus: Path, out: Path) -> tuple[float, Path]:
    run_dir = out / setting
    cmd = [sys.executable, "-m", "gptkit", "pretrain", "pretrain/gpt2-small", f"output.dir={run_dir}", "--overwrite",
           f"data.train_files=[{corpus}]", f"train.max_steps={steps}", "train.log_every=5", f"train.save_every={steps}",
           f"train.eval_every={steps}", "train.eval_batches=2", "train.warmup_steps=5", *SETTINGS[setting], *extra]
    env = dict(os.environ, GPTKIT_PLAIN_HEAD="1" if setting == "plainhead" else "0")
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train_tokens_per_s"] for r in rows if "train_tokens_per_s" in r][1:]
    return statistics.median(rates), run_dir


def nanogpt(src: Path, run_dir: Path, corpus: Path, steps: int, cuda: bool, compiled: bool, out: Path) -> float:
    """nanoGPT's train.py on gptkit's tokens, shape, batch, steps and precision (those of ``run_dir``): tokens/s,
    the median over iterations after the first five (compilation)."""
    import numpy as np
    from transformers import AutoTokenizer

    work = out / "nanogpt"
    shutil.copytree(src, work, ignore=shutil.ignore_patterns(".git", "out*", "assets"))
    config = json.loads((run_dir / "config.json").read_text())
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    ids = np.array(AutoTokenizer.from_pretrained(run_dir)(corpus.read_text(), verbose=False)["input_ids"], dtype=np.uint16)
    data = work / "data" / "gptkit"
    data.mkdir(parents=True)
    cut = int(len(ids) * 0.95)
    ids[:cut].tofile(data / "train.bin")
    ids[cut:].tofile(data / "val.bin")
    (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": config["vocab_size"]}))
    t = recipe["train"]
    args = ["--dataset=gptkit", f"--out_dir={work / 'out'}", f"--n_layer={config['n_layer']}",
            f"--n_head={config['n_head']}", f"--n_embd={config['n_embd']}", f"--block_size={config['n_positions']}",
            "--bias=True", "--dropout=0.0", f"--batch_size={t['batch_size']}",
            f"--gradient_accumulation_steps={t['grad_accum']}", f"--max_iters={steps}", f"--lr_decay_iters={steps}",
            "--warmup_iters=5", f"--learning_rate={t['lr']}", f"--min_lr={t['min_lr']}", "--eval_interval=1000000",
            "--eval_iters=1", "--log_interval=1", "--always_save_checkpoint=False", f"--compile={compiled}",
            f"--dtype={'bfloat16' if cuda else 'float32'}", f"--device={'cuda' if cuda else 'cpu'}"]
    res = subprocess.run([sys.executable, "train.py", *args], cwd=work, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"nanoGPT train.py failed:\n{res.stderr[-3000:]}")
    times = [float(ms) for ms in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", res.stdout)][5:]
    tokens = t["batch_size"] * t["grad_accum"] * config["n_positions"]
    return tokens / (statistics.median(times) / 1000)


def flops_per_token(run_dir: Path) -> tuple[float, int]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads((run_dir / "config.json").read_text()))
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    n -= config.n_positions * config.n_embd  # position embeddings do no multiply-adds
    return 6 * n + 12 * config.n_layer * config.n_positions * config.n_embd, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--settings", default="compile,plainhead,nopad,eager,fp32")
    p.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout: run its train.py side by side")
    p.add_argument("--corpus", type=Path, default=ROOT / "data" / "tinyshakespeare.txt")
    p.add_argument("--smoke", action="store_true", help="a tiny fp32 run on the CPU: checks the plumbing only")
    p.add_argument("overrides", nargs="*", help="extra recipe overrides, e.g. train.batch_size=32")
    args = p.parse_args()
    os.environ.setdefault("GPTKIT_CACHE", tempfile.mkdtemp(prefix="gptkit-bench-cache-"))
    import torch

    settings = ["cpu"] if args.smoke else args.settings.split(",")
    overrides = [*SMOKE, *args.overrides] if args.smoke else args.overrides
    results = []
    with tempfile.TemporaryDirectory() as d:
        for setting in settings:
            tok_s, run_dir = run(setting, args.steps, overrides, args.corpus.resolve(), Path(d))
            fpt, n = flops_per_token(run_dir)
            results.append((setting, tok_s, tok_s * fpt / (args.peak_tflops * 1e12)))
            if setting == settings[0]:
                first = run_dir
        if args.nanogpt:
            compiled = "train.compile=true" in SETTINGS[settings[0]]
            tok_s = nanogpt(args.nanogpt, first, args.corpus.resolve(), args.steps, not args.smoke, compiled, Path(d))
            fpt, _ = flops_per_token(first)
            results.append((f"nanoGPT ({settings[0]})", tok_s, tok_s * fpt / (args.peak_tflops * 1e12)))
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{name}, torch {torch.__version__}; {n / 1e6:.1f}M parameters without the position embeddings")
    for setting, tok_s, mfu in results:
        print(f"{setting:20s} {tok_s:12,.0f} tokens/s   MFU {100 * mfu:5.1f}%")
    if args.nanogpt:
        print(f"gptkit / nanoGPT ({settings[0]}): {results[0][1] / results[-1][1]:.2f}x")


if __name__ == "__main__":
    main()
