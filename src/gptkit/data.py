"""Local data: resolve files, load them with ``datasets``, tokenize once (cached), pack into blocks.

Pretraining data becomes one flat token stream per split (EOS between documents), stored as a
numpy ``.bin`` in the cache and memory-mapped — nanoGPT's layout. A block is ``context + 1``
consecutive tokens (inputs and next-token targets), so blocks are fixed-length and cost no padding.
The cache key covers the files (path, size, mtime), the text settings and the tokenizer's
vocabulary, so an unchanged second run skips tokenization entirely.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gptkit.errors import UserError
from gptkit.recipe import DataConfig

log = logging.getLogger(__name__)

_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def resolve_files(patterns: list[str], field: str) -> list[str]:
    """Expand globs; every match must be a non-empty file of one supported format."""
    files: list[str] = []
    for pat in patterns:
        matches = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else [pat]
        if not matches:
            raise UserError(f"{field}: '{pat}' matches no file")
        for m in matches:
            p = Path(m)
            if not p.exists():
                raise UserError(f"{field}: '{m}' not found")
            if p.is_dir():
                raise UserError(f"{field}: '{m}' is a directory, expected a data file")
            if p.suffix.lower() not in _BUILDERS:
                raise UserError(f"{field}: '{m}' has an unsupported extension; expected one of {sorted(_BUILDERS)}")
            if p.stat().st_size == 0:
                raise UserError(f"{field}: '{m}' is empty")
            files.append(str(p))
    return files


def _diagnose(files: list[str], builder: str) -> str | None:
    """Find the file/line that made ``datasets`` fail, for a message better than its traceback."""
    for f in files:
        if builder == "parquet":
            continue
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    return f"{f}: line {lineno}: not valid UTF-8 text"
                if builder == "json" and line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        return f"{f}: line {lineno}: invalid JSON ({e.msg}); expected one JSON object per line"
    return None


def load_table(files: list[str], field: str, **kwargs):
    """Load local files with ``datasets`` (format from the extension); parse errors name the file and line."""
    import datasets

    builder = _BUILDERS[Path(files[0]).suffix.lower()]
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as e:  # datasets wraps every parse error; find the real cause for the user
        where = _diagnose(files, builder)
        raise UserError(where or f"{field}: could not load {files[0]}: {str(e).splitlines()[0]}") from None
    if len(ds) == 0:
        raise UserError(f"{field}: no rows in {files}")
    return ds


def load_texts(files: list[str], cfg: DataConfig, field: str):
    """A ``datasets.Dataset`` with a single ``text`` column; each listed text column is a document.

    Files of different formats load separately and are concatenated in the order given.
    """
    import datasets

    by_builder: dict[str, list[str]] = {}
    for f in files:
        by_builder.setdefault(_BUILDERS[Path(f).suffix.lower()], []).append(f)
    parts = [_texts_of(group, builder, cfg, field) for builder, group in by_builder.items()]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _texts_of(files: list[str], builder: str, cfg: DataConfig, field: str):
    if builder == "text":
        return load_table(files, field, sample_by=cfg.sample_by).select_columns(["text"])
    ds = load_table(files, field)
    cols = [cfg.text_column] if isinstance(cfg.text_column, str) else list(cfg.text_column)
    missing = [c for c in cols if c not in ds.column_names]
    if missing:
        raise UserError(f"{field}: column '{missing[0]}' not found in {files[0]} (data.text_column); "
                        f"columns: {ds.column_names}")
    if len(cols) == 1:
        ds = ds.select_columns(cols)
        return ds.rename_column(cols[0], "text") if cols[0] != "text" else ds

    def flatten(batch: dict) -> dict:  # several text columns: each cell becomes its own document
        return {"text": [str(batch[c][i]) for i in range(len(batch[cols[0]])) for c in cols]}

    return ds.map(flatten, batched=True, remove_columns=ds.column_names)


def iter_text_batches(ds, batch_size: int = 1000) -> Iterator[list[str]]:
    """Stream the text column in batches (for tokenizer training)."""
    for batch in ds.iter(batch_size=batch_size):
        yield [t for t in batch["text"] if t]


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("GPTKIT_CACHE") or Path.home() / ".cache" / "gptkit")


def _cache_key(files: list[str], cfg: DataConfig, tokenizer) -> str:
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"{cfg.text_column}|{cfg.sample_by}|".encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    return h.hexdigest()[:24]


def token_stream(files: list[str], cfg: DataConfig, tokenizer, field: str) -> np.ndarray:
    """Tokenize ``files`` into one memory-mapped stream of token ids (EOS after every document)."""
    root = cache_root(cfg) / "streams"
    key = _cache_key(files, cfg, tokenizer)
    path, meta_path = root / f"{key}.bin", root / f"{key}.json"
    if meta_path.exists() and path.exists():
        meta = json.loads(meta_path.read_text())
        log.info("using cached tokens for %s (%d tokens)", field, meta["n_tokens"])
        return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
    ds = load_texts(files, cfg, field)
    eos = tokenizer.eos_token_id

    def encode(batch: dict) -> dict:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] for x, t in zip(ids, batch["text"]) if t]}

    tokenized = ds.map(encode, batched=True, remove_columns=["text"], num_proc=cfg.num_proc, new_fingerprint=key)
    dtype = np.uint16 if len(tokenizer) < 2**16 else np.uint32
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.{os.getpid()}.tmp"
    n = 0
    with open(tmp, "wb") as fh:
        for batch in tokenized.iter(batch_size=1000):
            chunk = np.fromiter((t for ids in batch["ids"] for t in ids), dtype=dtype)
            fh.write(chunk.tobytes())
            n += len(chunk)
    os.replace(tmp, path)  # atomic: a concurrent or killed run never sees half a stream
    meta_path.write_text(json.dumps({"n_tokens": n, "dtype": np.dtype(dtype).name, "files": files}))
    log.info("tokenized %s: %d tokens", field, n)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


class Blocks:
    """Fixed-length examples cut from a token stream: block i covers tokens [s + i*T, s + i*T + T + 1).

    The shift s is 0 in the first epoch and a seeded value in [0, T) in each later one, so repeated
    epochs see new windows (as nanoGPT's random crops do) while every epoch stays a pure function of
    (seed, epoch) — which keeps resume exact.
    """

    def __init__(self, stream: np.ndarray, context: int, seed: int = 0):
        self.stream, self.context, self.seed = stream, context, seed

    def __len__(self) -> int:
        return max(0, (len(self.stream) - self.context) // self.context)

    def _shift(self, epoch: int) -> int:
        return 0 if epoch == 0 else int(np.random.default_rng([self.seed, epoch, 1]).integers(self.context))

    def batch(self, indices: list[int], epochs: list[int] | None = None) -> dict:
        import torch

        T = self.context
        starts = [i * T + (self._shift(e) if epochs else 0) for i, e in zip(indices, epochs or indices)]
        rows = np.stack([self.stream[s : s + T + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(rows)
        return {"input_ids": t[:, :-1], "labels": t[:, 1:]}


def pretrain_splits(cfg: DataConfig, tokenizer, context: int, seed: int = 0) -> tuple[Blocks, Blocks | None]:
    """Train and validation blocks for pretraining, checking each split can hold a (shifted) block."""
    train_files = resolve_files(cfg.train_files, "data.train_files")
    stream = token_stream(train_files, cfg, tokenizer, "data.train_files")
    if cfg.val_files:
        val = token_stream(resolve_files(cfg.val_files, "data.val_files"), cfg, tokenizer, "data.val_files")
        train = stream
    elif cfg.val_fraction > 0:
        n_val = int(len(stream) * cfg.val_fraction)
        train, val = stream[: len(stream) - n_val], stream[len(stream) - n_val :]
    else:
        train, val = stream, None
    need = 2 * context
    if len(train) < need:
        raise UserError(
            f"data.train_files: corpus too small: {len(train)} training tokens; blocks of model.context={context} "
            f"need at least {need}"
        )
    if val is not None and len(val) < need:
        raise UserError(
            f"data: validation split has {len(val)} tokens, fewer than the {need} that blocks of {context} need; "
            "raise data.val_fraction, add data.val_files, or set data.val_fraction=0"
        )
    return Blocks(train, context, seed), (Blocks(val, context) if val is not None else None)


def load_rows(files: list[str], field: str, fields: tuple[str, ...], optional: tuple[str, ...] = (),
              columns: dict[str, str] | None = None) -> list[dict]:
    """Rows of a fine-tuning split renamed to the task's field names (``columns`` maps a field to its file
    column); a missing required column is one error naming the file and the columns it has."""
    paths = resolve_files(files, field)
    table = load_table(paths, field)
    cols = columns or {}
    wanted = {f: cols.get(f, f) for f in (*fields, *optional)}
    missing = [f"{c}" + (f" (data.columns.{f})" if f in cols else "") for f, c in wanted.items()
               if f in fields and c not in table.column_names]
    if missing:
        raise UserError(f"{field}: {paths[0]} has no column {', '.join(missing)}; columns found: {table.column_names} "
                        "(map them with data.columns)")
    present = {f: c for f, c in wanted.items() if c in table.column_names}
    return [{f: row[c] for f, c in present.items()} for row in table]
