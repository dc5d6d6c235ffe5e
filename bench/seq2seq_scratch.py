"""An untrained encoder-decoder (BART or T5 config) with a byte-level BPE tokenizer trained on the Multi30k training
pairs, saved as a base that `gptkit finetune translate/...` trains from nothing: the seq2seq side of issue 11's
"decoder-only or a seq2seq model built from a config — whichever wins".

Not a test. Writes the folder, prints its parameter count and the command to run, e.g.

    python bench/seq2seq_scratch.py --out runs/bart-scratch            # ~1M parameters, like pretrain/tiny4
    gptkit finetune translate/multi30k-cpu model.init_from=runs/bart-scratch output.dir=runs/multi30k-bart
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "data" / "translate" / "multi30k_en_de_train_full.jsonl"


def tokenizer(vocab: int):
    """Byte-level BPE on both sides of the training pairs; the encoder input ends with </s> (as T5's and BART's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rows = [json.loads(line) for line in PAIRS.open()]
    texts = (r[k] for r in rows for k in ("source", "target"))
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arch", choices=["bart", "t5"], default="bart")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=2, help="per stack (encoder and decoder each)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    import torch
    from transformers import AutoModelForSeq2SeqLM, BartConfig, T5Config

    fast = tokenizer(args.vocab)
    ids = {"vocab_size": len(fast), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if args.arch == "bart":  # BART's decoder starts from </s>; T5's from <pad>
        config = BartConfig(d_model=args.width, encoder_layers=args.layers, decoder_layers=args.layers,
                            encoder_attention_heads=args.heads, decoder_attention_heads=args.heads,
                            encoder_ffn_dim=args.ffn, decoder_ffn_dim=args.ffn, max_position_embeddings=128,
                            dropout=args.dropout, attention_dropout=0.0, activation_dropout=0.0,
                            forced_eos_token_id=None, decoder_start_token_id=2, **ids)
    else:
        config = T5Config(d_model=args.width, d_kv=args.width // args.heads, d_ff=args.ffn, num_layers=args.layers,
                          num_heads=args.heads, dropout_rate=args.dropout, decoder_start_token_id=0, **ids)
    torch.manual_seed(args.seed)
    model = AutoModelForSeq2SeqLM.from_config(config)
    model.generation_config.forced_bos_token_id = None
    model.save_pretrained(str(args.out))
    fast.save_pretrained(str(args.out))
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.arch} {args.layers}+{args.layers} x {args.width}, vocabulary {len(fast)}: {n / 1e6:.2f}M parameters "
          f"in {args.out}")


if __name__ == "__main__":
    main()
