#!/usr/bin/env bash
# Structured pruning on a bundled task (issue 12): the Multi30k en->de run of `make demo` (translate/multi30k-tiny on
# pretrain/tiny) with 25% and 50% of its feed-forward neurons removed, one of its two blocks removed, and both
# (importance from its own training examples), then each fine-tuned again for a short 150 steps, as is the unpruned
# run (the fair comparison). Prints parameters, CPU tokens/s and test BLEU/chrF of each.
#   bash bench/prune.sh RUN [WORKDIR]        (RUN: a translate run, e.g. runs/multi30k-tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=$(realpath "$1")
W=$(realpath -m "${2:-runs/prune-bench}")
G=".venv/bin/gptkit"
mkdir -p "$W"
SHORT="train.max_steps=150 train.warmup_steps=10 train.eval_every=150 train.save_every=150"
# the unpruned run with the same extra steps: what the recovery fine-tunes are compared with
$G finetune "$RUN/recipe.yaml" model.init_from="$RUN" $SHORT output.dir="$W/orig-ft" --overwrite
VARIANTS=(mlp25 mlp50 layers1 layers1-mlp57)
declare -A ARGS=([mlp25]="--mlp 0.25" [mlp50]="--mlp 0.5" [layers1]="--layers 1" [layers1-mlp57]="--layers 1 --mlp 0.57")
MODELS=("$RUN" "$W/orig-ft")
for v in "${VARIANTS[@]}"; do
  rm -rf "$W/$v" "$W/$v-ft"
  $G prune "$RUN" ${ARGS[$v]} --out "$W/$v"
  $G finetune "$W/$v/recipe.yaml" model.init_from="$W/$v" $SHORT output.dir="$W/$v-ft" --overwrite
  MODELS+=("$W/$v" "$W/$v-ft")
done
for m in "${MODELS[@]}"; do
  $G eval --model "$m" --split test --out "$W/ev-$(basename "$m")" > /dev/null
done
.venv/bin/python - "$RUN" "$W" "${MODELS[@]}" <<'PY'
import json, sys, time
from pathlib import Path
import torch
from gptkit import trained
run, w = Path(sys.argv[1]), Path(sys.argv[2])
def speed(folder, new=64):
    model, tok, _ = trained.load_any(str(folder))
    ids = tok("A man in a blue shirt", return_tensors="pt")["input_ids"]
    best = 0.0
    with torch.inference_mode():
        for _ in range(4):
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
            best = max(best, new / (time.perf_counter() - t))
    return best, sum(p.numel() for p in model.parameters())
base_speed, base_params = speed(run)
for m in map(Path, sys.argv[3:]):
    s, p = speed(m)
    metrics = json.loads((w / f"ev-{m.name}" / "metrics.json").read_text())["metrics"]
    print(f"{m.name:22} {p / 1e6:6.3f}M params ({p / base_params:4.0%})  {s:6.1f} tokens/s ({s / base_speed:4.2f}x)  "
          f"BLEU {metrics['bleu']:6.2f}  chrF {metrics['chrf']:6.2f}")
PY
