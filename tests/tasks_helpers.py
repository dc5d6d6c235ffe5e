"""Synthetic but learnable fine-tuning data: deterministic word mappings a tiny model can master."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import yaml

SRC = "red blue green black white small big old new fast".split()
TGT = "rot blau gruen schwarz weiss klein gross alt neu schnell".split()
MAP = dict(zip(SRC, TGT))
# Seeds every base and fine-tuning recipe the learning tests build; the bounds they assert hold for several
# (checked with GPTKIT_TEST_SEED=1337 and =1, OMP_NUM_THREADS=1 and =2).
SEED = int(os.environ.get("GPTKIT_TEST_SEED", "1337"))


def learned_mapping(scores: dict, prefix: str = "test_") -> bool:
    """Whether a translation of the word mapping was learned: BLEU >= 80 and chrF >= 93. BLEU on 50 four-word
    sentences is coarse (one wrong word removes up to four of a sentence's n-gram matches): runs at chrF 96-98
    scored BLEU 86.6-95 over seeds 1337/1/2 and 1-2 threads, so the bound sits below that; untrained is ~2."""
    return scores[f"{prefix}bleu"] >= 80 and scores[f"{prefix}chrf"] >= 93


def translate_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(SRC) for _ in range(4)]
        rows.append({"source": " ".join(words), "target": " ".join(MAP[w] for w in words)})
    return rows


def summarize_rows(n: int, seed: int) -> list[dict]:
    """The summary is the document's first two words: ROUGE rewards learning which words to keep."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(SRC) for _ in range(6)]
        rows.append({"document": " ".join(words), "summary": " ".join(words[:2])})
    return rows


def classify_rows(n: int, seed: int) -> list[dict]:
    """label 'warm' when the first word is one of the first five colours/sizes, else 'cold'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(SRC) for _ in range(3)]
        rows.append({"sentence": " ".join(words), "label": "warm" if SRC.index(words[0]) < 5 else "cold"})
    return rows


def classify3_rows(n: int, seed: int) -> list[dict]:
    """Three string labels by the first word: 'warm' (first three words of SRC), 'mild' (next three), 'cold'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(SRC) for _ in range(3)]
        k = SRC.index(words[0])
        rows.append({"text": " ".join(words), "label": "warm" if k < 3 else "mild" if k < 6 else "cold"})
    return rows


WORDS = "lamp moon star tree river stone cloud bird fish rain".split()
MARKER = "key"
QUESTION = f"what follows {MARKER}?"


def qa_row(words: list[str], pos: int, question: str = QUESTION) -> dict:
    """A row whose answer is ``words[pos]``, with its character offset in the joined context."""
    context = " ".join(words)
    start = len(" ".join(words[:pos])) + (1 if pos else 0)
    assert context[start : start + len(words[pos])] == words[pos]
    return {"question": question, "context": context, "answers": {"text": [words[pos]], "answer_start": [start]}}


def qa_rows(n: int, seed: int) -> list[dict]:
    """6-12 words with the marker somewhere before the end; the answer is the word right after the marker."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 11))]
        pos = rng.randrange(len(words))
        words.insert(pos, MARKER)
        rows.append({"id": f"{seed}-{i}", **qa_row(words, pos + 1)})
    return rows



def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base_corpus(path: Path) -> Path:
    """Text with every word of both vocabularies, for the base model's BPE tokenizer."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(SRC + TGT) for _ in range(12)) + " =>" for _ in range(400)]
    path.write_text("\n".join(lines) + "\n")
    return path


def base_recipe(tmp: Path) -> Path:
    recipe = {
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "model": {"n_layer": 2, "n_head": 4, "n_embd": 64, "context": 64, "tie_embeddings": False},
        "data": {"train_files": [str(base_corpus(tmp / "base.txt"))], "val_fraction": 0.0},
        "train": {"max_steps": 20, "batch_size": 16, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "save_every": 20,
                  "seed": SEED},
        "output": {"dir": str(tmp / "base")},
    }
    path = tmp / "base.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def pretrained_base(tmp: Path) -> Path:
    """Pretrain :func:`base_recipe` in ``tmp``: a barely trained 2-layer GPT whose BPE tokenizer knows the words."""
    from conftest import run_cli

    code, _, err = run_cli("pretrain", str(base_recipe(tmp)))
    assert code == 0, err
    return tmp / "base"


def finetune_recipe(tmp: Path, name: str, task: str, base: Path, splits: dict[str, Path], **sections) -> Path:
    recipe = {
        "task": task,
        "model": {"init_from": str(base)},
        "data": {"train_files": [str(splits["train"])], "val_files": [str(splits["validation"])],
                 **({"test_files": [str(splits["test"])]} if "test" in splits else {})},
        "train": {"max_steps": 400, "batch_size": 16, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20,
                  "eval_every": 100, "save_every": 100, "log_every": 20, "weight_decay": 0.0, "seed": SEED},
        "finetune": {"eval_examples": 50, "max_new_tokens": 16},
        "output": {"dir": str(tmp / name)},
    }
    for sec, values in sections.items():
        recipe.setdefault(sec, {}).update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def splits(tmp: Path, make, n_train: int = 600) -> dict[str, Path]:
    """train / validation / test files from a row maker ``make(n, seed)``, with distinct seeds."""
    return {"train": write_jsonl(tmp / "train.jsonl", make(n_train, 1)),
            "validation": write_jsonl(tmp / "val.jsonl", make(50, 2)),
            "test": write_jsonl(tmp / "test.jsonl", make(50, 3))}


def lora_test_metrics(recipe: Path, out: Path, *overrides: str) -> dict:
    """The same recipe fine-tuned with LoRA (its defaults; the recipe's learning rate and steps): test metrics."""
    from conftest import run_cli

    code, _, err = run_cli("finetune", str(recipe), "finetune.method=lora", f"output.dir={out}", *overrides)
    assert code == 0, err
    scores = read_test_metrics(out)
    print(f"LoRA {out.name}: {scores}")
    return scores


def read_test_metrics(run: Path) -> dict:
    """What the runner scored on the test split."""
    return json.loads((run / "test_metrics.json").read_text())


def seq2seq_base(out: Path, arch: str = "bart", bos: bool = False) -> Path:
    """A tiny randomly initialised encoder-decoder (BART or T5, 2+2 layers, 64 wide) and a byte-level BPE
    tokenizer trained on the task words, saved so that Auto classes load them offline. The tokenizer appends
    </s> to encoder inputs (as T5's does; ``bos``: "<s> ... </s>" and a forced BOS, as facebook/bart-* checkpoints
    have); pad, bos, eos and the decoder start token are set consistently."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForSeq2SeqLM, BartConfig, PreTrainedTokenizerFast, T5Config

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    text = [" ".join(rng.choice(SRC + TGT) for _ in range(12)) for _ in range(400)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>" if bos else "$A </s>",
                                                       special_tokens=[("<s>", 1), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    ids = {"vocab_size": len(fast), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if arch == "bart":  # BART's decoder starts from </s>; T5's from <pad>
        config = BartConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                            max_position_embeddings=128, dropout=0.0, forced_eos_token_id=None,
                            decoder_start_token_id=2, **ids)
    else:
        config = T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
                          decoder_start_token_id=0, **ids)
    torch.manual_seed(SEED)
    model = AutoModelForSeq2SeqLM.from_config(config)
    model.generation_config.forced_bos_token_id = 1 if bos else None  # transformers 5 reads it from here
    model.save_pretrained(str(out))
    fast.save_pretrained(str(out))
    return out


def tiny_bart_with(base: Path, folder: Path, width: int = 16) -> Path:
    """A random one-layer BART saved in ``folder`` with the tokenizer of the gptkit run ``base`` (64 positions)."""
    from transformers import BartConfig, BartForConditionalGeneration

    from gptkit import trained

    tok = trained.load_lm(base)[1]
    BartForConditionalGeneration(BartConfig(vocab_size=len(tok), d_model=width, encoder_layers=1, decoder_layers=1,
                                            encoder_attention_heads=2, decoder_attention_heads=2,
                                            encoder_ffn_dim=2 * width, decoder_ffn_dim=2 * width,
                                            max_position_embeddings=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def llama_base(out: Path) -> Path:
    """A tiny randomly initialised Llama (2 layers, 64 wide) whose tokenizer starts every sequence with <s> and
    has no pad token, as Llama checkpoints do; saved so that the Auto classes load it offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    text = [" ".join(rng.choice(SRC + TGT) for _ in range(12)) + " =>" for _ in range(400)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                      show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    torch.manual_seed(SEED)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    fast.save_pretrained(str(out))
    return out


def preprocess_capped(tmp: Path, task: str, base: Path, rows: list[dict], make, max_length: int, caplog):
    """(examples, tokenizer): ``rows`` tokenized for ``task`` with finetune.max_length, warnings captured."""
    from gptkit import trained
    from gptkit import tasks
    from gptkit.recipe import load_recipe

    recipe = load_recipe(finetune_recipe(tmp, "p", task, base, splits(tmp, make, 20), finetune={"max_length": max_length}))
    tok = trained.tokenizer_of(recipe.model.init_from)
    with caplog.at_level("WARNING"):
        return tasks.load(task).preprocess(recipe, tok, rows, "train", None), tok
