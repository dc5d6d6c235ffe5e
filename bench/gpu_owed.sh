#!/usr/bin/env bash
# The GPU figures the open issues still owe, in parts that each fit one device call (<= 10 minutes; a session
# gets 15 device minutes, start-up included, so pick one or two parts per session). From the repository root,
# gptkit installed (on a bare device machine: python3 -m pip install -q --no-deps -e .):
#   bash bench/gpu_owed.sh mfu       issue 11 goal 3: MFU of compile / plainhead / nopad + nanoGPT's train.py side
#                                    by side (nanoGPT travels as an ignored folder: cp -r CHECKOUT .bench/nanoGPT;
#                                    echo /.bench/ >> .git/info/exclude; name .bench in the call's carry)
#   bash bench/gpu_owed.sh loop      issue 11 goal 2, GPU half: the loop vs the Trainer, both bf16 + torch.compile
#   bash bench/gpu_owed.sh multi30k  issue 11 goal 4, GPU half: the from-nothing pair (pretrain/multi30k-h100 then
#                                    translate/multi30k-h100), each step timed, test2016 BLEU from test_metrics.json
#   bash bench/gpu_owed.sh multi30k-bart   the same with the encoder-decoder pair (pretrain/multi30k-bart-h100 then
#                                    translate/multi30k-bart-h100), which won on the CPU
#   bash bench/gpu_owed.sh fsdp      issue 10 section 3: FSDP2 through Accelerate's plugin on the GPU (1 process):
#                                    20 + 20 steps with a resume against 40 straight, the export loads in plain
#                                    transformers; then LoRA under FSDP2
# Everything it prints is what the README and the issue notes need; OUT (if set) receives the logs.
set -euo pipefail
part=${1:?usage: bash bench/gpu_owed.sh mfu|loop|multi30k|multi30k-bart|fsdp}
out=${OUT:-runs/gpu-owed}
mkdir -p "$out" runs
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
timed() { local s=$SECONDS; "$@"; echo "wall: $((SECONDS - s)) s  ($*)"; }

case $part in
mfu)
    nano=()
    [ -d .bench/nanoGPT ] && nano=(--nanogpt .bench/nanoGPT)
    timed python3 bench/pretrain_mfu.py --steps 40 --settings compile,plainhead,nopad "${nano[@]}" 2>&1 \
        | tee "$out/mfu.log" | grep -v "^gptkit: step\|Warning\|warn" ;;
loop)
    timed python3 bench/pretrain_throughput.py 2>&1 | tee "$out/loop.log" | tail -20 ;;
multi30k)
    timed gptkit pretrain pretrain/multi30k-h100 --overwrite 2>&1 | tee "$out/multi30k-lm.log" | tail -3
    timed gptkit finetune translate/multi30k-h100 model.init_from=runs/multi30k-h100-lm --overwrite 2>&1 \
        | tee "$out/multi30k.log" | grep -v "^gptkit: step" | tail -15
    cat runs/multi30k-h100/test_metrics.json ;;
multi30k-bart)
    timed gptkit init pretrain/multi30k-bart-h100 --overwrite 2>&1 | tail -1
    timed gptkit finetune translate/multi30k-bart-h100 model.init_from=runs/multi30k-bart-h100-init --overwrite 2>&1 \
        | tee "$out/multi30k-bart.log" | grep -v "^gptkit: step" | tail -15
    cat runs/multi30k-bart-h100/test_metrics.json ;;
fsdp)
    common=(pretrain/tiny distributed.strategy=fsdp train.max_steps=40 train.save_every=20 train.eval_every=20)
    timed accelerate launch --num_processes 1 -m gptkit pretrain "${common[@]}" output.dir=runs/fsdp-straight --overwrite
    accelerate launch --num_processes 1 -m gptkit pretrain "${common[@]}" train.max_steps=20 output.dir=runs/fsdp-resumed --overwrite
    accelerate launch --num_processes 1 -m gptkit pretrain "${common[@]}" output.dir=runs/fsdp-resumed --resume --force
    python3 - <<'PY'
import json
from transformers import AutoModelForCausalLM
rows = {d: [json.loads(l) for l in open(f"runs/{d}/metrics.jsonl")] for d in ("fsdp-straight", "fsdp-resumed")}
last = {d: [r for r in rs if "val_loss" in r][-1]["val_loss"] for d, rs in rows.items()}
print("val loss at 40, straight vs 20 + resume 20:", last, "equal:", last["fsdp-straight"] == last["fsdp-resumed"])
import glob  # a torch distributed checkpoint in the step folders says FSDP really sharded (one process may not)
print("sharded checkpoints written:", glob.glob("runs/fsdp-straight/checkpoints/*/sharded") or "NONE: FSDP was not active")
m = AutoModelForCausalLM.from_pretrained("runs/fsdp-straight")
print("export loads in plain transformers:", type(m).__name__, sum(p.numel() for p in m.parameters()), "parameters")
PY
    timed accelerate launch --num_processes 1 -m gptkit finetune translate/multi30k-tiny model.init_from=runs/fsdp-straight \
        distributed.strategy=fsdp finetune.method=lora train.max_steps=60 output.dir=runs/fsdp-lora --overwrite 2>&1 | tail -5 ;;
*)
    echo "unknown part: $part (mfu, loop, multi30k, multi30k-bart or fsdp)" >&2; exit 2 ;;
esac
