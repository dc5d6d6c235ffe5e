"""Pretraining corpora read and tokenized in bounded pieces, so memory stays flat however large the files are.

A corpus is cut into *units*, each read, split into documents and tokenized on its own — by worker
processes in parallel for the token stream, and by the seeded sampler that feeds tokenizer training:

- ``.txt`` and JSON-lines files: byte ranges of about ``Settings.piece`` bytes. Unit ``i`` of a file starts
  at the first *cut* at or after ``i * piece`` (found by scanning a small window), so every unit is computed
  independently of the others. A clean cut lies between documents: after a newline (``sample_by: line`` and
  JSON lines). Other text (a ``document`` — a whole .txt file —, paragraphs, a line longer than the window)
  is cut *inside* a document: just before a whitespace byte that follows a non-space one (a newline first), else
  just after a single newline between non-space bytes (CJK lines end "。\n" with no space). EOS still goes only
  between documents. Tokenization checks each such cut (:class:`Encoder`): the document's text around it (512 bytes
  either side) must encode to the same ids whole as in two pieces, the piece after the cut encoded behind an
  *anchor* — the 32 characters before the cut — whose own ids are then dropped, so no text-start prefix
  (SentencePiece's "▁", a prefix space) lands at the cut; a cut that fails is passed over for the next one. So the
  pieces tokenize to the ids the whole document would, for byte-level BPE (GPT-2; Llama-3, whose pre-tokenizer
  keeps punctuation with the newlines after it) and SentencePiece-style tokenizers alike.
- ``.parquet``: one unit per row group. ``.csv`` and JSON (not JSON-lines) files: batches of rows loaded
  with ``datasets`` (Arrow, memory-mapped, so flat as well).

This module imports nothing heavy at the top: tokenization workers start with it alone.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from gptkit.errors import UserError

PIECE = 1 << 20  # bytes of text per unit
WINDOW = 1 << 16  # bytes scanned past a unit's nominal start for a cut
CONTEXT = 512  # bytes (characters) on each side of an inner cut that are encoded to check it
ANCHOR = 32  # characters before a cut that the piece after it is encoded behind (their ids dropped)
TRIES = 32  # candidate cuts of each kind checked before the next kind
TABLE_ROWS = 2000  # rows per unit of a csv / JSON-array table
POOL_MIN_UNITS = 8  # smaller corpora are tokenized in the main process (no worker start-up)
STREAM_FORMAT = 4  # bump when the same files and tokenizer give other ids (the token-stream cache keys on it);
# 2: special-token text in a document ("<|endoftext|>") is encoded as ordinary text; non-string cells are refused
# 3: cuts inside a document are checked, and the piece after one is encoded behind an anchor (Encoder)
# 4: truncation and padding a tokenizer.json carries are ignored (they cut and padded units); the EOS id is keyed
FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_BEFORE_NEWLINE = re.compile(rb"\S\n")
_BEFORE_SPACE = re.compile(rb"\S\s")
_AFTER_NEWLINE = re.compile(rb"\S\r?\n(?=\S)")  # (cut at the match's end)
_SEPARATORS = {"document": None, "paragraph": "\n\n", "line": "\n"}


@dataclass(frozen=True)
class Unit:
    """One independently readable part of one file."""

    file: str
    kind: str  # "text" | "jsonl" | "parquet" | "table"
    index: int  # byte piece, row group or row batch
    size: int  # bytes of the file it stands for (for progress and sampling)


@dataclass(frozen=True)
class Settings:
    """What reading needs from the recipe's data section (plain values, cheap to send to workers)."""

    sample_by: str = "document"
    text_columns: tuple[str, ...] = ("text",)
    piece: int = PIECE


def plan(files: list[str], settings: Settings) -> list[Unit]:
    """The units of ``files``, in order. Checks the text columns on the first row of each structured file."""
    units: list[Unit] = []
    for f in files:
        kind, size = _kind(f), os.path.getsize(f)
        if kind in ("text", "jsonl"):
            if kind == "jsonl":
                _check_columns(f, _first_row(f), settings)
            starts = list(range(0, size, settings.piece)) + [size]
            units += [Unit(f, kind, i, b - a) for i, (a, b) in enumerate(itertools.pairwise(starts))]
        elif kind == "parquet":
            import pyarrow.parquet as pq

            with _unreadable_parquet(f):
                pf = pq.ParquetFile(f)
            _check_columns(f, dict.fromkeys(pf.schema_arrow.names), settings)
            for c in settings.text_columns:
                t = pf.schema_arrow.field(c).type
                if not _is_text_type(t):
                    raise UserError(f"{f}: column '{c}': expected a string column, got {t}")
            if not pf.metadata.num_rows:
                raise UserError(f"{f}: no rows; expected rows with text in column(s) {list(settings.text_columns)}")
            with _unreadable_parquet(f):
                sizes = _parquet_text_bytes(pf, settings.text_columns)
            units += [Unit(f, kind, g, n) for g, n in enumerate(sizes)]
        else:
            table = _table(f)
            _check_columns(f, dict.fromkeys(table.column_names), settings)
            if not len(table):
                raise UserError(f"{f}: no rows; expected rows with text in column(s) {list(settings.text_columns)}")
            n = max(1, -(-len(table) // TABLE_ROWS))
            units += [Unit(f, kind, i, size // n) for i in range(n)]
    return units


@contextlib.contextmanager
def _unreadable_parquet(f: str):
    """Arrow's errors on a torn or foreign .parquet file (a copy cut short, another format renamed) as one line."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{f}: not a readable parquet file ({first})") from None


def _is_text_type(t) -> bool:
    """Whether an Arrow column of type ``t`` holds text cells (strings, or only nulls)."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
            or getattr(pa.types, "is_string_view", lambda _: False)(t))


def _parquet_text_bytes(pf, columns: tuple[str, ...]) -> list[int]:
    """Per row group, about how many bytes of text its ``columns`` hold. Sizes on disk (compressed, and dictionary-
    encoded: repetitive text shrinks tenfold) understate the text, which would let the tokenizer-training sample
    outgrow its budget; the first row group's text is measured and the others scaled by their encoded size."""
    import pyarrow as pa
    import pyarrow.compute as pc

    meta = pf.metadata
    leaf = {meta.schema.column(i).path: i for i in range(meta.num_columns)}
    if not meta.num_row_groups:
        return []
    if not all(c in leaf for c in columns):  # nested columns: the row groups' encoded sizes
        return [max(1, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)]
    encoded = [sum(meta.row_group(g).column(leaf[c]).total_uncompressed_size for c in columns)
               for g in range(meta.num_row_groups)]
    first = pf.read_row_group(0, columns=list(columns))
    text = sum(int(pc.sum(pc.binary_length(first.column(c).cast(pa.large_string()))).as_py() or 0) for c in columns)
    ratio = text / max(1, encoded[0])
    return [max(1, round(e * ratio)) for e in encoded]


def _kind(path: str) -> str:
    builder = FORMATS[Path(path).suffix.lower()]
    if builder == "json":
        with open(path, "rb") as fh:
            head = fh.read(4096).lstrip()
        return "jsonl" if head.startswith(b"{") else "table"
    return {"text": "text", "parquet": "parquet", "csv": "table"}[builder]


def _first_row(path: str) -> dict:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if raw.strip():
                return _row(raw, path, lambda n=lineno: n)
    raise UserError(f"{path}: no JSON rows")


def _row(raw: bytes, path: str, lineno) -> dict:
    """A JSON-lines row; ``lineno()`` is only called (it may read the file) to name a bad line."""
    try:
        row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "not valid UTF-8 text"
        raise UserError(f"{path}: line {lineno()}: invalid JSON ({msg}); expected one JSON object per line") from None
    if not isinstance(row, dict):
        raise UserError(f"{path}: line {lineno()}: expected a JSON object per line, got {type(row).__name__}")
    return row


def _check_columns(path: str, row: dict, settings: Settings) -> None:
    missing = [c for c in settings.text_columns if c not in row]
    if missing:
        raise UserError(f"data.text_column: column '{missing[0]}' not found in {path}; columns: {list(row)}")


@lru_cache(maxsize=4)
def _table(path: str):
    """A csv or JSON-array file through ``datasets``: converted to Arrow once, then memory-mapped."""
    import datasets

    datasets.disable_progress_bars()
    builder = FORMATS[Path(path).suffix.lower()]
    try:
        return datasets.load_dataset(builder, data_files=[path], split="train")
    except Exception as e:  # datasets wraps every parse error
        raise UserError(f"{path}: could not load ({str(e).splitlines()[0]})") from None


# --- reading one unit -------------------------------------------------------------------------------


def _clean_cut(buf: bytes, lead: int, sample_by: str) -> int | None:
    """First position p >= lead in ``buf`` right after a newline, where ``sample_by: line`` documents end; None for
    other modes (their cuts are inner cuts, see :func:`read`)."""
    if sample_by == "line":
        i = buf.find(b"\n", lead - 1)
        return i + 1 if i >= 0 else None
    return None


def _inner_cut(buf: bytes, lead: int, stop: int, sample_by: str, enc: Encoder | None) -> tuple[int, bool]:
    """A cut in ``buf[lead:stop]`` inside a document: before a newline, else any whitespace, that follows a
    non-space byte, else after a single newline between non-space bytes — the first that ``enc`` finds exact (the
    document's text up to ``CONTEXT`` bytes either side); else the first such place; else the first UTF-8 character
    start. And whether ``enc`` found it exact."""
    sep = _SEPARATORS[sample_by]

    def around(p: int) -> tuple[str, str]:
        left, right = _text(buf[max(0, p - CONTEXT) : p], "left"), _text(buf[p : p + CONTEXT], "right")
        return (left.rpartition(sep)[2], right.partition(sep)[0]) if sep else (left, right)

    kinds = [(m.start() + 1 for m in pattern.finditer(buf, lead - 1, stop)) for pattern in (_BEFORE_NEWLINE,
                                                                                              _BEFORE_SPACE)]
    kinds.append(m.end() for m in _AFTER_NEWLINE.finditer(buf, max(0, lead - 3), stop) if m.end() >= lead)
    p, exact = _pick(kinds, around, enc)
    if p is not None:
        return p, exact
    return next((p for p in range(lead, stop) if buf[p] & 0xC0 != 0x80), stop), False


def _text(raw: bytes, side: str) -> str:
    """Bytes next to a cut as the text :func:`read` would make of them: a character split at the far edge
    dropped, universal newlines."""
    if side == "left":
        raw = raw[next((i for i in range(min(4, len(raw))) if raw[i] & 0xC0 != 0x80), 0) :]
    text = raw.decode("utf-8", "ignore")
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _pick(kinds, around, enc: Encoder | None) -> tuple[int | None, bool]:
    """The first candidate cut (kinds in order of preference, each an iterator of positions) that ``enc`` finds
    exact, checking at most ``TRIES`` of each kind (without ``enc``: the first candidate), and True; else the first
    candidate at all (None when there is none) and False."""
    first = None
    for cands in kinds:
        for p in itertools.islice(cands, TRIES):
            if enc is None or enc.exact(*around(p)):
                return p, True
            first = p if first is None else first
    return first, False


def _cut(fh, size: int, target: int, sample_by: str, enc: Encoder | None = None, count: bool = False
         ) -> tuple[int, bool]:
    """The cut at or after byte ``target`` of a text file, and whether it is clean (between documents). JSON-lines
    files are cut by :class:`_LineStarts` (a line longer than the window is read on to its end). ``count``: an inner
    cut ``enc`` found no exact place for is counted in ``enc.unchecked``."""
    if target <= 0:
        return 0, True
    if target >= size:
        return size, True
    lead = min(CONTEXT, target)
    base = target - lead
    fh.seek(base)
    buf = fh.read(lead + WINDOW + CONTEXT)
    stop = min(len(buf), lead + WINDOW)
    p = _clean_cut(buf[:stop], lead, sample_by)
    if p is not None:
        return base + p, True
    if base + stop >= size:  # the file ends inside the window: that is the cut
        return size, True
    p, exact = _inner_cut(buf, lead, stop, sample_by, enc)
    if count and enc is not None and not exact:
        enc.unchecked += 1
    return base + p, False


def _anchor(fh, start: int, sample_by: str) -> str:
    """The text a unit starting with a cut at byte ``start`` continues: the last ``ANCHOR`` characters of its
    document before the cut, as :meth:`Encoder.exact` took them when it checked the cut."""
    lo = max(0, start - 8 * ANCHOR)
    fh.seek(lo)
    text = _text(fh.read(start - lo), "left")
    sep = _SEPARATORS[sample_by]
    return (text.rpartition(sep)[2] if sep else text)[-ANCHOR:]


def read(unit: Unit, settings: Settings, starts: _LineStarts | None = None,
         enc: Encoder | None = None) -> tuple[list[str], list[bool], int, str | None]:
    """A unit's texts, whether each ends a document (is followed by EOS), the bytes it covers, and, when the first
    text continues a document cut before it, the anchor to encode it behind (:meth:`Encoder.encode`). ``starts``:
    the line starts found so far, shared by the calls of one pass over a corpus, so that the units inside one long
    JSON line do not each scan to its end (quadratic in the line's length). ``enc``: the tokenizer the texts are
    for, which checks the cuts inside documents (:class:`Encoder`); without it (a tokenizer's training sample)
    the first whitespace is taken."""
    if unit.kind in ("parquet", "table"):
        if unit.kind == "parquet":
            import pyarrow.parquet as pq

            with _unreadable_parquet(unit.file):
                pf = pq.ParquetFile(unit.file)
                table = pf.read_row_group(unit.index, columns=list(settings.text_columns))
            columns = {c: table.column(c).to_pylist() for c in settings.text_columns}
            first = lambda: sum(pf.metadata.row_group(g).num_rows for g in range(unit.index))  # noqa: E731
        else:
            rows = _table(unit.file)[unit.index * TABLE_ROWS : (unit.index + 1) * TABLE_ROWS]
            columns = {c: rows[c] for c in settings.text_columns}
            first = lambda: unit.index * TABLE_ROWS  # noqa: E731
        # a csv file is all text: a column that reads as numbers is still the file's text; elsewhere a cell that is
        # a list, an object or a number is no text (its Python repr would be trained on)
        strict = Path(unit.file).suffix.lower() != ".csv"
        texts = _cells(columns, settings, lambda r: f"{unit.file}: row {first() + r} (from 0)", strict)
        return texts, [True] * len(texts), unit.size, None
    size = os.path.getsize(unit.file)
    first, last = unit.index * settings.piece, (unit.index + 1) * settings.piece
    if unit.kind == "jsonl":
        lines = starts or _LineStarts(settings.piece)
        try:
            start, end = lines.cut(unit.file, first), lines.cut(unit.file, last)
        finally:
            if starts is None:
                lines.close()
        clean_start = clean_end = True
    with open(unit.file, "rb") as fh:
        if unit.kind != "jsonl":
            start, clean_start = _cut(fh, size, first, settings.sample_by, enc, count=True)
            end, clean_end = _cut(fh, size, last, settings.sample_by, enc)
        if end <= start:
            return [], [], 0, None
        anchor = None if clean_start else _anchor(fh, start, settings.sample_by)
        fh.seek(start)
        raw = fh.read(end - start)
    if unit.kind == "jsonl":
        texts = []
        for n, line in enumerate(raw.split(b"\n")):
            if line.strip():
                row = _row(line, unit.file, lambda n=n: _line_of(unit.file, start, n))
                if any(c not in row for c in settings.text_columns):
                    _check_columns(f"{unit.file}: line {_line_of(unit.file, start, n)}", row, settings)
                texts += _cells({c: [row[c]] for c in settings.text_columns}, settings,
                                lambda _, n=n: f"{unit.file}: line {_line_of(unit.file, start, n)}")
        return texts, [True] * len(texts), end - start, None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = _line_of(unit.file, start, raw[: e.start].count(b"\n"))
        raise UserError(f"{unit.file}: line {line}: not valid UTF-8 text") from None
    if "\r" in text:  # universal newlines, as Python's text mode reads them
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if settings.sample_by == "document":
        return [text], [end == size], end - start, anchor
    parts = text.split("\n" if settings.sample_by == "line" else "\n\n")
    # After an inner cut the first part continues the previous unit's last document (whose text had no EOS):
    # it is kept even when empty, to put that EOS. Before an inner cut the last part is unfinished: no EOS.
    # Inner cuts fall before whitespace that follows a non-space byte or after a single newline between non-space
    # bytes (paragraph mode; line mode cuts at newlines cleanly), so never inside a separator: splitting the pieces
    # gives the parts of the whole text, the one at each cut in two.
    texts, eos = [], []
    for k, part in enumerate(parts):
        if part or (k == 0 and not clean_start):
            texts.append(part)
            eos.append(k < len(parts) - 1 or clean_end)
    return texts, eos, end - start, anchor


def _cells(columns: dict[str, list], settings: Settings, where, strict: bool = True) -> list[str]:
    """Every non-empty cell of the text columns is a document (row by row, columns in the recipe's order); a null
    cell is skipped. ``strict``: a cell that is not a string is an error naming ``where(row)`` and the column (else
    it is read as its text, as csv cells that parse as numbers are)."""
    cols = [columns[c] for c in settings.text_columns]
    out = []
    for r, row in enumerate(zip(*cols)):
        for c, v in zip(settings.text_columns, row):
            if isinstance(v, str):
                if v:
                    out.append(v)
            elif v is not None:
                if strict:
                    raise UserError(f"{where(r)}: column '{c}': expected a string (or null), got {_json_type(v)}")
                if str(v):
                    out.append(str(v))
    return out


def _json_type(v) -> str:
    if isinstance(v, bool):
        return f"a boolean ({json.dumps(v)})"
    if isinstance(v, int | float):
        return f"a number ({v!r})"
    return {list: "an array", dict: "an object"}.get(type(v), f"a {type(v).__name__}")


def _line_of(path: str, start: int, lines_into_unit: int) -> int:
    """1-based number of the line ``lines_into_unit`` lines after byte ``start`` (for error messages)."""
    count = 0
    with open(path, "rb") as fh:
        while fh.tell() < start:
            chunk = fh.read(min(1 << 20, start - fh.tell()))
            if not chunk:
                break
            count += chunk.count(b"\n")
    return count + lines_into_unit + 1


# --- sampling (tokenizer training) ------------------------------------------------------------------


def sample(units: list[Unit], budget: int, seed: int, piece: int | None = None) -> list[Unit]:
    """A seeded random choice of units holding about ``budget`` bytes, in corpus order (all when smaller).

    A JSON-lines unit stands for ``piece`` (default ``PIECE``) bytes of its file but holds the rows that *start*
    there: with rows longer than the piece most units hold nothing, and the one holding a row's start holds all of
    it. So each drawn jsonl unit is measured (its cuts, see :class:`_LineStarts`), counts for the bytes it really
    holds and comes back with that size; an empty one is passed over and the drawing goes on."""
    if sum(u.size for u in units) <= budget:
        return units
    starts = _LineStarts(piece or PIECE)
    chosen: dict[int, Unit] = {}
    total = 0
    try:
        for i in np.random.default_rng([seed, 7]).permutation(len(units)):
            if total >= budget:
                break
            u = units[i]
            if u.kind == "jsonl":
                u = dataclasses.replace(u, size=starts.span(u))
                if not u.size:
                    continue
            chosen[int(i)] = u
            total += u.size
    finally:
        starts.close()
    return [chosen[i] for i in sorted(chosen)]


class _LineStarts:
    """The cuts (line starts) of JSON-lines units: the first line start at or after a unit's first byte, with the
    scans shared by the units of one pass (the sampler's, a tokenization worker's): the cut
    at or after a target is remembered for every byte the scan passed, and a scan stops where an earlier one started,
    so each byte of a file is scanned about once however many units inside one long line are measured."""

    OPEN = 8  # files kept open at once (a corpus of thousands of shards must not run out of file descriptors)

    def __init__(self, piece: int):
        self.piece = piece
        self.files: dict[str, tuple] = {}  # file -> (size, scan starts (sorted), the cut each found)
        self.handles: dict = {}  # file -> handle: the files open now, least recently used first

    def span(self, unit: Unit) -> int:
        """Bytes of the rows ``unit`` holds (what :func:`read` reads of it)."""
        return self.cut(unit.file, (unit.index + 1) * self.piece) - self.cut(unit.file, unit.index * self.piece)

    def cut(self, file: str, target: int) -> int:
        if file not in self.files:
            self.files[file] = (os.path.getsize(file), [], [])
        size, starts, cuts = self.files[file]
        if target <= 0:
            return 0
        if target >= size:
            return size
        fh = self.handles.pop(file, None) or open(file, "rb")
        self.handles[file] = fh
        if len(self.handles) > self.OPEN:
            self.handles.pop(next(iter(self.handles))).close()
        k = bisect.bisect_right(starts, target) - 1
        if k >= 0 and target <= cuts[k]:  # inside a scanned stretch: no line starts between its start and its cut
            return cuts[k]
        stop = starts[k + 1] - 1 if k + 1 < len(starts) else size  # a newline at byte >= target - 1 ends the line
        pos, found = target - 1, None
        fh.seek(pos)
        while pos < stop:
            chunk = fh.read(min(WINDOW, stop - pos))
            if not chunk:
                break
            i = chunk.find(b"\n")
            if i >= 0:
                found = pos + i + 1
                break
            pos += len(chunk)
        if found is None:  # no newline before the next scanned stretch (its cut is this one's) or the file's end
            found = cuts[k + 1] if k + 1 < len(starts) else size
        starts.insert(k + 1, target)
        cuts.insert(k + 1, found)
        return found

    def close(self) -> None:
        for fh in self.handles.values():
            fh.close()
        self.handles.clear()


def texts(units: list[Unit], settings: Settings) -> Iterator[list[str]]:
    """The texts of ``units``, one batch per unit (pieces of a long document come as separate texts). Units with no
    text at all are an error (a tokenizer trained on nothing would be all special tokens)."""
    seen = False
    starts = _LineStarts(settings.piece)
    try:
        for u in units:
            batch = read(u, settings, starts)[0]
            if batch:
                seen = seen or any(batch)
                yield batch
    finally:
        starts.close()
    if not seen:
        files = list(dict.fromkeys(u.file for u in units))
        where = files[0] + (f" (and {len(files) - 1} more files)" if len(files) > 1 else "") if files else "the corpus"
        raise UserError(f"data.train_files: no text in {where} to train the tokenizer on (every document is empty "
                        "or null); expected some text")


# --- tokenization ----------------------------------------------------------------------------------------


class Encoder:
    """A ``tokenizers.Tokenizer`` for documents encoded in pieces. The piece after a cut is encoded behind an anchor
    (the characters before the cut) whose own ids are then dropped: the piece's first word is encoded as it is in the
    whole document, with no text-start prefix (a ``Prepend``/Metaspace "▁", a prefix space) and whatever the
    tokenizer does to every word (Metaspace "always" after a split, added tokens) still done. :meth:`exact` tells
    whether a cut gives the whole text's ids."""

    def __init__(self, tok):
        self.tok = tok
        self.unchecked = 0  # cuts taken where no candidate was found exact (the ids may differ there)

    def exact(self, left: str, right: str, anchor: str | None = None) -> bool:
        """Whether ``left + right`` (a document's text around a cut) encodes to the ids of ``left`` and of ``right``
        encoded behind ``anchor`` (default: the end of ``left``, as :func:`read` takes it)."""
        whole, head = self._ids([left + right, left])
        tail = self.encode([right], [left[-ANCHOR:] if anchor is None else anchor], strict=True)[0]
        return tail is not None and whole == head + tail

    def encode(self, texts: list[str], anchors: list[str | None], strict: bool = False) -> list[list[int] | None]:
        """Ids of ``texts``, each continuing its anchor (None: a text of its own). A text whose anchor's own ids do not
        begin the ids of anchor + text (a merge across the cut) is None with ``strict``, else encoded on its own."""
        ids = self._ids([t if a is None else a + t for t, a in zip(texts, anchors)])
        own = iter(self._ids([a for a in anchors if a is not None]))
        for k, a in enumerate(anchors):
            if a is not None:
                prefix = next(own)
                if ids[k][: len(prefix)] == prefix:
                    ids[k] = ids[k][len(prefix) :]
                else:
                    ids[k] = None if strict else self._ids([texts[k]])[0]
        return ids

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)] if texts else []


def encode(tok, texts: list[str], eos_after: list[bool], eos_id: int, dtype, piece: int | None = None,
           continued: str | None = None) -> np.ndarray:
    """Token ids of ``texts`` (an :class:`Encoder`, or a ``tokenizers.Tokenizer`` to make one of), EOS after those
    that end a document, as one array. ``continued``: the first text continues a document cut before it, behind this
    anchor (:func:`read` gives it).

    ``tok`` should encode special tokens as ordinary text (``tok.encode_special_tokens = True``, as the workers'
    tokenizer does): a literal "<|endoftext|>" in a document is its characters, EOS comes only between documents.

    Encoded in batches of about ``piece`` characters (default ``PIECE``), a longer text in pieces cut where the
    encoder finds the cut exact (:func:`_split_long`): memory follows the piece size, not the longest row of a
    jsonl or parquet file (one 15 MB cell was hundreds of MB of encodings per worker)."""
    enc = tok if isinstance(tok, Encoder) else Encoder(tok)
    piece = piece or PIECE
    out: list[list[int]] = []
    batch: list[tuple[str, bool, str | None]] = []  # (text, ends a document, the anchor it continues)

    def flush():
        for ids, (_, end, _) in zip(enc.encode([b[0] for b in batch], [b[2] for b in batch]), batch):
            out.append(ids)
            if end:
                out.append([eos_id])
        batch.clear()

    size = 0
    for n, (text, end) in enumerate(zip(texts, eos_after)):
        parts = _split_long(text, piece, enc)
        for k, part in enumerate(parts):
            anchor = parts[k - 1][-ANCHOR:] if k else continued if n == 0 else None
            batch.append((part, end and k == len(parts) - 1, anchor))
            size += len(part)
            if size >= piece:
                flush()
                size = 0
    if batch:
        flush()
    return np.fromiter(itertools.chain.from_iterable(out), dtype=dtype, count=sum(map(len, out)))


_STR_BEFORE_NEWLINE = re.compile(r"\S(?=\n)")
_STR_BEFORE_SPACE = re.compile(r"\S(?=[ \t\n\r\f\v])")
_STR_AFTER_NEWLINE = re.compile(r"(?<=\S\n)\S")


def _split_long(text: str, piece: int, enc: Encoder | None = None) -> list[str]:
    """``text`` in pieces of about ``piece`` characters, each cut just before ASCII whitespace that follows a
    non-space character (newline first), else after a single newline between non-space characters — the first
    that ``enc`` finds exact, as :func:`_inner_cut` cuts files: the pieces tokenize to the whole text's ids. Where no
    cut in the next ``WINDOW`` characters is exact, the rest of the text is the last piece when it ends there, else
    the first such place is taken, else the cut falls at ``piece`` characters."""
    if len(text) <= piece:
        return [text]
    context = min(CONTEXT, piece // 2)  # a check encodes at most about 2 pieces
    parts, start = [], 0
    while len(text) - start > piece:
        target = start + piece
        kinds = [(m.start() + 1 for m in pattern.finditer(text, target - 1, target + WINDOW))
                 for pattern in (_STR_BEFORE_NEWLINE, _STR_BEFORE_SPACE)]
        kinds.append(m.start() for m in _STR_AFTER_NEWLINE.finditer(text, target, target + WINDOW))
        cut, exact = _pick(kinds, lambda p: (text[max(start, p - context) : p], text[p : p + context],
                                             text[max(start, p - ANCHOR) : p]), enc)
        if not exact and len(text) - target <= WINDOW:  # the text ends inside the window: the rest is the last piece
            cut = len(text)
        elif cut is None:  # no whitespace: a cut between characters
            cut = target
        if not exact and cut < len(text) and enc is not None:
            enc.unchecked += 1
        parts.append(text[start:cut])
        start = cut
    if start < len(text) or not parts:
        parts.append(text[start:])
    return parts


_worker: dict = {}


def _init_worker(tokenizer_json: str, eos_id: int, dtype: str, settings: Settings, pool: bool = False) -> None:
    from tokenizers import Tokenizer

    if pool:  # one thread per worker: the workers are the parallelism
        os.environ["TOKENIZERS_PARALLELISM"] = "false"

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_truncation()  # a tokenizer.json may carry them (saved after a call with truncation=True or padding=True):
    tok.no_padding()  # a stream is whole documents, never cut to max_length nor padded
    tok.encode_special_tokens = True  # document text is ordinary text (tiktoken's encode_ordinary): EOS only between
    if "starts" in _worker:
        _worker["starts"].close()
    _worker.update(enc=Encoder(tok), eos=eos_id, dtype=np.dtype(dtype), settings=settings, starts=_LineStarts(settings.piece))


def _encode_unit(unit: Unit) -> tuple[np.ndarray, int, int]:
    enc = _worker["enc"]
    before = enc.unchecked
    texts_, eos, nbytes, continued = read(unit, _worker["settings"], _worker["starts"], enc)
    ids = encode(enc, texts_, eos, _worker["eos"], _worker["dtype"], continued=continued)
    return ids, nbytes, enc.unchecked - before


def tokenize(units: list[Unit], settings: Settings, tokenizer_json: str, eos_id: int, dtype: str,
             num_proc: int) -> Iterator[tuple[np.ndarray, int, int]]:
    """(token ids, bytes read, cuts inside documents not found exact) per unit, in order; ``num_proc`` worker
    processes, at most 2 units each in flight."""
    if num_proc <= 1 or len(units) < POOL_MIN_UNITS:
        _init_worker(tokenizer_json, eos_id, dtype, settings)
        yield from map(_encode_unit, units)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch's and rayon's threads
    with ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_init_worker,
                             initargs=(tokenizer_json, eos_id, dtype, settings, True)) as pool:
        pending: deque = deque()
        todo = iter(units)
        for u in itertools.islice(todo, 2 * num_proc):
            pending.append(pool.submit(_encode_unit, u))
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(_encode_unit, nxt))
            yield result
