"""nanoGPT's own CPU benchmark, side by side: `pretrain/shakespeare-char` against nanoGPT's `train.py` with the
README's CPU command (4 layers, 4 heads, 128 wide, context 64, batch 12, 2000 iterations, no dropout).

Not a test: it prints both wall times (everything included: start-up, data preparation / tokenizer and
tokenization, evaluation, checkpoints, final save), both final validation losses and the ratio (goal: gptkit
<= 0.8x nanoGPT's time at val loss <= 1.88). nanoGPT is not vendored: pass a checkout (e.g. `git clone
https://github.com/karpathy/nanoGPT`); it runs in a temporary copy, its `input.txt` is the bundled
tinyshakespeare (so `prepare.py` downloads nothing). gptkit runs with a cold data cache.

    python bench/vs_nanogpt.py --nanogpt PATH [--threads N] [--runs 1] [--same-schedule]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
               "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
               "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0, res.stdout + res.stderr


def nanogpt(src: Path, tmp: Path, env: dict) -> tuple[float, float]:
    work = tmp / "nanogpt"
    shutil.copytree(src, work, ignore=shutil.ignore_patterns(".git", "out-*"))
    data = work / "data" / "shakespeare_char"
    shutil.copy(ROOT / "data" / "tinyshakespeare.txt", data / "input.txt")
    prep, _ = timed([sys.executable, "prepare.py"], data, env)
    train, out = timed([sys.executable, "train.py", *NANOGPT_CPU], work, env)
    val = [float(v) for v in re.findall(r"step \d+: train loss [\d.]+, val loss ([\d.]+)", out)]
    return prep + train, val[-1]


# nanoGPT's own hyperparameters on the recipe (2000 iterations, lr 1e-3 decaying to 1e-4, eval every 250)
NANOGPT_SCHEDULE = ["train.max_steps=2000", "train.lr=1e-3", "train.min_lr=1e-4"]


def gptkit(tmp: Path, env: dict, overrides: list[str] = ()) -> tuple[float, float]:
    run = tmp / "gptkit-run"
    env = {**env, "GPTKIT_CACHE": str(tmp / "cache")}  # cold: tokenizer training and tokenization included
    wall, _ = timed([sys.executable, "-m", "gptkit", "pretrain", "pretrain/shakespeare-char", f"output.dir={run}",
                     *overrides], ROOT, env)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return wall, [r["val_loss"] for r in rows if "val_loss" in r][-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", required=True, type=Path, help="a nanoGPT checkout")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (default: torch's)")
    ap.add_argument("--runs", type=int, default=1, help="alternate the runs this many times; report the medians")
    ap.add_argument("--same-schedule", action="store_true",
                    help="also run gptkit with nanoGPT's schedule (2000 steps at lr 1e-3) on the same model")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    results: dict[str, list[tuple[float, float]]] = {"nanoGPT": [], "gptkit": []}
    if args.same_schedule:
        results["gptkit, nanoGPT's schedule"] = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            results["nanoGPT"].append(nanogpt(args.nanogpt, Path(tmp), env))
        with tempfile.TemporaryDirectory() as tmp:
            results["gptkit"].append(gptkit(Path(tmp), env))
        if args.same_schedule:
            with tempfile.TemporaryDirectory() as tmp:
                results["gptkit, nanoGPT's schedule"].append(gptkit(Path(tmp), env, NANOGPT_SCHEDULE))
        print(f"run {i + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f} s (val loss {v[-1][1]:.3f})" for k, v in results.items()),
              flush=True)
    med = {k: sorted(v)[(len(v) - 1) // 2] for k, v in results.items()}
    print("\n| | wall s | final val loss |\n|---|---|---|")
    for k, (wall, val) in med.items():
        print(f"| {k} | {wall:.1f} | {val:.3f} |")
    print(f"\ngptkit / nanoGPT wall time: {med['gptkit'][0] / med['nanoGPT'][0]:.2f}x (goal <= 0.8x); nanoGPT's val loss "
          "is its 20-batch estimate, gptkit's the whole validation split")


if __name__ == "__main__":
    main()
