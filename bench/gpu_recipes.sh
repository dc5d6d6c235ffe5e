#!/usr/bin/env bash
# The GPU-sized fine-tuning recipes (*-gpt2) end to end on one GPU, as measured for the README:
# a GPT-2-small base pretrained on the bundled training splits, then each recipe from it.
#   bash bench/gpu_recipes.sh            (from the repository root, gptkit installed; about 12 min on an H100)
set -euo pipefail
corpus=${CORPUS:-runs/bundled-corpus.txt}
mkdir -p runs
python - "$corpus" <<'PY'
import json, sys
# Training splits only (never validation/test text), one paragraph per document, Shakespeare last.
sources = [("data/translate/multi30k_en_de_train.jsonl", ["source", "target"]),
           ("data/summarize/scitldr_train.jsonl", ["document", "summary"]),
           ("data/classify/sst2_train.jsonl", ["text"]),
           ("data/qa/squad_v1_dev_subset_train.jsonl", ["context"])]
with open(sys.argv[1], "w") as out:
    for path, cols in sources:
        seen = set()
        for line in open(path):
            row = json.loads(line)
            for c in cols:
                text = str(row[c]).strip().replace("\n\n", "\n")
                if text and text not in seen:
                    seen.add(text)
                    out.write(text + "\n\n")
    out.write(open("data/tinyshakespeare.txt").read())
PY
timed() { local s=$SECONDS; "$@"; echo "wall: $((SECONDS - s)) s  ($*)"; }
timed gptkit pretrain pretrain/gpt2-small "data.train_files=[$PWD/$corpus]" data.sample_by=paragraph \
    train.max_steps=800 train.grad_accum=1 train.warmup_steps=100 train.eval_every=400 train.save_every=800 --overwrite
for recipe in translate/multi30k-gpt2 classify/sst2-gpt2 qa/squad-gpt2 summarize/scitldr-gpt2; do
    timed gptkit finetune "$recipe" model.init_from=runs/gpt2-small --overwrite
done
