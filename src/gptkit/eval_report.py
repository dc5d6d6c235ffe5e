"""The files of a `gptkit eval`: reading examples, predictions and references, scoring them, and the output folder.

Reading: JSONL (with line-precise errors) or csv/json/parquet rows, renamed to a task's fields (``--columns``), and
predictions paired with references by id or by line. Scoring: corpus figures with their signatures, one sentence
score per example and optional bootstrap 95% CIs. The output folder: ``eval.json`` (what it evaluates; checked
before reuse), ``predictions.jsonl`` (appended batch by batch, its complete prefix kept on ``--resume``), then
``metrics.json`` and ``report.md``; :func:`table` is what ``gptkit eval`` prints. :mod:`gptkit.evaluate` decides
what to run; nothing here imports torch.
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Iterator
from pathlib import Path

from gptkit import metrics
from gptkit.checkpoint import sha256
from gptkit.errors import UserError

REFERENCE = {"translate": "target", "summarize": "summary", "qa": "answers", "classify": "label"}
INPUTS = {"translate": ("source",), "summarize": ("document",), "qa": ("context", "question"), "classify": ("text",)}
STRUCTURED = ("answers",)  # qa's gold: {"text": [...], ...} or a list, checked by reference_of
SENTENCE = {"translate": "sentence_bleu", "summarize": "rougeL", "qa": "f1", "classify": "accuracy"}


# ------------------------------------------------------------------------------------------ reading
def file_hashes(paths: list[Path]) -> dict[str, str]:
    """{path: sha256} of input files, as eval.json and metrics.json record them."""
    return {str(p): sha256(p) for p in paths}


def read_text(path: Path, what: str) -> str:
    """A whole UTF-8 file; a bad byte is reported with its line number."""
    return read_head(path, what, -1)


def read_head(path: Path, what: str, size: int) -> str:
    """The first ``size`` bytes (-1: all) of a UTF-8 file as text (a character the cut splits is left out); nothing
    after them is read. A bad byte is reported with its line number."""
    if not path.is_file():
        raise UserError(f"{what}: {path} {'is a directory, not a file' if path.is_dir() else 'not found'}")
    with open(path, "rb") as fh:
        raw = fh.read(size)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if len(raw) == size and e.start >= size - 3 and e.reason == "unexpected end of data":
            return raw[: e.start].decode("utf-8")
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{what}: {path}: line {line}: not valid UTF-8 text") from None


def read_rows(path: Path, what: str) -> Iterator[dict]:
    """Rows with their line number, read as they are consumed (stopping early reads no further): JSONL read here
    line by line (precise errors), csv/json/parquet via data.load_table (memory-mapped Arrow)."""
    if path.suffix.lower() in (".csv", ".json", ".parquet") and path.is_file():
        from gptkit import data as data_mod

        table = data_mod.load_table(data_mod.resolve_files([str(path)], what), what)
        yield from ({**row, "_line": i + 1 + (path.suffix.lower() == ".csv")} for i, row in enumerate(table))
        return
    if not path.is_file():
        raise UserError(f"{what}: {path} {'is a directory, not a file' if path.is_dir() else 'not found'}")
    empty = True
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{what}: {path}: line {n}: not valid UTF-8 text") from None
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError as e:
                raise UserError(f"{what}: {path}: line {n}: invalid JSON ({e.msg}); expected one object per line"
                                ) from None
            if row is not None and not isinstance(row, dict):
                raise UserError(f"{what}: {path}: line {n}: expected a JSON object, got {type(row).__name__}")
            if row is not None:
                empty = False
                yield {**row, "_line": n}
    if empty:
        raise UserError(f"{what}: {path} is empty")


def parse_columns(items: list[str]) -> dict[str, str]:
    pairs = [part.partition("=") for item in items for part in item.split(",") if part]
    bad = [a + s + b for a, s, b in pairs if not (a.strip() and s and b.strip())]
    if bad:
        raise UserError(f"--columns: '{bad[0]}' should be field=column, e.g. source=de")
    return {a.strip(): b.strip() for a, _, b in pairs}


def read_fields(path: Path, what: str, fields: tuple, optional: tuple = (), cols: dict | None = None,
                hint: str = "map them with --columns field=column") -> list[dict]:
    """A file's rows renamed to task fields (``id`` kept); a row missing a field is named, with the fields it has
    and ``hint`` (the command's own way of naming columns); so is one whose field is null, a list or an object."""
    return list(iter_fields(path, what, fields, optional, cols, hint))


def iter_fields(path: Path, what: str, fields: tuple, optional: tuple = (), cols: dict | None = None,
                hint: str = "map them with --columns field=column") -> Iterator[dict]:
    """:func:`read_fields`, one row at a time: a reader that stops early (``--limit``) reads no further."""
    cols = cols or {}
    for row in read_rows(path, what):
        missing = [repr(cols.get(f, f)) for f in fields if cols.get(f, f) not in row]
        if missing:
            raise UserError(f"{what}: {path}: line {row['_line']}: no field {', '.join(missing)}; fields found: "
                            f"{sorted(k for k in row if k != '_line')} ({hint})")
        for f in fields:  # fine-tuning refuses such rows too: a null is not the text "None", nor a class
            value = row[cols.get(f, f)]
            if value is None or isinstance(value, (dict, list)) and f not in STRUCTURED:
                got = "null" if value is None else "a list" if isinstance(value, list) else "an object"
                raise UserError(f"{what}: {path}: line {row['_line']}: field {cols.get(f, f)!r} is {got}; expected "
                                "a string or a number")
        yield {**{f: row[cols.get(f, f)] for f in (*fields, *optional, "id") if cols.get(f, f) in row},
               "_line": row["_line"]}


def reference_of(task: str, row: dict, where: str):
    """The gold of one row: a string; a label as a string; qa: the answers list (SQuAD's {"text": [...]} too)."""
    value = row[REFERENCE[task]]
    if task == "classify":
        return str(value)
    texts = value.get("text") if task == "qa" and isinstance(value, dict) else value
    texts = [texts] if task == "qa" and isinstance(texts, str) else texts
    if task == "qa" and isinstance(texts, list) and all(isinstance(t, str) for t in texts):
        return texts  # [] : no answer (SQuAD v2)
    if task != "qa" and isinstance(value, str):
        return value
    raise UserError(f"{where}: {REFERENCE[task]} must be " + ("{\"text\": [...]} or a list of strings ([]: no answer)"
                                                                 if task == "qa" else "a string") + f", got {value!r}")


def pair(preds: list[dict], refs: list[dict], ppath: Path, rpath: Path) -> list[tuple[dict, dict]]:
    """Match by id when both files carry ids (every line then needs a unique one), else by line order."""
    if not (any("id" in r for r in preds) and any("id" in r for r in refs)):
        if len(preds) != len(refs):
            raise UserError(f"{ppath} has {len(preds)} predictions but {rpath} has {len(refs)} references; "
                            "they pair up by line (or give both an id field)")
        return list(zip(preds, refs))
    index = []
    for rows, path in ((preds, ppath), (refs, rpath)):
        if any("id" not in r for r in rows):
            raise UserError(f"{path}: line(s) {[r['_line'] for r in rows if 'id' not in r][:5]} have no id "
                            "while other lines do; give every line an id")
        ids = [str(r["id"]) for r in rows]
        if len(set(ids)) < len(ids):
            raise UserError(f"{path}: duplicate id(s) {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
        index.append(dict(zip(ids, rows)))
    p, r = index
    if p.keys() != r.keys():
        raise UserError(f"ids do not match: in {ppath.name} only: {[i for i in p if i not in r][:5]}; "
                        f"in {rpath.name} only: {[i for i in r if i not in p][:5]}")
    return [(p[i], r[i]) for i in r]


# ------------------------------------------------------------------------------------------ scoring
def per_example(task: str, preds: list, refs: list, rouge_tokenizer: str = "default", no_answer: bool = False
                ) -> dict[str, list[float]]:
    """Sentence-level scores x 100 (sentence BLEU, ROUGE, SQuAD, correct); mean-based corpus figures are their mean."""
    if task == "translate":
        from sacrebleu.metrics import BLEU

        sent = BLEU(effective_order=True)
        return {"sentence_bleu": [sent.sentence_score(p, [r]).score for p, r in zip(preds, refs)]}
    if task == "summarize":
        return metrics.rouge_per_example(preds, refs, tokenizer=rouge_tokenizer)
    if task == "qa":
        return metrics.squad_per_example(preds, refs, v2=no_answer)
    return {"accuracy": [100.0 * (p == r) for p, r in zip(preds, refs)]}


def _corpus_ci(metric, preds: list[str], refs: list, n: int, seed: int) -> tuple[float, float]:
    """bootstrap_ci of corpus BLEU/chrF, resampling sacrebleu's per-sentence statistics (same numbers, faster)."""
    import numpy as np

    stats = np.array(metrics.sufficient_stats(metric, preds, metrics._ref_streams(refs, "bootstrap")))
    idx = list(range(len(preds)))
    return metrics.bootstrap_ci(lambda i, _: metric._compute_score_from_stats(stats[i].sum(0).tolist()).score,
                                idx, idx, n=n, seed=seed)


def score(task: str, preds: list, refs: list, bootstrap: int = 0, seed: int = 0, rouge_tokenizer: str = "default",
          no_answer: bool = False) -> dict:
    """Corpus figures (:func:`gptkit.metrics.task_scores`, as fine-tuning reports them), signatures, details,
    optional 95% CIs and one sentence score per example. ``no_answer``: qa scored by SQuAD v2's rules whatever the
    rows hold (a model taught to abstain)."""
    from importlib.metadata import version

    detail, signatures = {}, {}
    if task == "translate":  # scored once: task_scores keeps only bleu and chrf of the same call
        full = metrics.translation_scores(preds, refs)
        figures = {k: full[k] for k in metrics.TASK_METRICS[task]}
        signatures = {"bleu": full["bleu_signature"], "chrf": full["chrf_signature"]}
        detail = {k: full[k] for k in ("precisions", "brevity_penalty", "sys_len", "ref_len")}
    elif task != "summarize":  # (task_scores checks the inputs first)
        figures = metrics.task_scores(task, preds, refs, rouge_tokenizer=rouge_tokenizer, no_answer=no_answer)
    each, cis = per_example(task, preds, refs, rouge_tokenizer, no_answer), {}
    if task == "summarize":  # metrics.rouge is the mean of the per-example scores: not computed twice
        figures = {k: sum(each[k]) / len(each[k]) for k in metrics.ROUGE_TYPES}
        signatures = {"rouge": f"rouge_score {version('rouge-score')}, use_stemmer=True, tokenizer {rouge_tokenizer}, "
                               "rougeLsum over split_sentences (rule-based), mean F-measure x 100"}
    elif task == "qa":
        signatures = {"squad": "SQuAD v2.0 official script (\"\" answers a question without one)"
                      if no_answer or metrics.no_answer_data(refs) else "SQuAD v1.1 official normalisation"}
    elif task == "classify":
        detail = {"per_class": metrics.classification_scores(preds, refs)["per_class"],
                  "macro_average": "over the labels present in the references or the predictions (scikit-learn's)"}
    if bootstrap:
        from sacrebleu.metrics import BLEU, CHRF

        cis = {k: metrics.bootstrap_ci(lambda p, _: sum(p) / len(p), v, v, n=bootstrap, seed=seed)
               for k, v in each.items() if k in figures}
        if task == "translate":
            cis = {name: _corpus_ci(m, preds, refs, bootstrap, seed) for name, m in (("bleu", BLEU()), ("chrf", CHRF()))}
    return {"metrics": figures, "signatures": signatures, "details": detail, "ci95": cis,
            "sentence_metric": SENTENCE[task], "sentence": each[SENTENCE[task]]}


# ------------------------------------------------------------------------------------------ outputs
def prepare_out(out: Path, identity: dict, resume: bool, keep: int) -> list[dict]:
    """Refuse a folder holding anything but an evaluation of the same thing; return the predictions kept."""
    from gptkit.rundir import refuse_system

    refuse_system(out, "--out")
    manifest, preds = out / "eval.json", out / "predictions.jsonl"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} exists and is not a directory")
    busy = out.is_dir() and any(out.iterdir())
    if busy and not manifest.is_file():
        raise UserError(f"--out: {out} is not empty and holds no gptkit evaluation; choose another directory")
    old = _manifest(manifest) if busy else identity
    differs = sorted(k for k in {*old, *identity} if old.get(k) != identity.get(k))
    if differs:
        raise UserError(f"--out: {out} holds an evaluation of something else (differs in {', '.join(differs)}); "
                        "choose another --out")
    if resume and not busy:
        raise UserError(f"--resume: {out} holds no evaluation to resume")
    kept = []  # the complete, in-order prefix of the predictions written (a torn last line is dropped)
    for line in preds.read_text(encoding="utf-8", errors="replace").split("\n") if resume and preds.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(row, dict) or row.get("index") != len(kept) or len(kept) >= keep:
            break
        kept.append(row)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.json", "report.md", "predictions.jsonl.tmp"):
        (out / name).unlink(missing_ok=True)
    if keep:  # the kept prefix replaces the file atomically: a crash now loses nothing
        append(out / "predictions.jsonl.tmp", kept)
        os.replace(out / "predictions.jsonl.tmp", preds)
    else:
        preds.unlink(missing_ok=True)
    manifest.with_suffix(".json.tmp").write_text(json.dumps({"identity": identity}, indent=1))
    os.replace(manifest.with_suffix(".json.tmp"), manifest)  # never torn: a crash leaves the old one or the new
    return kept


def _manifest(path: Path) -> dict:
    """The identity an eval.json records; anything else (torn, edited, not ours) is one line, not a traceback."""
    try:
        identity = json.loads(path.read_text(encoding="utf-8")).get("identity")
    except (OSError, ValueError, AttributeError):  # ValueError: bad JSON or UTF-8; AttributeError: not an object
        identity = None
    if not isinstance(identity, dict):
        raise UserError(f"--out: {path} is not a gptkit evaluation manifest; choose another --out")
    return identity


def append(path: Path, records: list[dict]) -> None:
    """Append one batch of predictions and make it durable before the next batch starts."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        fh.flush()
        os.fsync(fh.fileno())


def _ci(result: dict, key: str) -> str:
    lo_hi = result.get("ci95", {}).get(key)
    return f"[{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi else ""


def table(result: dict) -> str:
    head = f"{result['task']}: " + ", ".join(f"{v} {k}" for k, v in result["counts"].items())
    width = max([16, *map(len, result["metrics"])])
    return "\n".join([head, *(f"  {k:<{width}}{v:>10.4f}  {_ci(result, k)}".rstrip()
                             for k, v in result["metrics"].items())])


def _cell(value) -> str:
    text = (" | ".join(value) if isinstance(value, list) else str(value)).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= 200 else text[:197] + "..."


def write_outputs(out: Path, result: dict, examples: list[dict]) -> None:
    """metrics.json, then report.md: the table, signatures, the 5 best and 5 worst examples."""
    (out / "metrics.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    lines = [f"# gptkit eval: {result['task']}", "", f"model: `{result.get('model', {}).get('path', '-')}`  ",
             f"data: `{', '.join(result['data'])}`  ", table(result).split("\n")[0], "",
             "| metric | value | 95% CI |", "|---|---:|---|"]
    lines += [f"| {k} | {v:.4f} | {_ci(result, k)} |" for k, v in result["metrics"].items()]
    lines += [f"\n{k}: `{v}`" for k, v in result.get("signatures", {}).items()]
    shown = min(5, len(examples))
    for title, sign in (("best", -1), ("worst", 1)) if examples else ():
        lines += ["", f"## {shown} {title} (by {result['sentence_metric']})", "",
                  "| # | score | input | reference | prediction |", "|---:|---:|---|---|---|"]
        lines += [f"| {e['index']} | {e['score']:.2f} | {_cell(e['input'])} | {_cell(e['reference'])} | "
                  f"{_cell(e['prediction'])} |" for e in heapq.nsmallest(shown, examples,
                                                                          key=lambda e: (sign * e["score"], e["index"]))]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def finish(out: Path, base: dict, task: str, rows: list[dict], preds: list, refs: list, bootstrap: int,
           seed: int, rouge_tokenizer: str = "default", extra: list = (), no_answer: bool = False) -> dict:
    """Score (with the user's evaluate modules ``extra``), then write metrics.json and report.md; return what
    metrics.json holds."""
    from gptkit import user_metrics

    scored = score(task, preds, refs, bootstrap, seed, rouge_tokenizer, no_answer)
    if extra:
        scored["metrics"].update(user_metrics.compute(list(extra), preds, refs, taken=set(scored["metrics"])))
        scored["extra_metrics"] = [m.record() for m in extra]
    result = {"task": task, **base, **scored, "counts": {"examples": len(preds)}, "out": str(out)}
    examples = [{"index": i, "score": s, "prediction": p, "reference": r,
                 "input": " / ".join(str(row[f]) for f in INPUTS[task] if f in row)}
                for i, (s, p, r, row) in enumerate(zip(result.pop("sentence"), preds, refs, rows))]
    write_outputs(out, result, examples)
    return result

