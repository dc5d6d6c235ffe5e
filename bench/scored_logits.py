"""Fine-tuning step cost with the output layer on every position (the usual ``model(...).logits``) against gptkit's
``modeling.logits_where`` (the output layer on the scored target positions only) and ``modeling.scored_cross_entropy``
(those positions, the output layer fused with the loss in chunks: what training uses), same model and batches, one run.

Not a test: prints ms per training step (forward + backward of the summed target-token cross-entropy) and the peak
memory of the step's tensors (torch's CPU allocator does not report peaks: this counts the logits-sized tensors the
paths hold, from the shapes), then each path's measured peak RSS over three steps in a fresh process, for a
prompt/answer batch: ``--answer`` of each example's tokens are scored.

    python bench/scored_logits.py [--vocab 50257] [--width 256] [--layers 2] [--batch 16] [--length 128] [--answer 0.4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--answer", type=float, default=0.4, help="share of each example's positions that are scored")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--only", choices=["full", "scored", "fused"], help="one path, then print this process's peak RSS")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, GPT2Config

    from gptkit import modeling

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=args.vocab, n_embd=args.width, n_layer=args.layers,
                                                        n_head=4, n_positions=args.length, resid_pdrop=0.0,
                                                        embd_pdrop=0.0, attn_pdrop=0.0))
    B, T = args.batch, args.length
    ids = torch.randint(0, args.vocab, (B, T))
    labels = ids.clone()
    start = T - int(T * args.answer)
    labels[:, :start] = -100  # the prompt is not scored
    keep = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1))
    targets = labels[:, 1:][keep[:, :-1]]

    def full():
        logits = model(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum")

    def scored():
        logits = modeling.logits_where(model, keep, input_ids=ids)
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")

    def fused():
        return modeling.scored_cross_entropy(model, keep, targets, input_ids=ids)

    paths = {"full": full, "scored": scored, "fused": fused}
    if args.only:  # a child of the run below: the peak resident memory of this path's steps (Linux)
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current resident size
        base = _status_mib("VmRSS")
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            paths[args.only]().backward()
        print(json.dumps({"before": base, "peak": _status_mib("VmHWM")}))
        return
    times = {}
    for name, fn in list(paths.items()) * 2:  # alternating: the second round counts
        fn().backward()  # warm-up
        t = time.perf_counter()
        for _ in range(args.steps):
            model.zero_grad(set_to_none=True)
            loss = fn()
            loss.backward()
        times[name] = (time.perf_counter() - t) / args.steps * 1e3
    a, b, c = full().item(), scored().item(), fused().item()
    assert abs(a - b) <= 1e-4 * abs(a) and abs(a - c) <= 1e-4 * abs(a), (a, b, c)
    n = int(keep.sum())
    mib = lambda rows: rows * args.vocab * 4 * 3 / 2**20  # logits, their log-softmax and gradient, float32
    print(f"GPT-2 {args.layers} x {args.width}, vocab {args.vocab:,}, batch {B} x {T}, {n} of {B * T} positions scored "
          f"({n / (B * T):.0%}); {torch.get_num_threads()} threads")
    print(f"output layer on every position : {times['full']:8.1f} ms/step   logits-sized tensors {mib(B * T):8.0f} MiB")
    print(f"output layer on scored targets : {times['scored']:8.1f} ms/step   logits-sized tensors {mib(n):8.0f} MiB")
    chunk = min(n, modeling._chunk_rows(args.vocab))
    print(f"... fused with the loss, chunked: {times['fused']:8.1f} ms/step   logits-sized tensors "
          f"{mib(chunk) * 2 / 3:8.0f} MiB (one chunk of {chunk} rows, logits and softmax in place)")
    print(f"speed-up {times['full'] / times['scored']:.2f}x scored, {times['full'] / times['fused']:.2f}x fused; "
          f"same summed loss ({a:.4f}, {b:.4f}, {c:.4f})")
    argv = [a for a in sys.argv[1:] if not a.startswith("--only")]
    for name in paths:  # peak resident memory of three training steps, each path in a fresh process
        out = subprocess.run([sys.executable, __file__, *argv, "--only", name], capture_output=True, text=True, check=True)
        rss = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"peak RSS, {name:6s}: {rss['peak']:7.0f} MiB ({rss['peak'] - rss['before']:+.0f} MiB over the process "
              "before its first step)")


if __name__ == "__main__":
    main()
