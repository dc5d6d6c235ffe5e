#!/usr/bin/env bash
# Distillation goal run (issue 12): a deeper teacher, a student pruned from it, the student trained with and without
# the teacher over several seeds. Multi30k en->de, all 29k pairs, scored on test2016 (1,000) and the 500-pair test file.
#   Teacher: 4 layers x 128 (0.94M), `pretrain/tiny` with n_layer=4 (the demo base's tokenizer), then
#            `translate/multi30k-cpu` (4,000 x 32 steps).
#   Student: `gptkit prune TEACHER --layers 2 --mlp 0.72` (2 of 4 blocks, 143 of 512 neurons: 0.35M, 38%), then
#            `translate/multi30k-cpu` for STEPS (3,000) x 32 steps, per seed: alone, and with distill.teacher (alpha .5, T 1).
# Prints per seed BLEU of both twins, sacreBLEU's paired bootstrap test between them, and the means.
# CPU, 2 cores: teacher ~12 min, each seed ~11 min.
#   bash bench/distill_deep.sh [WORKDIR]        environment: SEEDS ("1337 7 42"), STEPS (3000)
set -euo pipefail
cd "$(dirname "$0")/.."
W=$(realpath -m "${1:-runs/distill-deep}")
G=".venv/bin/gptkit"
SEEDS=${SEEDS:-1337 7 42}
STEPS=${STEPS:-3000}
mkdir -p "$W"
[ -f "$W/base/model.safetensors" ] || $G pretrain pretrain/tiny output.dir="$W/base" --overwrite
[ -f "$W/base4/model.safetensors" ] || $G pretrain pretrain/tiny model.n_layer=4 tokenizer.kind=pretrained \
   tokenizer.path="$W/base" output.dir="$W/base4" --overwrite
[ -f "$W/teacher/test_metrics.json" ] || $G finetune translate/multi30k-cpu model.init_from="$W/base4" \
   output.dir="$W/teacher" --overwrite
[ -f "$W/student/model.safetensors" ] || $G prune "$W/teacher" --layers 2 --mlp 0.72 --out "$W/student"
L=(train.max_steps="$STEPS" train.eval_every=$((STEPS / 2)) train.save_every=$((STEPS / 2)) train.warmup_steps=50)
score() {  # predictions on test2016 (the recipe's test split) and on the 500-pair test file
  [ -f "$1/eval-test2016/predictions.jsonl" ] || $G eval --model "$1" --split test --out "$1/eval-test2016"
  [ -f "$1/eval-test/predictions.jsonl" ] || $G eval --model "$1" --data data/translate/multi30k_en_de_test.jsonl \
     --out "$1/eval-test"
}
score "$W/teacher"
for seed in $SEEDS; do
  [ -f "$W/alone-$seed/test_metrics.json" ] || $G finetune translate/multi30k-cpu model.init_from="$W/student" \
     "${L[@]}" train.seed="$seed" output.dir="$W/alone-$seed" --overwrite
  [ -f "$W/distilled-$seed/test_metrics.json" ] || $G distill translate/multi30k-cpu model.init_from="$W/student" \
     "${L[@]}" train.seed="$seed" distill.teacher="$W/teacher" distill.alpha=0.5 distill.temperature=1 \
     output.dir="$W/distilled-$seed" --overwrite
  score "$W/alone-$seed"; score "$W/distilled-$seed"
done
.venv/bin/python - "$W" $SEEDS <<'PY'
import json, math, sys
from pathlib import Path

from safetensors import safe_open
from sacrebleu.metrics import BLEU
from sacrebleu.significance import PairedTest

w, seeds = Path(sys.argv[1]), sys.argv[2:]

def params(run):
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())

def preds(run, split):
    return [json.loads(line)["prediction"] for line in (run / f"eval-{split}" / "predictions.jsonl").open()]

def refs(split):
    path = {"test2016": "data/translate/multi30k_en_de_test2016.jsonl", "test": "data/translate/multi30k_en_de_test.jsonl"}
    return [json.loads(line)["target"] for line in open(path[split])]

def bleu(hyps, split):
    return BLEU().corpus_score(hyps, [refs(split)]).score

teacher = w / "teacher"
tp = params(teacher)
t = {s: bleu(preds(teacher, s), s) for s in ("test2016", "test")}
print(f"teacher  {tp / 1e6:.3f}M params   test2016 BLEU {t['test2016']:.2f}   test {t['test']:.2f}")
print(f"student  {params(w / 'student') / 1e6:.3f}M params ({params(w / 'student') / tp:.0%} of the teacher)")
means = {("alone", s): [] for s in ("test2016", "test")} | {("distilled", s): [] for s in ("test2016", "test")}
for seed in seeds:
    for split in ("test2016", "test"):
        a, d = preds(w / f"alone-{seed}", split), preds(w / f"distilled-{seed}", split)
        means["alone", split].append(bleu(a, split))
        means["distilled", split].append(bleu(d, split))
        # sacreBLEU's paired bootstrap resampling (1,000 samples): p that the distilled twin is not better
        _, res = PairedTest([("alone", a), ("distilled", d)], {"BLEU": BLEU()}, [refs(split)], test_type="bs",
                            n_samples=1000)()
        p = res["BLEU"][1].p_value
        print(f"seed {seed:>5} {split:8}  alone {means['alone', split][-1]:6.2f} "
              f"({means['alone', split][-1] / t[split]:.1%})  distilled {means['distilled', split][-1]:6.2f} "
              f"({means['distilled', split][-1] / t[split]:.1%})  paired bootstrap p = {p:.3f}")
for split in ("test2016", "test"):
    a, d = (sum(means[k, split]) / len(seeds) for k in ("alone", "distilled"))
    print(f"mean of {len(seeds)} seeds, {split:8}: alone {a:.2f} ({a / t[split]:.1%} of the teacher), "
          f"distilled {d:.2f} ({d / t[split]:.1%}), distilled - alone {d - a:+.2f}")
PY
