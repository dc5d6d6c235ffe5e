"""Fine-tuning data preparation: time and peak memory of reading and tokenizing a split, against the Hugging Face way.

Not a test: for each row count it prints seconds and peak resident memory (sampled every 0.1 s, the process and its
children) of
  gptkit  `finetune.splits` (rows read on demand from the datasets Arrow table) and the task's `preprocess`
          (batched encodes of 1,000 rows on every core, token ids kept as int32 arrays);
  HF      what `run_glue.py` / `run_translation.py` do: `datasets.load_dataset("json")`, then `Dataset.map(batched=True)`
          with the tokenizer (truncation to the same max_length; prompt + target for translate), results in Arrow.
Each runs in a fresh process after the same imports; the baseline figure is measured in the same run. Each then runs
again on its own cache (gptkit's tokenized examples, memory-mapped; datasets' Arrow table and map result): a resume's
or a sweep trial's second look at the same split. The rows
repeat the bundled SST-2 sentences (classify) or Multi30k pairs (translate); the base is a random 2-layer GPT-2
with a byte-level BPE tokenizer (8k) trained here on the same text.

    python bench/finetune_data.py [--rows 100000 1000000] [--tasks classify translate] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from data_throughput import measure  # noqa: E402

SOURCES = {"classify": ("data/classify/sst2_train.jsonl", {}),
           "translate": ("data/translate/multi30k_en_de_train_full.jsonl", {})}
MAX_LENGTH = 128

GPTKIT = r"""
import json, sys, time
from functools import partial
import torch, transformers, datasets  # the same imports as the baseline, before the clock starts
from gptkit import data as data_mod, finetune, tasks, trained
from gptkit.recipe import Recipe
task_name, path, base, columns = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
recipe = Recipe.model_validate({"task": task_name, "model": {"init_from": base}, "output": {"dir": base + "/out"},
                                "data": {"train_files": [path], "columns": columns}, "finetune": {"max_length": %d}})
t0 = time.perf_counter()
task = tasks.load(task_name)
tok = trained.tokenizer_of(base, "base")
rows = finetune.splits(recipe, task)["train"]
model = task.build_model(recipe, tok, rows)
t1 = time.perf_counter()
data = data_mod.cached_examples(recipe, tok, model, "train", partial(task.preprocess, recipe, tok, rows, "train", model))
t2 = time.perf_counter()
print(json.dumps({"read_s": t1 - t0, "tokenize_s": t2 - t1, "examples": len(data)}))
""" % MAX_LENGTH

HF = r"""
import json, sys, time
import torch, transformers, datasets
from transformers import AutoModelForSequenceClassification, AutoModelForCausalLM, AutoTokenizer
task_name, path, base, columns, cache = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
datasets.disable_progress_bars()
t0 = time.perf_counter()
tok = AutoTokenizer.from_pretrained(base)
ds = datasets.load_dataset("json", data_files=[path], split="train", cache_dir=cache)
if task_name == "classify":
    labels = sorted(set(ds["label"]))
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(labels))
    def encode(batch):
        out = tok(batch[columns.get("text", "text")], truncation=True, max_length=%d)
        out["labels"] = [labels.index(v) for v in batch["label"]]
        return out
else:
    AutoModelForCausalLM.from_pretrained(base)
    def encode(batch):  # prompt + target + EOS, the loss on the target (labels -100 on the prompt)
        prompts = tok([s + " =>" for s in batch["source"]], add_special_tokens=False)["input_ids"]
        targets = tok([" " + t for t in batch["target"]], add_special_tokens=False)["input_ids"]
        ids = [(p + t + [tok.eos_token_id])[:%d] for p, t in zip(prompts, targets)]
        return {"input_ids": ids, "labels": [[-100] * len(p) + i[len(p):] for p, i in zip(prompts, ids)]}
t1 = time.perf_counter()
data = ds.map(encode, batched=True, remove_columns=ds.column_names)
t2 = time.perf_counter()
print(json.dumps({"read_s": t1 - t0, "tokenize_s": t2 - t1, "examples": len(data)}))
""" % (MAX_LENGTH, MAX_LENGTH)


def make_base(work: Path) -> Path:
    """A random 2-layer GPT-2 with a byte-level BPE tokenizer (8k) trained on the bundled task text."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    base = work / "base"
    if (base / "model.safetensors").is_file():
        return base
    texts = [v for src, _ in SOURCES.values() for line in (ROOT / src).read_text().splitlines()
             for v in json.loads(line).values() if isinstance(v, str)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=8192, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", model_max_length=1024)
    eos = tok.eos_token_id
    config = GPT2Config(vocab_size=len(tok), n_layer=2, n_head=4, n_embd=128, n_positions=1024, bos_token_id=eos,
                        eos_token_id=eos, pad_token_id=eos)
    GPT2LMHeadModel(config).save_pretrained(base)
    tok.save_pretrained(base)
    return base


def make_rows(work: Path, task: str, n: int) -> Path:
    path = work / f"{task}-{n}.jsonl"
    if not path.is_file():
        lines = (ROOT / SOURCES[task][0]).read_text().splitlines()
        with open(path, "w") as fh:
            fh.writelines(line + "\n" for line in itertools.islice(itertools.cycle(lines), n))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", type=int, default=[100_000, 1_000_000])
    ap.add_argument("--tasks", nargs="+", choices=list(SOURCES), default=list(SOURCES))
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gptkit-ftdata-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    base = make_base(work)
    print(f"{'task':<10}{'rows':>10}  {'who':<13}{'read s':>8}{'tokenize s':>12}{'peak RSS':>10}   ratio (HF / gptkit)")
    for task, n in itertools.product(args.tasks, args.rows):
        path, columns = make_rows(work, task, n), json.dumps(SOURCES[task][1])
        figures = {}
        for who, script in (("gptkit", GPTKIT), ("HF", HF)):
            cache = tempfile.mkdtemp(dir=work)  # fresh per task and size; the second run reuses it
            os.environ.update(HF_DATASETS_CACHE=cache, GPTKIT_CACHE=cache)
            for again in ("", " again"):
                result, wall, peak = measure([sys.executable, "-c", script, task, str(path), str(base), columns, cache])
                figures[who + again] = (result, peak)
                print(f"{task:<10}{n:>10}  {who + again:<13}{result['read_s']:>8.1f}{result['tokenize_s']:>12.1f}"
                      f"{peak / 2**20:>8.0f} MB", flush=True)
        total = lambda r: r["read_s"] + r["tokenize_s"]  # noqa: E731
        for again in ("", " again"):
            (g, g_peak), (h, h_peak) = figures["gptkit" + again], figures["HF" + again]
            print(f"{'':<22}{again or ' first':<7} time {total(h) / total(g):.2f}x, memory {h_peak / g_peak:.2f}x")


if __name__ == "__main__":
    main()
