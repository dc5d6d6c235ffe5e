"""Shared by translate and summarize: a language model trained on a prompt and a target, with the loss on
the target only, evaluated by generating from the prompt. The tasks differ in fields, prompt and metric.

A decoder-only base (GPT-2, Llama) reads "prompt + target + EOS" as one sequence. An encoder-decoder base
(T5, BART, Marian; ``is_encoder_decoder`` in its config) reads the prompt in its encoder and is taught
"target + EOS" through its decoder. One flag, ``Examples.decoder_start``, tells the two apart.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from contextvars import ContextVar
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from gptkit import modeling
from gptkit.errors import UserError
from gptkit.tokenizer import all_cores, plain_ids, prompt_ids, prompts_ids, release_freed_memory

log = logging.getLogger(__name__)


def _pad(seqs: list[list[int]], value: int, width: int | None = None) -> torch.Tensor:
    out = torch.full((len(seqs), width or max(map(len, seqs))), value, dtype=torch.long)
    for j, s in enumerate(seqs):
        out[j, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


CHUNK = 1000  # rows tokenized per call: a fast tokenizer encodes them on every core


def in_chunks(rows: list, split: str, doing: str = "tokenizing", size: int | None = None) -> Iterator[list]:
    """``rows`` in chunks of ``size`` (default :data:`CHUNK`), with a progress bar (on a terminal, main process) once
    there are many."""
    from gptkit.progress import bar as progress

    size = size or CHUNK
    bar = progress(len(rows), f"{doing} {split}", "example", show_from=10 * CHUNK)
    with all_cores():
        for lo in range(0, len(rows), size):
            yield rows[lo : lo + size]
            bar.update(min(size, len(rows) - lo))
    bar.close()
    release_freed_memory()  # the chunks' Python lists, freed but kept by the allocator


class Rows:
    """Tokenized examples kept compact: a field of token-id lists is one flat array with offsets (uint16 where the ids
    fit, else int32), an integer field one array (as Python lists, a token costs ~36 bytes instead of 2 or 4);
    anything else stays a list.
    ``rows[i]`` gives example i back as a dict of lists and ints. Built chunk by chunk and joined with :meth:`concat`,
    so a million examples never exist as Python lists at once."""

    def __init__(self, dicts: list[dict] = ()):
        self.n, self.cols = len(dicts), {}
        for key in dicts[0] if dicts else ():
            values = [d[key] for d in dicts]
            self.cols[key] = self._column(values)
        masked = self._masked_prefix()
        if masked is not None:  # labels = the ids with a prompt masked: kept as the prompt lengths
            self.cols["labels"] = _Masked(masked)

    def _masked_prefix(self) -> np.ndarray | None:
        """Per example, how many leading labels are -100, when every example's labels are its input ids with such a
        prefix masked (a decoder-only prompt + target); else None."""
        labels, ids = self.cols.get("labels"), self.cols.get("input_ids")
        if not (isinstance(labels, tuple) and isinstance(ids, tuple) and np.array_equal(labels[1], ids[1])):
            return None
        lengths = np.diff(ids[1])
        masked = labels[0] == -100
        count = np.bincount(np.repeat(np.arange(self.n), lengths), weights=masked, minlength=self.n).astype(np.int64)
        pos = np.arange(len(ids[0])) - np.repeat(ids[1][:-1], lengths)
        prefix = pos < np.repeat(count, lengths)
        return count if np.array_equal(masked, prefix) and np.array_equal(labels[0][~masked], ids[0][~masked]) else None

    def _unmasked(self, key: str):
        """A masked labels column as the flat array and offsets it stands for."""
        return _unmask(*self.cols["input_ids"], self.cols[key].prompt)

    @staticmethod
    def _column(values: list):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return np.asarray(values, dtype=np.int64)
        if all(isinstance(v, list) for v in values):
            try:
                flat = np.fromiter(chain.from_iterable(values), dtype=np.int64)
            except (TypeError, ValueError):  # not token ids (e.g. character offsets with None)
                return values
            lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
            return flat.astype(Rows._dtype(flat)), np.concatenate([[0], np.cumsum(lengths)])
        return values

    @staticmethod
    def _dtype(flat: np.ndarray):
        """uint16 for token ids of a vocabulary up to 65,536 (GPT-2's, Llama 2's), else int32 (labels hold -100)."""
        return np.uint16 if not len(flat) or (flat.min() >= 0 and flat.max() < 2**16) else np.int32

    @classmethod
    def concat(cls, parts: Iterable["Rows"]) -> "Rows":
        """``parts`` joined; with a :class:`Spill` active (the examples cache makes one), each part's arrays go to disk
        as it comes and the result maps them back, so a split's token ids never pile up in memory."""
        spill = _SPILL.get()
        if spill is not None:
            return spill.concat(parts)
        parts = [p for p in parts if p.n]
        out = cls()
        out.n = sum(p.n for p in parts)
        for key in parts[0].cols if parts else ():
            cols = [p.cols[key] for p in parts]
            if any(isinstance(c, _Masked) for c in cols):
                if all(isinstance(c, _Masked) for c in cols):
                    out.cols[key] = _Masked(np.concatenate([c.prompt for c in cols]))
                    continue
                cols = [p._unmasked(key) if isinstance(c, _Masked) else c for p, c in zip(parts, cols)]
            if isinstance(cols[0], tuple):
                shifts = np.cumsum([0] + [c[1][-1] for c in cols[:-1]])
                out.cols[key] = (np.concatenate([c[0] for c in cols]),  # (uint16 and int32 parts give int32)
                                 np.concatenate([cols[0][1][:1]] + [c[1][1:] + s for c, s in zip(cols, shifts)]))
            elif isinstance(cols[0], np.ndarray):
                out.cols[key] = np.concatenate(cols)
            else:
                out.cols[key] = [v for c in cols for v in c]
        return out

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        i, out = i % self.n, {}
        for key, col in self.cols.items():
            if isinstance(col, tuple):
                flat, offsets = col
                out[key] = flat[offsets[i] : offsets[i + 1]].tolist()
            elif not isinstance(col, _Masked):
                out[key] = col[i].item() if isinstance(col, np.ndarray) else col[i]
        for key, col in self.cols.items():
            if isinstance(col, _Masked):
                k = int(col.prompt[i])
                out[key] = [-100] * k + out["input_ids"][k:]
        return out


def _unmask(flat: np.ndarray, offsets: np.ndarray, prompt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels that are the ids with each example's first ``prompt[i]`` masked (-100), as flat array and offsets."""
    lengths = np.diff(offsets)
    labels = flat.astype(np.int32)
    labels[np.arange(len(flat)) - np.repeat(offsets[:-1], lengths) < np.repeat(prompt, lengths)] = -100
    return labels, offsets


_SPILL: ContextVar["Spill | None"] = ContextVar("gptkit_spill", default=None)


class Spill:
    """A folder :meth:`Rows.concat` writes parts to while :meth:`active` (``data.cached_examples`` sets one up around a
    split's preprocessing): each array column is appended part by part to one file, in each part's own dtype, and
    mapped back read-only in the dtype ``np.concatenate`` gives (rewritten part by part where the parts' dtypes
    differ), so memory stays flat however large the split; the result equals the in-memory concat. ``files`` maps the
    data address of each array mapped back to its file (the cache copies the file instead of reading the map)."""

    def __init__(self, folder: Path):
        self.folder, self.count, self.files, self._held = folder, 0, {}, []

    @contextmanager
    def active(self):
        token = _SPILL.set(self)
        try:
            yield self
        finally:
            _SPILL.reset(token)

    def new(self) -> "_Spilled":
        self.count += 1
        return _Spilled(self, self.folder / f"{self.count}.bin")

    def mapped(self, path: Path, dtype, n: int) -> np.ndarray:
        if not n:
            return np.empty(0, dtype)
        out = np.asarray(np.memmap(path, dtype=dtype, mode="r", shape=(n,)))  # (a plain view pickles out of band)
        self.files[out.ctypes.data] = path
        self._held.append(out)  # mapped while the spill lives: no other array can take its address
        return out

    def concat(self, parts: Iterable[Rows]) -> Rows:
        out, columns = Rows(), {}
        for part in parts:
            if not part.n:
                continue
            for key, col in part.cols.items():
                if key not in columns:
                    columns[key] = [] if isinstance(col, list) else _Column(self)
                if isinstance(col, list):
                    columns[key] += col
                else:
                    columns[key].add(col)
            out.n += part.n
        for key, col in columns.items():
            out.cols[key] = col if isinstance(col, list) else col.finish(columns.get("input_ids"))
        for col in columns.values():
            if isinstance(col, _Column):
                col.close()
        return out


class _Spilled:
    """One array spilled part by part (:class:`Spill`)."""

    def __init__(self, spill: Spill, path: Path):
        self.spill, self.path, self.fh, self.parts = spill, path, open(path, "wb"), []  # parts: (at, dtype, count)
        self.used = False

    def add(self, arr: np.ndarray) -> None:
        self.parts.append((self.fh.tell(), arr.dtype, len(arr)))
        self.fh.write(np.ascontiguousarray(arr).data)

    def part(self, j: int) -> np.ndarray:
        if not self.fh.closed:
            self.fh.flush()
        at, dtype, n = self.parts[j]
        return np.fromfile(self.fh.name, dtype=dtype, count=n, offset=at)

    def array(self) -> np.ndarray:
        self.fh.close()
        self.used = True
        dtype = np.result_type(*(d for _, d, _ in self.parts)) if self.parts else np.dtype(np.int64)
        if any(d != dtype for _, d, _ in self.parts):  # as np.concatenate promotes (uint16 and int32 parts: int32)
            self.path = self.path.with_suffix(".cast")
            with open(self.path, "wb") as fh:
                for j in range(len(self.parts)):
                    fh.write(self.part(j).astype(dtype).data)
        return self.spill.mapped(self.path, dtype, sum(n for *_, n in self.parts))


class _Column:
    """A spilled column: an integer per row, token lists (flat ids + offsets), or labels that are the input ids with
    a prompt masked (:class:`_Masked`) in some or all parts."""

    def __init__(self, spill: Spill):
        self.spill, self.kinds, self.begins, self.end = spill, [], [], 0  # begins: each token part's first token
        self.flat, self.offsets, self.prompt = spill.new(), spill.new(), spill.new()
        self.offsets.add(np.zeros(1, np.int64))

    def add(self, col) -> None:
        if isinstance(col, _Masked):
            self.kinds.append("masked")
            self.prompt.add(col.prompt)
        elif isinstance(col, tuple):
            self.kinds.append("tokens")
            self.begins.append(self.end)
            self.flat.add(col[0])
            self.offsets.add(col[1][1:] - col[1][0] + self.end)
            self.end += len(col[0])
        else:
            self.kinds.append("array")
            self.flat.add(col)

    def tokens(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k-th token part as it was added: (flat ids, offsets from 0)."""
        ends = self.offsets.part(k + 1)
        return self.flat.part(k), np.concatenate([[0], ends - self.begins[k]])

    def finish(self, ids: "_Column | None"):
        kinds = set(self.kinds)
        if kinds == {"array"}:
            return self.flat.array()
        if kinds == {"masked"}:
            return _Masked(self.prompt.array())
        if "masked" in kinds:  # some parts masked, some not: each part's labels written out in full
            column, k, m = _Column(self.spill), 0, 0
            for j, kind in enumerate(self.kinds):
                if kind == "masked":
                    column.add(_unmask(*ids.tokens(j), self.prompt.part(m)))
                    m += 1
                else:
                    column.add(self.tokens(k))
                    k += 1
            out = column.finish(None)
            column.close()
            return out
        return self.flat.array(), self.offsets.array()

    def close(self) -> None:
        """Removes the files a cast rewrote and those the column did not use."""
        for spilled in (self.flat, self.offsets, self.prompt):
            spilled.fh.close()
            if not spilled.used or Path(spilled.fh.name) != spilled.path:
                Path(spilled.fh.name).unlink()


class _Masked:
    """A labels column that is the input ids with each example's first ``prompt[i]`` positions masked (-100)."""

    def __init__(self, prompt: np.ndarray):
        self.prompt = prompt


class Examples:
    """Tokenized examples; ``batch`` right-pads them (token labels, where rows have them, with -100).

    With ``decoder_start`` (the token an encoder-decoder's decoder starts from), rows are sequence-to-sequence:
    ``input_ids`` feed the encoder and ``labels`` the decoder, each padded to its own width; the decoder reads
    the labels shifted right behind ``decoder_start``.
    """

    def __init__(self, rows: list[dict[str, list[int]]], pad_id: int, decoder_start: int | None = None):
        self.rows, self.pad_id, self.decoder_start = rows, pad_id, decoder_start

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: list[int], epochs: list[int] | None = None) -> dict:
        rows = [self.rows[i] for i in indices]
        ids = _pad([r["input_ids"] for r in rows], self.pad_id)
        out = {"input_ids": ids, "attention_mask": _pad([[1] * len(r["input_ids"]) for r in rows], 0)}
        if self.decoder_start is None:
            out["labels"] = _pad([r.get("labels", []) for r in rows], -100, ids.shape[1])
            return out
        targets = [r["labels"] for r in rows]
        out["labels"] = _pad(targets, -100)
        out["decoder_input_ids"] = _pad([[self.decoder_start, *t[:-1]] for t in targets], self.pad_id)
        out["decoder_attention_mask"] = _pad([[1] * len(t) for t in targets], 0)
        return out


def render(template: str, row: dict, field: str = "finetune.prompt") -> str:
    """``template`` filled with the row's fields (str.format); a field the rows lack, or a brace str.format cannot
    read (a stray "{", "{}", "{0}", "{source.x}"), is one line naming ``field``, not a traceback mid-tokenizing."""
    try:
        return template.format(**row)
    except KeyError as e:
        raise UserError(f"{field}: the template names {{{e.args[0]}}}, which the rows do not have "
                        f"(fields: {sorted(row)})") from None
    except (IndexError, ValueError, AttributeError, TypeError) as e:
        names = ", ".join(f"{{{k}}}" for k in sorted(row) if not k.startswith("_"))
        raise UserError(f"{field}: {template!r} is not a valid template ({e}); name fields in braces ({names}) and "
                        "double a literal brace: {{ }}") from None


def fit_prompt(tokenizer, template: str, row: dict, field: str | None, budget: int, *, special: bool = False,
               rendered: tuple[str, list[int]] | None = None, field_ids: list[int] | None = None
               ) -> tuple[str, list[int], bool]:
    """(the rendered prompt, its token ids as :func:`gptkit.tokenizer.prompt_ids` encodes it for generation —
    ``special``: an encoder's input —, whether it was shortened): when the prompt is longer than ``budget``
    tokens, the row's ``field`` (the document, the source, the context) loses its end, so the instruction
    around it ("TL;DR:", the question) survives. Callers still hard-cut what no field can absorb. ``rendered`` (the
    prompt and its ids) and ``field_ids`` (the field's plain ids) come from a caller's batch encode: a long text
    encoded once per row, not three times (three quarters of tokenizing long translate sources went here)."""
    text, prompt = rendered or (render(template, row), None)
    prompt = prompt_ids(tokenizer, text, special) if prompt is None else prompt
    if len(prompt) <= budget or field is None or f"{{{field}}}" not in template:
        return text, prompt, len(prompt) > budget
    ids = plain_ids(tokenizer, [str(row[field])])[0] if field_ids is None else field_ids
    keep = len(ids)
    for _ in range(4):  # merges across the cut can move the count by a token or two
        keep = max(0, keep - (len(prompt) - budget))
        text = render(template, {**row, field: tokenizer.decode(ids[:keep]).rstrip("\ufffd")})
        prompt = prompt_ids(tokenizer, text, special)
        if len(prompt) <= budget or keep == 0:
            break
    return text, prompt, True


def _limit(recipe, config) -> int:
    """Tokens a training example may have: finetune.max_length within the model's positions (T5 has no limit)."""
    context = modeling.max_positions(config)
    return min(recipe.finetune.max_length, context) if context else recipe.finetune.max_length


def _base(recipe):
    return modeling.base_config(recipe.model.init_from or "", trust_remote_code=recipe.model.trust_remote_code)


def build_model(recipe, tokenizer, train_rows):
    """The base checkpoint as a causal LM, or as a sequence-to-sequence LM when it is an encoder-decoder."""
    cls = modeling.lm_class(_base(recipe))
    model = cls.from_pretrained(modeling.model_dir(recipe.model.init_from or "", "model.init_from"),
                                **modeling.load_kwargs(recipe.model))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def preprocess(recipe, tokenizer, rows, split, *, template: str, target: str, shorten: str | None = None
               ) -> Examples:
    """Decoder-only: prompt tokens (label -100) + target tokens + EOS. Encoder-decoder: the prompt, with the
    tokenizer's special tokens as generation encodes it, for the encoder and target + EOS as labels. Both fit
    finetune.max_length: the target keeps its start (at most half the room in a decoder-only model), the
    prompt's ``shorten`` field loses its end (:func:`fit_prompt`); cuts are counted and reported."""
    config = _base(recipe)
    seq2seq, limit = modeling.is_encoder_decoder(config), _limit(recipe, config)
    cut = 0

    def parts() -> Iterator[Rows]:
        nonlocal cut
        for chunk in in_chunks(rows, split):
            texts = [render(template, row) for row in chunk]
            answers = _target_ids(tokenizer, [str(row[target]) for row in chunk], seq2seq)
            prompts = prompts_ids(tokenizer, texts, seq2seq)
            rooms = [limit if seq2seq else limit - min(len(answer), max(1, limit // 2)) for answer in answers]
            over = [k for k, (prompt, room) in enumerate(zip(prompts, rooms)) if len(prompt) > room]
            fields = dict(zip(over, plain_ids(tokenizer, [str(chunk[k][shorten]) for k in over])
                              if over and shorten and f"{{{shorten}}}" in template else ()))  # in one batch call
            out = []
            for k, (row, text, prompt, answer, room) in enumerate(zip(chunk, texts, prompts, answers, rooms)):
                shortened = False
                if len(prompt) > room:  # the field loses its end; what it cannot absorb is cut below
                    text, prompt, shortened = fit_prompt(tokenizer, template, row, shorten, room, special=seq2seq,
                                                         rendered=(text, prompt), field_ids=fields.get(k))
                if seq2seq:  # what the field could not absorb is cut at the end, keeping the closing special token
                    cut += shortened or len(answer) > limit
                    if len(prompt) > limit:
                        prompt = tokenizer(text, truncation=True, max_length=limit)["input_ids"]
                    out.append({"input_ids": prompt, "labels": answer[:limit]})
                    continue
                cut += shortened or len(prompt) + len(answer) > limit
                answer = answer[: max(1, limit // 2)] if len(prompt) + len(answer) > limit else answer
                prompt = prompt[-(limit - len(answer)) :]  # what the field could not absorb
                out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
            yield Rows(out)

    joined = Rows.concat(parts())
    if cut:
        log.warning("%s: %d of %d examples longer than %d tokens were truncated (finetune.max_length)",
                    split, cut, len(rows), limit)
    return Examples(joined, tokenizer.pad_token_id, _decoder_start(recipe, config) if seq2seq else None)


def _target_ids(tokenizer, texts: list[str], seq2seq: bool) -> list[list[int]]:
    """Each answer's tokens and EOS. A decoder's targets carry the tokenizer's target special tokens, as
    Hugging Face's seq2seq examples build them (BART: <s> ... </s>, matching the forced BOS its checkpoints
    generate; T5 and Marian: ... </s>)."""
    if not texts:
        return []
    eos = tokenizer.eos_token_id
    ids = tokenizer(text_target=texts, verbose=False)["input_ids"] if seq2seq else plain_ids(tokenizer, texts)
    return [i if i and i[-1] == eos else [*i, eos] for i in ids]


def _decoder_start(recipe, config) -> int:
    start = config.decoder_start_token_id
    if start is None:
        raise UserError(f"model.init_from: {recipe.model.init_from} is an encoder-decoder whose config.json sets no "
                        "decoder_start_token_id; set it (T5: the pad id; BART: the eos id)")
    return int(start)


def _targets(batch: dict) -> torch.Tensor:
    """The labels a position predicts: a decoder-only model predicts token t+1 at position t; a decoder labels[t]."""
    return batch["labels"] if "decoder_input_ids" in batch else batch["labels"][:, 1:]


def _scored(batch: dict) -> torch.Tensor:
    """Where a target token is scored (batch x target positions, bool)."""
    return _targets(batch) != -100


def count(batch: dict, per: str = "token") -> int:
    """Items :func:`loss` sums over: target tokens (``per="token"``) or examples (``per="example"``)."""
    return batch["input_ids"].shape[0] if per == "example" else int(_scored(batch).sum())


def where(batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Where the scored target tokens sit in the model's output (batch x positions, bool), those tokens (example
    by example) and the model's inputs: the arguments of :func:`gptkit.modeling.scored_cross_entropy`."""
    scored = _scored(batch)
    if "decoder_input_ids" in batch:
        keys = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
        return scored, _targets(batch)[scored], {k: batch[k] for k in keys}
    # a decoder-only model: position t predicts token t+1, the last position predicts nothing
    keep = torch.nn.functional.pad(scored, (0, 1))
    return keep, _targets(batch)[scored], {k: batch[k] for k in ("input_ids", "attention_mask")}


def weights(batch: dict, per: str = "token") -> torch.Tensor | None:
    """Each scored token's weight in the summed loss: 1 per token (None), or 1 / its example's target tokens
    (``per="example"``: the sum over examples of each example's mean)."""
    if per == "token":
        return None
    example = _scored(batch).nonzero()[:, 0]
    return 1.0 / torch.bincount(example)[example]


def loss(model, batch: dict, per: str = "token", smoothing: float = 0.0) -> torch.Tensor:
    """Summed target-token cross-entropy (``per="token"``, what Trainer and the papers average), or the sum
    over examples of each example's mean target-token loss (``per="example"``); the engine divides by
    :func:`count` over the whole step. Both are independent of padding and of how a step is batched. The output
    layer runs on the target positions only, fused with the loss, where the model allows; ``smoothing`` is label
    smoothing."""
    keep, targets, inputs = where(batch)
    return modeling.scored_cross_entropy(model, keep, targets, weights(batch, per), smoothing=smoothing, **inputs)


_WARNED: set = set()


def predict(model, tokenizer, rows, recipe, *, template: str, shorten: str | None = None) -> list[str]:
    """Generated answers; prompts are fitted as in training (a decoder-only model keeps room for the answer)."""
    from gptkit.generation import decoding_from, generate_batch

    opts = decoding_from(recipe.finetune, recipe.train.seed)
    seq2seq = modeling.is_encoder_decoder(model.config)
    room = _limit(recipe, model.config) - (0 if seq2seq else opts.max_new_tokens)
    prompts = [render(template, r) for r in rows]
    if room > 0:  # only a prompt over its room is fitted (one by one)
        ids_of = prompts_ids(tokenizer, prompts, seq2seq)
        lengths = [len(ids) for ids in ids_of]
        prompts = [text if len(ids) <= room else fit_prompt(tokenizer, template, r, shorten, room, special=seq2seq,
                                                            rendered=(text, ids))[0]
                   for r, text, ids in zip(rows, prompts, ids_of)]
        cut = sum(room < n < room + opts.max_new_tokens for n in lengths)  # prompts the context alone would hold
        warned = (template, room, opts.max_new_tokens)
        if cut > len(rows) // 10 and not seq2seq and warned not in _WARNED:  # the answer's room cuts the inputs
            _WARNED.add(warned)
            log.warning("%d of %d prompts lost the end of their %s to fit %d tokens, leaving finetune.max_new_tokens "
                        "(%d) for the answer in %d; lower finetune.max_new_tokens to keep them whole", cut, len(rows),
                        shorten or "input", room, opts.max_new_tokens, room + opts.max_new_tokens)
    return [outs[0].strip() for outs in generate_batch(model, tokenizer, prompts, opts, batch_size=32)]


def bind(default_prompt: str, target: str, shorten: str):
    """``preprocess`` and ``predict`` of a generative task whose prompt defaults to ``default_prompt``
    (``finetune.prompt`` wins), whose answer is the row's ``target`` field and whose long inputs lose the end
    of their ``shorten`` field."""

    def template(recipe) -> str:
        return recipe.finetune.prompt or default_prompt

    def bound_preprocess(recipe, tokenizer, rows, split, model=None):
        return preprocess(recipe, tokenizer, rows, split, template=template(recipe), target=target, shorten=shorten)

    def bound_predict(model, tokenizer, rows, recipe):
        return predict(model, tokenizer, rows, recipe, template=template(recipe), shorten=shorten)

    return bound_preprocess, bound_predict
