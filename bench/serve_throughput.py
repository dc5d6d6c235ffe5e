"""`gptkit serve` under concurrent load: requests/s, tokens/s and p50/p95 latency of N clients against a live server,
batched (--max-batch 32) and the same server handling requests one at a time (--max-batch 1), in one run.

    python bench/serve_throughput.py --model runs/tiny            # a trained run or model directory
    python bench/serve_throughput.py                              # trains pretrain/tiny first (about a minute)

Each client sends --requests completions of --max-tokens tokens (ignore_eos, so every answer has that length;
greedy, or --temperature > 0 for sampling) one after another; all clients start together. Prints one line per
mode and the ratio; goal: >= 5x tokens/s at 32 clients on CPU with the tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(model: str, max_batch: int, wait_ms: float) -> tuple[subprocess.Popen, str]:
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "gptkit", "serve", model, "--port", "0", "--max-batch",
                             str(max_batch), "--wait-ms", str(wait_ms)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        found = re.search(r"at (http://127\.0\.0\.1:\d+)", Path(log.name).read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            sys.exit(f"server exited: {Path(log.name).read_text()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    sys.exit("server did not start in 180 s")


async def load(url: str, clients: int, requests: int, max_tokens: int, temperature: float) -> dict:
    import httpx

    latencies: list[float] = []
    tokens = 0

    async def client(http, c: int) -> None:
        nonlocal tokens
        for r in range(requests):
            body = {"prompt": f"ROMEO {c}-{r}:", "max_tokens": max_tokens, "temperature": temperature,
                    "ignore_eos": True}
            started = time.perf_counter()
            resp = await http.post(f"{url}/v1/completions", json=body)
            resp.raise_for_status()
            latencies.append(time.perf_counter() - started)
            tokens += resp.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await http.post(f"{url}/v1/completions", json={"prompt": "warm", "max_tokens": 4})  # first call compiles
        started = time.perf_counter()
        await asyncio.gather(*(client(http, c) for c in range(clients)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {"wall": wall, "requests/s": len(latencies) / wall, "tokens/s": tokens / wall,
            "p50": statistics.median(latencies), "p95": latencies[int(0.95 * (len(latencies) - 1))]}


def tiny_model() -> str:
    out = Path(tempfile.mkdtemp()) / "tiny"
    subprocess.run([sys.executable, "-m", "gptkit", "pretrain", "pretrain/tiny", f"output.dir={out}"], check=True,
                   cwd=ROOT)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="run or model directory (default: train pretrain/tiny)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--wait-ms", type=float, default=5.0)
    args = ap.parse_args()
    model = args.model or tiny_model()
    print(f"model {model}; {args.clients} clients x {args.requests} requests x {args.max_tokens} tokens; "
          f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    results = {}
    for label, batch in (("one at a time", 1), (f"batched ({args.clients})", args.clients)):
        proc, url = start_server(model, batch, args.wait_ms)
        try:
            results[label] = r = asyncio.run(load(url, args.clients, args.requests, args.max_tokens, args.temperature))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        print(f"{label:<16} {r['requests/s']:7.2f} req/s  {r['tokens/s']:8.1f} tokens/s  p50 {r['p50']:6.2f} s  "
              f"p95 {r['p95']:6.2f} s  ({r['wall']:.1f} s)", flush=True)
    one, many = results.values()
    print(f"ratio batched / one at a time: {many['tokens/s'] / one['tokens/s']:.2f}x tokens/s, "
          f"p95 {many['p95'] / one['p95']:.2f}x")


if __name__ == "__main__":
    main()
