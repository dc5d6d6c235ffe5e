"""Local data: resolve files, load them with ``datasets``, tokenize once (cached), pack into blocks.

Pretraining data becomes one flat token stream per split (EOS between documents), stored as a
numpy ``.bin`` in the cache and memory-mapped — nanoGPT's layout. A block is ``context + 1``
consecutive tokens (inputs and next-token targets), so blocks are fixed-length and cost no padding.
The cache key covers the files (path, size, mtime), the text settings, the tokenizer's
vocabulary and the stream format (``corpus.STREAM_FORMAT``), so an unchanged second run skips tokenization
entirely. An empty stream is an error, never cached.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

from gptkit.corpus import FORMATS as _BUILDERS
from gptkit.corpus import STREAM_FORMAT
from gptkit.errors import UserError
from gptkit.recipe import DataConfig, column_fields_check

log = logging.getLogger(__name__)
PROGRESS_EVERY = 5.0  # seconds between records of how far an interrupted tokenization got



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
        blank = True
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    return f"{f}: line {lineno}: not valid UTF-8 text"
                blank = blank and not line.strip()
                if builder == "json" and line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        return f"{f}: line {lineno}: invalid JSON ({e.msg}); expected one JSON object per line"
        if blank:
            return f"{f}: no rows (the file holds only blank lines)"
    return None


def load_table(files: list[str], field: str, **kwargs):
    """Load local files with ``datasets`` (format from the extension); parse errors name the file and line."""
    import datasets

    builder = _BUILDERS[Path(files[0]).suffix.lower()]
    datasets.disable_progress_bars()
    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its "Failed to load JSON ..." would come before our line
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as e:  # datasets wraps every parse error; find the real cause for the user
        where = _diagnose(files, builder)
        raise UserError(f"{field}: {where or f'could not load {files[0]}: {str(e).splitlines()[0]}'}") from None
    finally:
        quiet.setLevel(level)
    if len(ds) == 0:
        raise UserError(f"{field}: no rows in {files}")
    import pyarrow as pa

    try:  # Arrow's JSON and CSV readers keep bytes that are not UTF-8 in string columns (GB/s: it reads each once)
        ds.data.table.validate(full=True)
    except pa.ArrowInvalid as e:
        raise UserError(f"{field}: " + (_diagnose(files, builder) or f"{files[0]}: {str(e).splitlines()[0]}")) from None
    return ds


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("GPTKIT_CACHE") or Path.home() / ".cache" / "gptkit")


def cache_setting(cfg: DataConfig) -> str:
    """What chose :func:`cache_root`, for a message about it."""
    return "data.cache_dir" if cfg.cache_dir else "GPTKIT_CACHE" if os.environ.get("GPTKIT_CACHE") else "cache folder"


def _hash_files(h, files: list[str]) -> None:
    """Each file's path, size and modification time into ``h``: an edited file gives another key."""
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())


def _cache_key(files: list[str], cfg: DataConfig, tokenizer) -> str:
    h = hashlib.sha256(f"stream format {STREAM_FORMAT}\n".encode())  # how text becomes ids: a change re-tokenizes
    _hash_files(h, files)
    h.update(f"{cfg.text_column}|{cfg.sample_by}|".encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(f"|eos {tokenizer.eos_token_id}".encode())  # one tokenizer.json, two EOS (a base and its instruct)
    return h.hexdigest()[:24]


EXAMPLES_FORMAT = 1  # bump when the same inputs give other fine-tuning examples (the gptkit source is keyed too)
# The recipe in a cached split's key: every section but these, which are left out (None) or cut to the fields named,
# as nothing else in them changes the examples (a sweep over lr or LoRA, a resume, another output.dir reuse them).
# A field not listed here is in the key: a forgotten one costs a cache miss, never stale examples.
_EXAMPLES_KEY = {
    "description": None, "output": None, "distributed": None, "train": {"seed"},
    "data": {"train_files", "val_files", "test_files", "columns", "train_weights", "text_column", "sample_by"},
    "finetune": {"prompt", "max_length", "synthetic_tag", "tasks", "qa_mode", "doc_stride", "max_answer_tokens",
                 "loss", "no_answer"},
}


@lru_cache(maxsize=1)
def _source_digest() -> str:
    """gptkit's own code, hashed: examples cached by one version are never read by another."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()


def _examples_key(recipe, tokenizer, model, split: str) -> str:
    import tokenizers
    import transformers

    spec = recipe.model_dump(mode="json")
    for section, kept in _EXAMPLES_KEY.items():
        if kept is None:
            spec.pop(section, None)
        else:
            spec[section] = {k: v for k, v in spec[section].items() if k in kept}
    h = hashlib.sha256(f"examples format {EXAMPLES_FORMAT}|{split}|{_source_digest()}|{transformers.__version__}|"
                       f"{tokenizers.__version__}\n".encode())
    h.update(json.dumps(spec, sort_keys=True).encode())
    patterns = [*recipe.data.train_files, *recipe.data.val_files, *recipe.data.test_files,
                *(f for t in recipe.finetune.tasks for f in (*t.train_files, *t.val_files, *t.test_files))]
    _hash_files(h, sorted(set(resolve_files(patterns, "data"))))
    h.update(type(tokenizer).__name__.encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps(tokenizer.init_kwargs, sort_keys=True, default=str).encode())
    h.update(f"|{tokenizer.bos_token_id}|{tokenizer.eos_token_id}|{tokenizer.pad_token_id}".encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode() if model is not None else b"")
    return h.hexdigest()[:24]


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


def cached_examples(recipe, tokenizer, model, split: str, make):
    """``make()`` (a task's ``preprocess`` of ``split``), cached in ``<cache>/examples/``: a second run on the same
    files, tokenizer, model config and preprocessing fields — a resume, a sweep's next trial, the other ranks of a
    distributed run (they wait for the first) — loads the examples instead of tokenizing again, and logs what making
    them logged (truncation counts). Their arrays are memory-mapped from the cache file (:func:`_save_examples`), the
    first run's too once written: training holds the token ids in the page cache, not in its own memory. The cache is
    skipped, with a warning, where it cannot be written."""
    root = cache_root(recipe.data) / "examples"
    key = _examples_key(recipe, tokenizer, model, split)
    path = root / f"{key}.examples"
    with contextlib.ExitStack() as held:
        try:
            root.mkdir(parents=True, exist_ok=True)
            held.enter_context(_locked(root / f".{key}.lock"))
        except OSError as e:
            log.warning("examples cache %s not writable (%s): tokenizing %s without it", root, e.strerror or e, split)
            return make()
        if path.exists():
            try:
                records, examples = _load_examples(path)
            except Exception as e:  # a torn or foreign file: made again
                log.warning("examples cache %s unreadable (%s): tokenizing %s again", path, e, split)
            else:
                log.info("using cached examples for %s (%d)", split, len(examples))
                _used(path)
                for name, level, msg in records:
                    logging.getLogger(name).log(level, "%s", msg)
                return examples
        from gptkit.tasks.generative import Spill

        _sweep(root, key)
        _evict(root, key)
        # (a lock on a network file system may not hold: files per writer)
        tmp, parts = root / f".{key}.{os.getpid()}.tmp", root / f".{key}.{os.getpid()}.parts"
        recorder = _Recorder()
        logging.getLogger("gptkit").addHandler(recorder)
        try:
            parts.mkdir()
            with Spill(parts).active() as spill:  # chunks of examples go to disk as they are made
                examples = make()
        except OSError as e:  # a full disk costs the cache, not the run
            log.warning("examples cache: could not write %s (%s): tokenizing %s without it", parts, e.strerror or e,
                        split)
            shutil.rmtree(parts, ignore_errors=True)
            return make()
        except BaseException:  # bad data (a UserError), Ctrl-C: nothing left behind
            shutil.rmtree(parts, ignore_errors=True)
            raise
        finally:
            logging.getLogger("gptkit").removeHandler(recorder)
        try:
            _save_examples(tmp, (recorder.records, examples), spill.files)
            os.replace(tmp, path)
            return _load_examples(path)[1]
        except OSError as e:
            tmp.unlink(missing_ok=True)
            log.warning("examples cache: could not write %s (%s)", path, e.strerror or e)
            return examples
        finally:
            shutil.rmtree(parts, ignore_errors=True)  # (what is mapped from it stays readable until unmapped)


def _sweep(root: Path, key: str) -> None:
    """Removes what writers of ``key`` that are no longer running on this machine left (killed mid-way)."""
    for left in [*root.glob(f".{key}.*.tmp"), *root.glob(f".{key}.*.parts")]:
        try:
            os.kill(int(left.name.split(".")[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(left) if left.is_dir() else left.unlink(missing_ok=True)
        except (ValueError, OSError):  # not a pid, or another user's process
            continue


_EXAMPLES_MAGIC = b"GPTKEX01"
_ALIGN = 64


def _save_examples(path: Path, obj, files: dict[int, Path] | None = None) -> None:
    """``obj`` pickled (protocol 5) with its numpy arrays' data out of band, each at an aligned offset after the
    pickle: :func:`_load_examples` maps them instead of reading them. ``files``: arrays mapped from a file, by data
    address (:class:`gptkit.tasks.generative.Spill`): the file is copied instead of the mapped pages read."""
    import pickle

    buffers: list = []
    payload = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    files = files or {}
    head = 24 + 16 * len(raws)
    offset, spans = head + len(payload), []
    for raw in raws:
        offset += -offset % _ALIGN
        spans.append((offset, raw.nbytes))
        offset += raw.nbytes
    with open(path, "wb") as fh:
        fh.write(_EXAMPLES_MAGIC + len(payload).to_bytes(8, "little") + len(raws).to_bytes(8, "little"))
        fh.write(b"".join(a.to_bytes(8, "little") + n.to_bytes(8, "little") for a, n in spans))
        fh.write(payload)
        for raw, (at, _) in zip(raws, spans):
            fh.write(b"\0" * (at - fh.tell()))
            source = files.get(np.frombuffer(raw, np.uint8).ctypes.data) if raw.nbytes else None
            if source is not None and source.stat().st_size == raw.nbytes:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, fh, 1 << 24)
            else:
                fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())


def _load_examples(path: Path):
    import pickle

    mm = np.memmap(path, dtype=np.uint8, mode="r")
    if bytes(mm[:8]) != _EXAMPLES_MAGIC:
        raise ValueError("not a gptkit examples file")
    size, n = int.from_bytes(bytes(mm[8:16]), "little"), int.from_bytes(bytes(mm[16:24]), "little")
    spans = np.frombuffer(bytes(mm[24 : 24 + 16 * n]), dtype="<u8").reshape(n, 2)
    head = 24 + 16 * n
    return pickle.loads(memoryview(mm[head : head + size]), buffers=[mm[a : a + b] for a, b in spans.tolist()])


def text_settings(cfg: DataConfig):
    """The recipe's text settings as :mod:`gptkit.corpus` reads them."""
    from gptkit import corpus

    cols = (cfg.text_column,) if isinstance(cfg.text_column, str) else tuple(cfg.text_column)
    return corpus.Settings(sample_by=cfg.sample_by, text_columns=cols, piece=corpus.PIECE)


def num_proc(cfg: DataConfig) -> int:
    return cfg.num_proc or len(os.sched_getaffinity(0))


def _used(path: Path) -> None:
    """Marks a cache entry as used now (its modification time): :func:`_evict` keeps what runs still read."""
    try:
        os.utime(path)
    except OSError:  # a cache another user owns: reading is fine
        pass


def _evict(root: Path, keep: str) -> None:
    """Removes the cache entries in ``root`` (a key's files, and what an interrupted build of it left) that no run has
    used for ``$GPTKIT_CACHE_DAYS`` days (30; 0 keeps everything): an entry made by another gptkit version, or of
    files since edited, is never read again. An entry whose lock another process holds is left alone."""
    import fcntl

    days = float(os.environ.get("GPTKIT_CACHE_DAYS") or 30)
    if days <= 0:
        return
    cutoff = time.time() - days * 86400
    for lock in root.glob(".*.lock"):
        key = lock.name[1:-len(".lock")]
        files = [p for p in (*root.glob(f"{key}.*"), *root.glob(f".{key}.*")) if p != lock]
        try:
            if key == keep or not files or max(p.stat().st_mtime for p in files) > cutoff:
                continue
            with open(lock, "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (the lock file stays: another may have it open)
                for p in files:
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        except OSError:  # in use (BlockingIOError), or removed by another process meanwhile
            continue
        log.info("cache: removed %s (unused for over %g days; GPTKIT_CACHE_DAYS)", root / key, days)


@contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (another process tokenizing the same corpus waits, then reads its cache)."""
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def token_stream(files: list[str], cfg: DataConfig, tokenizer, field: str) -> np.ndarray:
    """Tokenize ``files`` into one memory-mapped stream of token ids (EOS after every document).

    Streams the corpus in units (:mod:`gptkit.corpus`) on ``data.num_proc`` processes with a progress bar
    (MB/s, ETA), appending each unit's ids to ``.<key>.partial``. Progress is recorded every few seconds, so
    a killed run resumes where it stopped; the stream is renamed into place only when complete."""
    from tqdm.auto import tqdm

    from gptkit import corpus

    root = cache_root(cfg) / "streams"
    key = _cache_key(files, cfg, tokenizer)
    path, meta_path = root / f"{key}.bin", root / f"{key}.json"
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{key}.lock"):
        meta = json.loads(meta_path.read_text()) if meta_path.exists() and path.exists() else None
        if meta and meta["n_tokens"] > 0:  # (an empty stream, cached by an older version, is never reused)
            log.info("using cached tokens for %s (%d tokens)", field, meta["n_tokens"])
            _used(meta_path)
            return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
        _evict(root, key)
        settings = text_settings(cfg)
        units = corpus.plan(files, settings)
        dtype = np.dtype(np.uint16 if len(tokenizer) < 2**16 else np.uint32)
        partial, progress = root / f".{key}.partial", root / f".{key}.progress.json"
        done, n, nbytes, inexact = 0, 0, 0, 0
        if partial.exists() and progress.exists():  # an interrupted run: keep what it recorded as complete
            state = json.loads(progress.read_text())
            done, n, nbytes, inexact = state["units"], state["tokens"], state["bytes"], state.get("inexact", 0)
            log.info("resuming tokenization of %s after %d of %d units", field, done, len(units))
        with open(partial, "r+b" if done else "wb") as fh:
            fh.truncate(n * dtype.itemsize)
            fh.seek(n * dtype.itemsize)
            total = sum(u.size for u in units)
            bar = tqdm(total=total, initial=nbytes, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"tokenizing {field}", mininterval=1.0, disable=None)
            saved, checked = time.monotonic(), False
            for ids, read, unchecked in corpus.tokenize(units[done:], settings, tokenizer.backend_tokenizer.to_str(),
                                                        tokenizer.eos_token_id, dtype.name, num_proc(cfg)):
                inexact += unchecked
                fh.write(ids.tobytes())
                done, n, nbytes = done + 1, n + len(ids), nbytes + read
                bar.update(read)
                if not checked and nbytes > 0:  # free disk for the rest, at this unit's tokens per byte
                    checked = True
                    _check_free(root, (total - nbytes) * len(ids) / max(read, 1) * dtype.itemsize, field)
                if time.monotonic() - saved >= PROGRESS_EVERY:
                    fh.flush()
                    os.fsync(fh.fileno())
                    _write_json(progress, {"units": done, "tokens": n, "bytes": nbytes, "inexact": inexact})
                    saved = time.monotonic()
            bar.close()
        if n == 0:  # nothing to train on: an error, and nothing cached (the next run reads the files again)
            for stale in (partial, progress, path, meta_path):
                stale.unlink(missing_ok=True)
            where = files[0] + (f" (and {len(files) - 1} more files)" if len(files) > 1 else "")
            raise UserError(f"{field}: no text in {where}: it gives 0 tokens (every document is empty or null); "
                            "expected some text")
        os.replace(partial, path)
        meta_path.write_text(json.dumps({"n_tokens": n, "dtype": dtype.name, "files": files}))
        progress.unlink(missing_ok=True)
        if inexact:
            log.warning("%s: %d cuts inside long documents found no place where the two pieces encode as the whole "
                        "text does (no whitespace within 64 KiB, or none the tokenizer splits at): the ids may differ "
                        "there from encoding those documents whole, by a token or two each", field, inexact)
    log.info("tokenized %s: %d tokens from %.1f MB", field, n, nbytes / 1e6)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _check_free(root: Path, need: float, field: str) -> None:
    import shutil

    free = shutil.disk_usage(root).free
    if free < need * 1.1:
        raise UserError(f"{field}: tokenizing needs about {need / 1e9:.1f} GB more in {root}, but only "
                        f"{free / 1e9:.1f} GB are free; free space or set data.cache_dir")


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
              columns: dict[str, str] | None = None) -> "TableRows":
    """Rows of a fine-tuning split renamed to the task's field names (``columns`` maps a field to its file
    column), read on demand (:class:`TableRows`); a missing required column, or a row without a value in one, is one
    error naming the file and the columns it has."""
    paths = resolve_files(files, field)
    table = load_table(paths, field)
    cols = columns or {}
    column_fields_check(cols, (*fields, *optional), field.rsplit(".", 1)[0] + ".columns" if field.startswith(
        "finetune.tasks[") else "data.columns")
    wanted = {f: cols.get(f, f) for f in (*fields, *optional)}
    missing = [f"{c}" + (f" (data.columns.{f})" if f in cols else "") for f, c in wanted.items()
               if f in fields and c not in table.column_names]
    if missing:
        raise UserError(f"{field}: {paths[0]} has no column {', '.join(missing)}; columns found: {table.column_names} "
                        "(map them with data.columns)")
    present = {f: c for f, c in wanted.items() if c in table.column_names}
    for f in fields:  # a blank cell or an absent key reads as None: never train on the text "None"
        gap = _first_null(table, present[f])
        if gap is not None:
            path, k = _row_origin(paths, field, gap)
            raise UserError(f"{field}: {path}: row {k} (from 0) has no value for column '{present[f]}'; every row "
                            "needs one")
    return TableRows(table, present)


def _first_null(table, column: str) -> int | None:
    """The first row whose ``column`` is null (Arrow's null count, then its position), or None."""
    import pyarrow.compute as pc

    col = table.data.column(column)
    if col.null_count == 0:
        return None
    return int(pc.index(pc.is_null(col), True).as_py())


class TableRows(Sequence):
    """A split's rows as dicts of the task's field names, read on demand from the memory-mapped Arrow table that
    ``datasets`` keeps on disk: a million rows cost no memory until a chunk of them is read. Indexing and slicing
    give dicts (a list of them); iteration reads in batches."""

    def __init__(self, table, present: dict[str, str]):
        self.table, self.present = table.select_columns(list(dict.fromkeys(present.values()))), present

    def __len__(self) -> int:
        return len(self.table)

    def _rows(self, columns: dict) -> list[dict]:
        n = len(next(iter(columns.values()))) if columns else 0
        return [{f: columns[c][i] for f, c in self.present.items()} for i in range(n)]

    def __getitem__(self, i):
        if isinstance(i, slice):
            lo, hi, step = i.indices(len(self))
            if step != 1:
                return [self[k] for k in range(lo, hi, step)]
            return self._rows(self.table[lo:hi]) if hi > lo else []
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        row = self.table[i % len(self)]
        return {f: row[c] for f, c in self.present.items()}

    def __iter__(self):
        for lo in range(0, len(self), 1000):
            yield from self[lo : lo + 1000]

    def take(self, indices) -> list[dict]:
        """The rows at ``indices``, read in one go."""
        return self._rows(self.table[np.asarray(indices, dtype=np.int64)]) if len(indices) else []


class Joined(Sequence):
    """Row sequences read as one, on demand: part k's rows (``pick``: those indices of it, in that order — a weight's
    repeats and sample), each passed through ``edit(row, k)`` (a task tag, the synthetic tag) as it is read. A
    million rows cost their index arrays, not a million dicts; ``part(k)`` is part k alone, ``keys`` name the parts
    (a multi-task split: each task's index)."""

    def __init__(self, parts: list[tuple[Sequence, np.ndarray | None]], edit=None, keys: list | None = None):
        self.parts, self.edit, self.keys = parts, edit, keys
        self.starts = np.cumsum([0] + [len(rows) if pick is None else len(pick) for rows, pick in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def part(self, k: int) -> "Joined":
        edit = self.edit
        return Joined([self.parts[k]], (lambda row, _: edit(row, k)) if edit else None)

    def _read(self, k: int, lo: int, hi: int) -> list[dict]:
        rows, pick = self.parts[k]
        if pick is None:
            got = rows[lo:hi]
        else:
            idx = pick[lo:hi]
            got = rows.take(idx) if isinstance(rows, TableRows) else [rows[int(i)] for i in idx]
        return [self.edit(r, k) for r in got] if self.edit else list(got)

    def __getitem__(self, i):
        if isinstance(i, slice):
            lo, hi, step = i.indices(len(self))
            if step != 1:
                return [self[k] for k in range(lo, hi, step)]
            out: list[dict] = []
            for k in range(len(self.parts)):
                a, b = max(lo, self.starts[k]), min(hi, self.starts[k + 1])
                if a < b:
                    out += self._read(k, int(a - self.starts[k]), int(b - self.starts[k]))
            return out
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self._read(k, int(i - self.starts[k]), int(i - self.starts[k] + 1))[0]

    def __iter__(self):
        for lo in range(0, len(self), 1000):
            yield from self[lo : lo + 1000]


def _row_origin(paths: list[str], field: str, i: int) -> tuple[str, int]:
    """The file and row within it of row ``i`` of the files loaded together (loaded again one by one: error path)."""
    for path in paths[:-1]:
        n = len(load_table([path], field))
        if i < n:
            return path, i
        i -= n
    return paths[-1], i


def check_texts(rows: TableRows, files: list[str], field: str, texts: tuple[str, ...]) -> None:
    """A value of a text field (``texts``) that is not a string is one error naming the file, row and column, as
    pretraining refuses one: ``{"source": {"a": 1}}`` trained on the prompt "{'a': 1} =>", and a number loses its
    form in a JSON column (1 and 2.5 read 1.0 and 2.5). A csv cell is text whatever it reads as, so csv files pass.
    Checked on the Arrow columns, never row by row: a string column costs nothing."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from gptkit.corpus import _json_type

    paths = resolve_files(files, field)
    if Path(paths[0]).suffix.lower() == ".csv":
        return
    for name in texts:
        column = rows.present.get(name)
        col = rows.table.data.column(column) if column else None
        kind = col.type.value_type if col is not None and pa.types.is_dictionary(col.type) else getattr(col, "type", None)
        if kind is None or pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view":
            continue
        if isinstance(col.type, pa.BaseExtensionType):  # values of several JSON types: each cell as its JSON text
            cells = pa.chunked_array([c.storage for c in col.chunks], col.type.storage_type)
            bad = pc.fill_null(pc.invert(pc.or_(pc.starts_with(cells, '"'), pc.equal(cells, "null"))), False)
        else:
            bad = pc.is_valid(col)
        if pc.any(bad).as_py():
            i = int(pc.index(bad, True).as_py())
            path, k = _row_origin(paths, field, i)
            raise UserError(f"{field}: {path}: row {k} (from 0): column '{column}': expected a string, got "
                            f"{_json_type(rows[i][name])}")
