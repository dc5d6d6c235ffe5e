"""`gptkit quantize` int8 / int4 against the float model, in one run: size on disk, CPU generation tokens/s, perplexity
on held-out text and the task metric, each as a ratio to the unquantized model.

    python bench/quantize.py --model runs/multi30k-tiny          # a translate run (make demo writes this one)

Perplexity: `gptkit eval --task lm` on the Multi30k test2016 pairs (never trained on) written as the run's prompt
followed by the reference ("English: ...\nGerman: ...");
task metric: `gptkit eval --split test` (the run's test file; BLEU for translate); generation: greedy, 64 new tokens
(forced), batch 1, best of 3. Goal (issue 12): int8 <= 1% perplexity increase at <= 0.5x the size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ROOT / "data" / "translate" / "multi30k_en_de_test2016.jsonl"


def gptkit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "gptkit", *args], check=True, stdout=subprocess.DEVNULL)


def tokens_per_s(folder: Path, new: int = 64, repeats: int = 3) -> float:
    import torch

    from gptkit import trained

    model, tok, _ = trained.load_any(str(folder))
    ids = tok("A man in a blue shirt", return_tensors="pt")["input_ids"]
    best = 0.0
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        for _ in range(repeats):
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
            best = max(best, new / (time.perf_counter() - started))
    return best


def measure(folder: Path, work: Path, text: Path, limit: int | None) -> dict:
    name = folder.name
    gptkit("eval", "--model", str(folder), "--task", "lm", "--data", str(text), "--out", str(work / f"ppl-{name}"))
    ppl = json.loads((work / f"ppl-{name}" / "metrics.json").read_text())["metrics"]["perplexity"]
    gptkit("eval", "--model", str(folder), "--split", "test", "--out", str(work / f"task-{name}"),
           *(["--limit", str(limit)] if limit else []))
    task = json.loads((work / f"task-{name}" / "metrics.json").read_text())["metrics"]
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"bytes": size, "tokens/s": tokens_per_s(folder), "perplexity": ppl, "bleu": task.get("bleu"),
            "chrf": task.get("chrf")}


def _prompt(run: Path) -> str:
    from gptkit.recipe import load_recipe

    recipe = run / "recipe.yaml"
    prompt = load_recipe(recipe).finetune.prompt if recipe.is_file() else None
    return prompt or "{source}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a translate run (generative LM) or model folder")
    ap.add_argument("--limit", type=int, help="test examples scored (default: all)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gptkit-quantize-"))
    text = work / "held_out.txt"
    rows = [json.loads(line) for line in HELD_OUT.read_text().splitlines()]
    template = _prompt(Path(args.model))  # the text the model was trained on: its prompt and the answer
    text.write_text("\n\n".join(template.format(**r) + " " + r["target"] for r in rows) + "\n")
    folders = {"float32": Path(args.model).resolve()}
    for method in ("int8", "int4"):
        folders[method] = work / method
        gptkit("quantize", str(folders["float32"]), "--method", method, "--out", str(folders[method]))
    results = {k: measure(v, work, text, args.limit) for k, v in folders.items()}
    base = results["float32"]
    print(f"{'':8} {'size MB':>8} {'ratio':>6} {'tok/s':>7} {'ratio':>6} {'ppl':>8} {'change':>7} {'BLEU':>6} {'chrF':>6}")
    for name, r in results.items():
        print(f"{name:8} {r['bytes'] / 1e6:8.2f} {r['bytes'] / base['bytes']:6.2f} {r['tokens/s']:7.1f} "
              f"{r['tokens/s'] / base['tokens/s']:6.2f} {r['perplexity']:8.3f} "
              f"{100 * (r['perplexity'] / base['perplexity'] - 1):+6.2f}% {r['bleu'] or 0:6.2f} {r['chrf'] or 0:6.2f}")
    print(f"(work folder {work})")


if __name__ == "__main__":
    main()
