#!/usr/bin/env bash
# Back-translation where it should help: Multi30k en->de with 2,000 real pairs, against the same recipe plus the
# German side of 8,000 other training pairs back-translated by a de->en model trained on the same 2,000 pairs.
# CPU, a few minutes; prints both test BLEU figures (test2016, 1,000 pairs).
#   bash bench/backtranslation.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
W=$(realpath -m "${1:-runs/bt-bench}")
G=".venv/bin/gptkit"
mkdir -p "$W"
python3 - "$W" <<'PY'
import json, sys
rows = [json.loads(l) for l in open("data/translate/multi30k_en_de_train_full.jsonl")]
w = sys.argv[1]
with open(f"{w}/real.jsonl", "w") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:2000])
with open(f"{w}/mono_de.jsonl", "w") as f:  # German only: the English side is never used
    f.writelines(json.dumps({"target": r["target"]}, ensure_ascii=False) + "\n" for r in rows[2000:10000])
PY
COMMON="train.max_steps=800 train.eval_every=400 train.save_every=800 finetune.eval_examples=50 data.val_files=[$PWD/data/translate/multi30k_en_de_validation.jsonl] data.test_files=[$PWD/data/translate/multi30k_en_de_test2016.jsonl]"
[ -f "$W/base/model.safetensors" ] || $G pretrain pretrain/tiny output.dir="$W/base" --overwrite
# de->en on the real pairs (columns swapped), no test split: it only has to translate the monolingual German
$G finetune translate/multi30k-tiny model.init_from="$W/base" "data.train_files=[$W/real.jsonl]" \
   "data.columns={source: target, target: source}" 'finetune.prompt="German: {source}\nEnglish:"' $COMMON \
   data.test_files=[] output.dir="$W/de-en" --overwrite
$G augment backtranslate --model "$W/de-en" --data "$W/mono_de.jsonl" --out "$W/synthetic.jsonl" --batch-size 64 \
   --max-new-tokens 40 --overwrite
$G finetune translate/multi30k-tiny model.init_from="$W/base" "data.train_files=[$W/real.jsonl]" $COMMON \
   output.dir="$W/real-only" --overwrite
$G finetune translate/multi30k-tiny model.init_from="$W/base" \
   "data.train_files=[$W/real.jsonl,$W/synthetic.jsonl]" "data.train_weights=[1,1]" \
   'finetune.synthetic_tag="<BT>"' $COMMON output.dir="$W/real+bt" --overwrite
for r in real-only real+bt; do echo "$r: $(cat "$W/$r/test_metrics.json" | tr -d '\n ')"; done
