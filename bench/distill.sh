#!/usr/bin/env bash
# Distillation on a bundled task (issue 12): Multi30k en->de. Teacher: the demo's tiny base (2 layers x 128) fine-tuned
# by translate/multi30k-tiny. Student: 1 layer x 96 (41% of the teacher's parameters) pretrained with the teacher's
# tokenizer, then fine-tuned by the same recipe and steps twice: without a teacher, and with distill.teacher.
# Prints parameters and test BLEU/chrF of the three; CPU, about 10 minutes.
#   bash bench/distill.sh [WORKDIR] [extra overrides for both student fine-tunes]
# Environment: TEACHER_STEPS (600) trains the teacher longer (2400 for the README's stronger teacher);
# STUDENT=pruned starts the student from the teacher itself pruned to half its parameters
# (`gptkit prune --layers 1 --mlp 0.57`: one block of two, 220 of 512 feed-forward neurons) instead of a 1 x 96 base.
set -euo pipefail
cd "$(dirname "$0")/.."
W=$(realpath -m "${1:-runs/distill-bench}")
shift || true
G=".venv/bin/gptkit"
mkdir -p "$W"
[ -f "$W/base/model.safetensors" ] || $G pretrain pretrain/tiny output.dir="$W/base" --overwrite
STEPS=${TEACHER_STEPS:-600}
T="$W/teacher"; [ "$STEPS" = 600 ] || T="$W/teacher$STEPS"
[ -f "$T/test_metrics.json" ] || $G finetune translate/multi30k-tiny model.init_from="$W/base" output.dir="$T" \
   train.max_steps="$STEPS" train.eval_every=$((STEPS / 3)) train.save_every=$((STEPS / 3)) --overwrite
if [ "${STUDENT:-base}" = pruned ]; then
  S="$T-pruned"
  [ -f "$S/model.safetensors" ] || $G prune "$T" --layers 1 --mlp 0.57 --out "$S"
else
  S="$W/student-base"
  [ -f "$S/model.safetensors" ] || $G pretrain pretrain/tiny model.n_layer=1 model.n_embd=96 \
     tokenizer.kind=pretrained tokenizer.path="$W/base" output.dir="$S" --overwrite
fi
$G finetune translate/multi30k-tiny model.init_from="$S" output.dir="$W/student-plain" "$@" --overwrite
$G distill translate/multi30k-tiny model.init_from="$S" distill.teacher="$T" \
   output.dir="$W/student-distilled" "$@" --overwrite
.venv/bin/python - "$W" "$T" <<'PY'
import json, sys
from pathlib import Path
from safetensors import safe_open
w = Path(sys.argv[1])
def params(run):
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        return sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel") else
                   __import__("math").prod(f.get_slice(k).get_shape()) for k in f.keys())
teacher = Path(sys.argv[2])
t = json.loads((teacher / "test_metrics.json").read_text())
tp = params(teacher)
for name, run in (("teacher", teacher), ("student-plain", w / "student-plain"),
                  ("student-distilled", w / "student-distilled")):
    m = json.loads((run / "test_metrics.json").read_text())
    p = params(run)
    print(f"{name:18} {p / 1e6:6.3f}M params ({p / tp:4.0%})  test BLEU {m['test_bleu']:6.2f} "
          f"({m['test_bleu'] / t['test_bleu']:5.1%} of the teacher)  chrF {m['test_chrf']:6.2f}")
PY
