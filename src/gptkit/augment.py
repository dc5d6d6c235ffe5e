"""`gptkit augment backtranslate`: synthetic translation pairs from target-language text (Sennrich et al., 2016).

A reverse-direction translate run (trained target -> source) translates each monolingual sentence; every output
line is ``{"source": <its translation>, "target": <the sentence>, "synthetic": true}``, ready to mix with real
pairs (``data.train_weights``) and optionally tagged (``finetune.synthetic_tag``, Caswell et al., 2019).
Decoding is batched (greedy, beam or sampled, the run's settings unless given); lines are appended and made
durable batch by batch, so ``--resume`` continues after the last complete one. A sentence whose translation comes
out empty is skipped (an empty source would teach the forward model to translate into nothing) and counted in the
summary; when every one does, nothing is written and the command fails with one line.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptkit.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Options:
    model: str
    data: str
    out: str
    column: str = "target"
    batch_size: int = 32
    limit: int | None = None
    num_beams: int | None = None
    max_new_tokens: int | None = None
    sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    resume: bool = False
    overwrite: bool = False


def _texts(data: Path, column: str, limit: int | None) -> Iterator[str]:
    """The sentences of ``data``, read as they are consumed (``limit``: the first ones; nothing after is read)."""
    from gptkit.eval_report import iter_fields

    rows = iter_fields(data, "--data", (column,), hint="name the field holding the text with --column")
    for row in itertools.islice(rows, limit):
        text = row[column]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"--data: {data}: line {row['_line']}: '{column}' must be a non-empty string")
        yield text


def _done(out: Path, texts: Iterator[str]) -> tuple[int, int]:
    """``(lines, sentences)``: how many lines of ``out`` are complete and belong to ``texts`` (a torn last line, one
    without its newline, is dropped), and how many sentences of ``texts`` they account for (consumed from it): each
    line is the next sentence with its target, the sentences passed over being those whose translation came out
    empty. Any other line that is not a pair (an edited file, another file) is an error, and the file is left as it
    is. Both files are read line by line."""
    kept, at, whole = 0, 0, 0
    with open(out, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break  # a torn last line
            try:
                row = json.loads(raw.decode("utf-8", errors="replace"))
            except ValueError:
                raise UserError(f"--resume: {out} line {kept + 1} is not a JSON pair (a file augment wrote ends at "
                                "most in one torn line); use another --out") from None
            target = row.get("target") if isinstance(row, dict) else None
            for text in texts:
                at += 1
                if text == target:
                    break
            else:
                raise UserError(f"--resume: {out} line {kept + 1} does not belong to this --data; use another --out")
            kept, whole = kept + 1, whole + len(raw)
    with open(out, "r+b") as fh:  # drop a torn tail
        fh.truncate(whole)
    return kept, at


def backtranslate(opts: Options) -> dict:
    from tqdm.auto import tqdm

    from gptkit import evaluate
    from gptkit.eval_report import append

    out, data = Path(opts.out), Path(opts.data)
    if opts.batch_size < 1 or (opts.limit is not None and opts.limit < 1):
        raise UserError("--batch-size and --limit must be >= 1")
    for flag, value in (("--num-beams", opts.num_beams), ("--max-new-tokens", opts.max_new_tokens)):
        if value is not None and value < 1:  # --num-beams 0 would otherwise read as "not given" (the run's width)
            raise UserError(f"{flag}: must be >= 1, got {value}")
    if out.resolve() == data.resolve():  # --overwrite (or --resume's truncation) would destroy the input
        raise UserError(f"--out: {out} is the --data file; write the pairs to another file")
    if out.is_dir():
        raise UserError(f"--out: {out} is a directory; expected a JSON lines file to write the pairs to")
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"--out: {out} is under {above}, which is a file, not a folder")
    if out.exists() and not (opts.resume or opts.overwrite):
        raise UserError(f"--out: {out} exists; --resume continues it, --overwrite replaces it")
    if opts.resume and not out.exists():
        raise UserError(f"--resume: {out} does not exist yet; start without --resume")
    total = sum(1 for _ in _texts(data, opts.column, opts.limit))  # every row checked before anything is written
    texts = _texts(data, opts.column, opts.limit)  # then read again as it is translated: memory stays flat
    model, tok, run = evaluate.load_model(opts.model, "translate")
    if run is None or run.task != "translate":
        raise UserError(f"--model: {opts.model} is not a translate run; back-translation needs a run fine-tuned to "
                        "translate from the target language into the source language")
    eopts = evaluate.Options(task="translate", batch_size=opts.batch_size, num_beams=opts.num_beams,
                             max_new_tokens=opts.max_new_tokens, sample=opts.sample, temperature=opts.temperature,
                             top_k=opts.top_k, top_p=opts.top_p, seed=opts.seed)
    ctx = evaluate.make_ctx(eopts, "translate", model, tok, run, [], [])
    replace = opts.overwrite and out.exists() and not opts.resume  # only once there is something to write
    kept, start = _done(out, texts) if opts.resume else (0, 0)
    written, empty = kept, start - kept  # a resumed file's sentences passed over came out empty
    bar = tqdm(total=total, initial=start, unit="sentence", disable=None, desc="back-translating")
    i = start
    while chunk := [{"source": t} for t in itertools.islice(texts, opts.batch_size)]:
        preds = evaluate.predict_batch(ctx, chunk, i)
        i += len(chunk)
        pairs = [{"source": p, "target": r["source"], "synthetic": True} for p, r in zip(preds, chunk) if p.strip()]
        empty += len(chunk) - len(pairs)  # an empty source would teach the forward model to translate into nothing
        if pairs:
            if replace:
                out.unlink()
                replace = False
            out.parent.mkdir(parents=True, exist_ok=True)
            append(out, pairs)
            written += len(pairs)
        bar.update(len(chunk))
    bar.close()
    if not written:
        raise UserError(f"--model: all {total} back-translations by {opts.model} came out empty; nothing "
                        f"written to {out} (a reverse run trained longer, or --sample, gives text)")
    if empty:
        log.warning("skipped %d of %d sentences whose back-translation came out empty", empty, total)
    return {"out": str(out), "pairs": written, "skipped_empty": empty, "sentences": total,
            "resumed_at": start if opts.resume else None}
