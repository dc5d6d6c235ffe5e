"""`gptkit eval`: score a model, or existing predictions, on a task; write metrics, predictions and a report.

Ways in: ``--predictions P --references R`` (no model); ``--model DIR`` with ``--data FILE`` (or, for a gptkit run,
its recipe's split); a recipe: its ``output.dir`` run (``best/`` when kept, as finetune's test scores), else its
``model.init_from``, on ``data.test_files``, else ``data.val_files``. ``--task lm``: sliding-window perplexity.
Predictions are appended to ``predictions.jsonl`` and flushed batch by batch, so ``--resume`` continues after the
last one written. ``eval.json``, written first, says what an output folder evaluates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gptkit import generation, metrics
from gptkit.errors import UserError

log = logging.getLogger(__name__)

TASKS = ("translate", "summarize", "qa", "classify", "lm")
REFERENCE = {"translate": "target", "summarize": "summary", "qa": "answers", "classify": "label"}
INPUTS = {"translate": ("source",), "summarize": ("document",), "qa": ("context", "question"), "classify": ("text",)}
CLASSIFY_PROMPT = "{text}\nLabel:"  # classify with a causal LM: which " <label>" is likeliest after it
SENTENCE = {"translate": "sentence_bleu", "summarize": "rougeL", "qa": "f1", "classify": "accuracy"}


@dataclass
class Options:
    task: str | None = None
    model: str | None = None
    data: str | None = None
    split: str | None = None
    predictions: str | None = None
    references: str | None = None
    out: str | None = None
    batch_size: int = 16
    num_beams: int | None = None
    max_new_tokens: int | None = None
    limit: int | None = None
    columns: list[str] = field(default_factory=list)
    stride: int | None = None
    resume: bool = False
    bootstrap: int = 0
    few_shot: int = 0
    train: str | None = None
    seed: int = 0


# ------------------------------------------------------------------------------------------ reading
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_text(path: Path, what: str) -> str:
    """A whole UTF-8 file; a bad byte is reported with its line number."""
    if not path.is_file():
        raise UserError(f"{what}: {path} not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{what}: {path}: line {line}: not valid UTF-8 text") from None


def read_rows(path: Path, what: str) -> list[dict]:
    """Rows with their line number: JSONL read here (precise errors), csv/json/parquet via data.load_table."""
    if path.suffix.lower() in (".csv", ".json", ".parquet") and path.is_file():
        from gptkit import data as data_mod

        table = data_mod.load_table(data_mod.resolve_files([str(path)], what), what)
        return [{**row, "_line": i + 1 + (path.suffix.lower() == ".csv")} for i, row in enumerate(table)]
    rows = []
    for n, line in enumerate(read_text(path, what).splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            raise UserError(f"{what}: {path}: line {n}: invalid JSON ({e.msg}); expected one object per line") from None
        if row is not None and not isinstance(row, dict):
            raise UserError(f"{what}: {path}: line {n}: expected a JSON object, got {type(row).__name__}")
        rows += [{**row, "_line": n}] if row is not None else []
    if not rows:
        raise UserError(f"{what}: {path} is empty")
    return rows


def parse_columns(items: list[str]) -> dict[str, str]:
    pairs = [part.partition("=") for item in items for part in item.split(",") if part]
    bad = [a + s + b for a, s, b in pairs if not (a.strip() and s and b.strip())]
    if bad:
        raise UserError(f"--columns: '{bad[0]}' should be field=column, e.g. source=de")
    return {a.strip(): b.strip() for a, _, b in pairs}


def map_fields(rows: list[dict], fields: tuple, optional: tuple, cols: dict, what: str, path: Path) -> list[dict]:
    """Rows renamed to task fields (``id`` kept); a row missing a field is named, with the fields it has."""
    out = []
    for row in rows:
        missing = [repr(cols.get(f, f)) for f in fields if cols.get(f, f) not in row]
        if missing:
            raise UserError(f"{what}: {path}: line {row['_line']}: no field {', '.join(missing)}; fields found: "
                            f"{sorted(k for k in row if k != '_line')} (map them with --columns field=column)")
        out.append({**{f: row[cols.get(f, f)] for f in (*fields, *optional, "id") if cols.get(f, f) in row},
                    "_line": row["_line"]})
    return out


def reference_of(task: str, row: dict, where: str):
    """The gold of one row: a string; a label as a string; qa: the answers list (SQuAD's {"text": [...]} too)."""
    value = row[REFERENCE[task]]
    if task == "classify":
        return str(value)
    texts = value.get("text") if task == "qa" and isinstance(value, dict) else value
    texts = [texts] if task == "qa" and isinstance(texts, str) else texts
    if task == "qa" and isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts):
        return texts
    if task != "qa" and isinstance(value, str):
        return value
    raise UserError(f"{where}: {REFERENCE[task]} must be " + ("{\"text\": [...]} or a non-empty list of strings"
                                                                 if task == "qa" else "a string") + f", got {value!r}")


# ------------------------------------------------------------------------------------------ scoring
def per_example(task: str, preds: list, refs: list) -> dict[str, list[float]]:
    """Sentence-level scores x 100 (sentence BLEU, ROUGE, SQuAD, correct); mean-based corpus figures are their mean."""
    if task == "translate":
        from sacrebleu.metrics import BLEU

        sent = BLEU(effective_order=True)
        return {"sentence_bleu": [sent.sentence_score(p, [r]).score for p, r in zip(preds, refs)]}
    if task == "summarize":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), use_stemmer=True)
        scores = [scorer.score(r, p) for p, r in zip(preds, refs)]
        return {k: [100 * s[k].fmeasure for s in scores] for k in metrics.ROUGE_TYPES}
    if task == "qa":
        return {name: [100 * max(fn(p, g) for g in gs) for p, gs in zip(preds, refs)]
                for name, fn in (("exact_match", metrics.exact_match), ("f1", metrics.f1))}
    return {"accuracy": [100.0 * (p == r) for p, r in zip(preds, refs)]}


def _corpus_ci(metric, preds: list[str], refs: list, n: int, seed: int) -> tuple[float, float]:
    """bootstrap_ci of corpus BLEU/chrF, resampling sacrebleu's per-sentence statistics (same numbers, faster)."""
    import numpy as np

    stats = np.array(metric._extract_corpus_statistics(preds, metrics._ref_streams(refs, "bootstrap")))
    idx = list(range(len(preds)))
    return metrics.bootstrap_ci(lambda i, _: metric._compute_score_from_stats(stats[i].sum(0).tolist()).score,
                                idx, idx, n=n, seed=seed)


def score(task: str, preds: list, refs: list, bootstrap: int = 0, seed: int = 0) -> dict:
    """Corpus figures, signatures, details, optional 95% CIs and one sentence score per example."""
    from importlib.metadata import version

    detail, signatures = {}, {}
    if task == "translate":
        full = metrics.translation_scores(preds, refs)
        figures = {"bleu": full["bleu"], "chrf": full["chrf"]}
        signatures = {"bleu": full["bleu_signature"], "chrf": full["chrf_signature"]}
        detail = {k: full[k] for k in ("precisions", "brevity_penalty", "sys_len", "ref_len")}
    elif task == "summarize":
        figures = metrics.rouge(preds, refs)
        signatures = {"rouge": f"rouge_score {version('rouge-score')}, use_stemmer=True, mean F-measure x 100"}
    elif task == "qa":
        figures, signatures = metrics.squad_scores(preds, refs), {"squad": "SQuAD v1.1 official normalisation"}
    else:
        full = metrics.classification_scores(preds, refs)
        figures, detail = {"accuracy": full["accuracy"], "macro_f1": full["macro_f1"]}, {"per_class": full["per_class"]}
    each, cis = per_example(task, preds, refs), {}
    if bootstrap:
        from sacrebleu.metrics import BLEU, CHRF

        cis = {k: metrics.bootstrap_ci(lambda p, _: sum(p) / len(p), v, v, n=bootstrap, seed=seed)
               for k, v in each.items() if k in figures}
        if task == "translate":
            cis = {name: _corpus_ci(m, preds, refs, bootstrap, seed) for name, m in (("bleu", BLEU()), ("chrf", CHRF()))}
    return {"metrics": figures, "signatures": signatures, "details": detail, "ci95": cis,
            "sentence_metric": SENTENCE[task], "sentence": each[SENTENCE[task]]}


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


# ------------------------------------------------------------------------------------------ outputs
def prepare_out(out: Path, identity: dict, resume: bool, keep: int) -> list[dict]:
    """Refuse a folder holding anything but an evaluation of the same thing; return the predictions kept."""
    manifest, preds = out / "eval.json", out / "predictions.jsonl"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} exists and is not a directory")
    busy = out.is_dir() and any(out.iterdir())
    if busy and not manifest.is_file():
        raise UserError(f"--out: {out} is not empty and holds no gptkit evaluation; choose another directory")
    old = json.loads(manifest.read_text()).get("identity", {}) if busy else identity
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
    manifest.write_text(json.dumps({"identity": identity}, indent=1))
    return kept


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
    return "\n".join([head, *(f"  {k:<16}{v:>10.4f}  {_ci(result, k)}".rstrip() for k, v in result["metrics"].items())])


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
    for title, sign in (("5 best", -1), ("5 worst", 1)) if examples else ():
        lines += ["", f"## {title} (by {result['sentence_metric']})", "",
                  "| # | score | input | reference | prediction |", "|---:|---:|---|---|---|"]
        lines += [f"| {e['index']} | {e['score']:.2f} | {_cell(e['input'])} | {_cell(e['reference'])} | "
                  f"{_cell(e['prediction'])} |" for e in sorted(examples, key=lambda e: (sign * e["score"], e["index"]))[:5]]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def finish(out: Path, base: dict, task: str, rows: list[dict], preds: list, refs: list, opts: Options) -> dict:
    scored = score(task, preds, refs, opts.bootstrap, opts.seed)
    result = {"task": task, **base, **scored, "counts": {"examples": len(preds)}, "out": str(out)}
    examples = [{"index": i, "score": s, "prediction": p, "reference": r,
                 "input": " / ".join(str(row[f]) for f in INPUTS[task] if f in row)}
                for i, (s, p, r, row) in enumerate(zip(result.pop("sentence"), preds, refs, rows))]
    write_outputs(out, result, examples)
    return result


def run_predictions(opts: Options, task: str) -> dict:
    """Score a predictions file against a references file; no model is loaded."""
    if not (opts.predictions and opts.references) or opts.model or opts.data or opts.resume or task == "lm":
        raise UserError("eval: --predictions and --references go together, for a text task, without --model/--data")
    ppath, rpath, cols = Path(opts.predictions), Path(opts.references), parse_columns(opts.columns)
    preds = map_fields(read_rows(ppath, "--predictions"), ("prediction",), (), {}, "--predictions", ppath)
    refs = map_fields(read_rows(rpath, "--references"), (REFERENCE[task],), INPUTS[task], cols, "--references", rpath)
    pairs = pair(preds, refs, ppath, rpath)
    bad = [p["_line"] for p, _ in pairs if not isinstance(p["prediction"], (str, int)) or p["prediction"] is True]
    if bad:
        raise UserError(f"--predictions: {ppath}: line {bad[0]}: prediction must be a string")
    gold = [reference_of(task, r, f"--references: {rpath}: line {r['_line']}") for _, r in pairs]
    data = {str(ppath): sha256(ppath), str(rpath): sha256(rpath)}
    out = Path(opts.out or f"eval-{task}")
    prepare_out(out, {"mode": "predictions", "task": task, "data": data, "columns": cols}, False, 0)
    base = {"mode": "predictions", "settings": {"columns": cols, "bootstrap": opts.bootstrap}, "data": data}
    return finish(out, base, task, [r for _, r in pairs], [str(p["prediction"]) for p, _ in pairs], gold, opts)


# ------------------------------------------------------------------------------------------- models
def _run_of(path: Path):
    """(recipe, run dir) of a gptkit run directory or of its best/ checkpoint; (None, path) otherwise."""
    from gptkit.recipe import load_recipe

    for home in (path, path.parent) if path.name == "best" else (path,):
        if (home / "recipe.yaml").is_file():
            return load_recipe(home / "recipe.yaml"), home
    return None, path


def load_model(raw: str, task: str):
    """(model, tokenizer, run recipe or None): a fine-tuned run (LoRA too) or any local causal-LM directory."""
    import torch
    from transformers import AutoTokenizer

    from gptkit import finetune
    from gptkit.tasks import FINETUNE_TASKS

    path = Path(raw).expanduser()
    if not path.is_dir():
        raise UserError(f"--model: {raw} is not a local directory; gptkit works offline and never downloads models")
    run, home = _run_of(path)
    if run is None or run.task not in FINETUNE_TASKS:
        model, tok = generation.load_for_generation(path)
    elif run.task != task and (run.task == "classify" or run.task == "qa" and run.finetune.qa_mode == "extractive"):
        raise UserError(f"--model: {path} has a {run.task} head (fine-tuned for {run.task}); it cannot do {task}")
    elif not any((home / f).is_file() for f in generation.TOKENIZER_FILES):
        raise UserError(f"--model: {home}: no tokenizer files (expected one of {', '.join(generation.TOKENIZER_FILES)})")
    else:
        try:
            tok = AutoTokenizer.from_pretrained(str(home), local_files_only=True)
            model = finetune.load_trained(path, run.task, run).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"--model: {path}: cannot load: {(str(e).strip().splitlines() or ['?'])[0]}") from None
        tok.pad_token = tok.pad_token or tok.eos_token
    return model.to("cuda") if torch.cuda.is_available() else model, tok, run


def fingerprint(path: Path) -> dict:
    """sha256 of what defines a model: weights, configs and tokenizer files (not logs, runs or eval outputs)."""
    files = {p.name: sha256(p) for p in sorted(Path(path).iterdir()) if p.is_file() and
             (p.suffix in (".safetensors", ".bin", ".model", ".txt") or p.name in generation.TOKENIZER_FILES or
              p.name.endswith(("config.json", "special_tokens_map.json")))}
    return {"path": str(path), "sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest(), "files": files}


@dataclass
class Ctx:
    task: str
    model: object
    tok: object
    recipe: object
    template: str
    decoding: generation.DecodingOptions
    labels: list[str] | None  # classify with a causal LM: the labels whose likelihood is compared
    shots: list[dict]
    few_shot: int
    seed: int


def prompt(ctx: Ctx, row: dict, index: int | None = None) -> str:
    """The task prompt, after K demonstrations drawn by a generator seeded with (seed, example index)."""
    from gptkit.tasks._generative import render

    demos = random.Random(f"{ctx.seed}-{index}").sample(ctx.shots, ctx.few_shot) if index is not None else []
    golds = [reference_of(ctx.task, d, "--train") for d in demos]
    return "".join(f"{prompt(ctx, d)} {g[0] if isinstance(g, list) else g}\n\n" for d, g in zip(demos, golds)) + \
        render(ctx.template, row, "prompt")


def label_scores(ctx: Ctx, prompts: list[str]) -> list[str]:
    """Per prompt, the label whose tokens (after a space) have the highest summed log-probability."""
    import torch

    from gptkit.modeling import context_length

    seqs, spans = [], []
    for p in prompts:
        for label in ctx.labels:
            tail = ctx.tok(" " + label, add_special_tokens=False)["input_ids"]
            seqs.append((ctx.tok(p)["input_ids"] + tail)[-context_length(ctx.model.config):])
            spans.append((len(seqs[-1]) - len(tail), tail))
    width, pad = max(map(len, seqs)), ctx.tok.pad_token_id or 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=ctx.model.device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=ctx.model.device)
    with torch.inference_mode():
        logp = ctx.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    totals = [sum(logp[j, s + k - 1, t].item() for k, t in enumerate(tail)) for j, (s, tail) in enumerate(spans)]
    n = len(ctx.labels)
    return [ctx.labels[max(range(n), key=lambda c: totals[i * n + c])] for i in range(len(prompts))]


def predict_batch(ctx: Ctx, rows: list[dict], start: int) -> list[str]:
    """One batch: the task module's predict (classifier head, span head, or generation through generate_batch);
    with a causal LM, classify by label likelihood; few-shot generates itself (cut at the first newline)."""
    from gptkit.tasks import classify, load

    if ctx.task == "classify":
        if ctx.labels is None:
            return classify.predict(ctx.model, ctx.tok, rows, ctx.recipe)
        return label_scores(ctx, [prompt(ctx, r, start + j) for j, r in enumerate(rows)])
    if not ctx.few_shot:
        return [str(p) for p in load(ctx.task).predict(ctx.model, ctx.tok, rows, ctx.recipe)]
    texts = generation.generate_batch(ctx.model, ctx.tok, [prompt(ctx, r, start + j) for j, r in enumerate(rows)],
                                      ctx.decoding, batch_size=len(rows))
    return [t[0].split("\n")[0].strip() for t in texts]


def make_ctx(opts: Options, task: str, model, tok, run, rows: list[dict], shots: list[dict]) -> Ctx:
    """The run's own recipe when it was trained for this task (prompt, decoding, qa_mode), else the task's
    defaults (qa: generative); --max-new-tokens and --num-beams win."""
    from gptkit.recipe import Recipe
    from gptkit.tasks import classify, load

    same = run is not None and run.task == task
    recipe = run if same else Recipe(task=task)
    ft = recipe.finetune.model_copy(update={"max_new_tokens": opts.max_new_tokens or recipe.finetune.max_new_tokens,
                                            "num_beams": opts.num_beams or recipe.finetune.num_beams,
                                            **({} if same or task != "qa" else {"qa_mode": "generative"})})
    recipe = recipe.model_copy(update={"finetune": ft})
    decoding = generation.DecodingOptions(max_new_tokens=ft.max_new_tokens, num_beams=ft.num_beams).validate()
    head = same and (task == "classify" or ft.qa_mode == "extractive" and task == "qa")  # load_model gave a head
    if head and opts.few_shot:
        raise UserError(f"--few-shot: {task} model has a task head; demonstrations need a causal LM")
    labels = classify.label_names(rows + shots) if task == "classify" and not same else None
    template = ft.prompt or (CLASSIFY_PROMPT if task == "classify" else load(task).PROMPT)
    return Ctx(task, model, tok, recipe, template, decoding, labels, shots, opts.few_shot, opts.seed)


# -------------------------------------------------------------------------------------- perplexity
def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window: each token after the first is scored once, with the
    longest left context the window allows (the Hugging Face strided-perplexity recipe)."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def sliding_nll(model, ids: list[int], context: int, stride: int, batch_size: int) -> tuple[float, int, int]:
    """(summed NLL in nats, tokens scored, windows); windows of equal length run batch_size at a time."""
    import torch

    groups: list[list] = []
    for w in windows(len(ids), context, stride):
        same = groups and len(groups[-1]) < batch_size and groups[-1][0][1] - groups[-1][0][0] == w[1] - w[0]
        groups[-1].append(w) if same else groups.append([w])
    total, count = 0.0, 0
    with torch.inference_mode():
        for group in groups:
            x = torch.tensor([ids[b:e] for b, e, _ in group], device=model.device)
            logp = model(input_ids=x).logits.float().log_softmax(-1)
            for j, (b, e, first) in enumerate(group):
                total -= logp[j, first - b - 1 : e - b - 1].gather(-1, x[j, first - b : e - b, None]).sum().item()
                count += e - first
    return total, count, sum(map(len, groups))


def run_lm(opts: Options, model_path: str, data: list[Path], out: Path) -> dict:
    from gptkit.modeling import context_length

    text = "\n\n".join(read_text(p, "--data") for p in data)
    model, tok, _ = load_model(model_path, "lm")
    ids, context = tok(text)["input_ids"], context_length(model.config)
    stride = opts.stride or max(1, context // 2)
    if len(ids) < 2 or not 1 <= stride <= context:
        raise UserError(f"--data has {len(ids)} tokens (need >= 2)" if len(ids) < 2 else
                        f"--stride must be in [1, {context}] (the model's context), got {stride}")
    model_fp, data_fp = fingerprint(Path(model_path)), {str(p): sha256(p) for p in data}
    prepare_out(out, {"mode": "lm", "model": model_fp["sha256"], "data": data_fp, "stride": stride}, False, 0)
    started = time.time()
    nll, n, n_windows = sliding_nll(model, ids, context, stride, opts.batch_size)
    result = {"task": "lm", "mode": "lm", "metrics": {"perplexity": metrics.perplexity_from_nll(nll, n),
                                                      "nll_per_token": nll / n, "bits_per_token": nll / n / math.log(2)},
              "signatures": {"perplexity": f"sliding window: context {context}, stride {stride}, all tokens but the first"},
              "counts": {"tokens": len(ids), "scored": n, "windows": n_windows}, "out": str(out),
              "settings": {"context": context, "stride": stride, "batch_size": opts.batch_size,
                           "seconds": round(time.time() - started, 3)},
              "model": model_fp, "data": data_fp}
    write_outputs(out, result, [])
    return result


def run_model(opts: Options, task: str, model_path: str, data: list[Path], out: Path, columns: dict) -> dict:
    """Predict batch by batch, appending each batch to predictions.jsonl, then score everything written."""
    model, tok, run = load_model(model_path, task)
    cols = {**(run.data.columns if run is not None and run.task == task else {}), **columns}
    fields, optional = (*INPUTS[task], REFERENCE[task]), ("text_pair",) if task == "classify" else ()
    every = [r for p in data for r in map_fields(read_rows(p, "--data"), fields, optional, cols, "--data", p)]
    rows = every[: opts.limit or None]
    refs = [reference_of(task, r, f"--data: line {r['_line']}") for r in rows]
    if opts.few_shot and not opts.train:
        raise UserError("--few-shot needs --train FILE to draw the demonstrations from")
    tp = Path(opts.train or "")
    shots = map_fields(read_rows(tp, "--train"), fields, optional, cols, "--train", tp) if opts.few_shot else []
    if len(shots) < opts.few_shot:
        raise UserError(f"--few-shot {opts.few_shot}: {tp} has only {len(shots)} examples")
    ctx = make_ctx(opts, task, model, tok, run, every, shots)  # labels: from all rows, whatever --limit
    model_fp = fingerprint(Path(model_path))
    identity = {"mode": "model", "task": task, "model": model_fp["sha256"], "data": {str(p): sha256(p) for p in data},
                "columns": cols, "template": ctx.template, "decoding": asdict(ctx.decoding), "labels": ctx.labels,
                "few_shot": opts.few_shot, "train": sha256(tp) if shots else None, "seed": opts.seed if shots else None}
    preds = [k["prediction"] for k in prepare_out(out, identity, opts.resume, len(rows))]
    started, resumed_at = time.time(), len(preds)
    for start in range(len(preds), len(rows), opts.batch_size):
        chunk = rows[start : start + opts.batch_size]
        new = predict_batch(ctx, chunk, start)
        append(out / "predictions.jsonl", [{"index": start + j, **({"id": r["id"]} if "id" in r else {}),
                                            "prediction": p, "reference": refs[start + j]}
                                           for j, (r, p) in enumerate(zip(chunk, new))])
        preds += new
        log.info("eval: %d/%d examples predicted", len(preds), len(rows))
    settings = {**{k: v for k, v in identity.items() if k not in ("mode", "task", "model", "data")},
                "batch_size": opts.batch_size, "limit": opts.limit, "resumed_at": resumed_at if opts.resume else None,
                "bootstrap": opts.bootstrap, "seconds": round(time.time() - started, 3)}
    base = {"mode": "model", "settings": settings, "model": model_fp, "data": identity["data"]}
    return finish(out, base, task, rows, preds, refs, opts)


# ------------------------------------------------------------------------------------------- entry
def _data(opts: Options, recipe) -> tuple[list[Path], str]:
    """--data, else the recipe's (or the run's) split: data.test_files, falling back to data.val_files."""
    from gptkit.data import resolve_files

    if opts.data and opts.split:
        raise UserError("--split picks a split of the recipe (test, validation, train); drop it when giving --data")
    if opts.data or recipe is None:
        if not opts.data:
            raise UserError("--data: give the file to evaluate on (or a recipe / run whose data.test_files to use)")
        return [Path(f) for f in resolve_files([opts.data], "--data")], ""
    fields = {"test": "test_files", "validation": "val_files", "train": "train_files"}
    split = opts.split or ("test" if recipe.data.test_files else "validation")
    if split not in fields or not getattr(recipe.data, fields[split]):
        raise UserError(f"--split: '{split}' is not one of {', '.join(fields)}" if split not in fields else
                        f"data.{fields[split]}: empty in the recipe; set it or pass --data FILE")
    return [Path(f) for f in resolve_files(getattr(recipe.data, fields[split]), f"data.{fields[split]}")], split


def _recipe_model(recipe) -> str:
    """A recipe's model: its output.dir run (best/ when kept), else model.init_from (the base checkpoint)."""
    from gptkit import rundir

    out = rundir.resolve_output(recipe.output.dir)
    if any((out / f).is_file() for f in ("config.json", "adapter_config.json")):
        return str(out / "best" if (out / "best").is_dir() else out)
    if not recipe.model.init_from:
        raise UserError(f"output.dir: {out} holds no trained model and model.init_from is not set; pass --model DIR")
    log.info("eval: %s holds no trained model; evaluating model.init_from %s", out, recipe.model.init_from)
    return recipe.model.init_from


def run(opts: Options, recipe=None) -> dict:
    """Resolve mode, task, model, data and output folder; evaluate; return what metrics.json holds."""
    model_path = opts.model or (_recipe_model(recipe) if recipe is not None and not opts.predictions else None)
    run_recipe, home = _run_of(Path(model_path).expanduser()) if model_path else (None, Path("."))
    if not (model_path or opts.predictions or opts.references):
        raise UserError("eval: pass --model DIR with --data FILE, a RECIPE, or --predictions with --references")
    source = recipe or run_recipe
    task = opts.task or (None if source is None else "lm" if source.task == "pretrain" else source.task)
    if task not in TASKS:
        raise UserError(f"--task: '{task}' is not an eval task; expected one of {', '.join(TASKS)}" if task else
                        "eval: --task is required (translate, summarize, qa, classify or lm)")
    if opts.batch_size < 1 or (opts.limit is not None and opts.limit < 1) or min(opts.bootstrap, opts.few_shot) < 0:
        raise UserError("--batch-size and --limit must be >= 1; --bootstrap and --few-shot >= 0")
    if opts.predictions or opts.references:
        return run_predictions(opts, task)
    data, split = _data(opts, source)
    out = Path(opts.out) if opts.out else home / f"eval-{task}{'-' + split if split not in ('', 'test') else ''}"
    log.info("eval: %s on %s (%s) -> %s", model_path, ", ".join(map(str, data)), task, out)
    if task == "lm":
        if opts.resume:
            raise UserError("--resume: perplexity has no predictions to resume; run it again")
        return run_lm(opts, model_path, data, out)
    columns = {**(recipe.data.columns if recipe is not None else {}), **parse_columns(opts.columns)}
    return run_model(opts, task, model_path, data, out, columns)
