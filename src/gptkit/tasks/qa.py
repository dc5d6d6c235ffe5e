"""qa: answer a question about a context; scored with SQuAD v1.1 exact match and F1 (v2.0 with unanswerable ones).

Rows have ``question``, ``context`` and ``answers`` = ``{"text": [...], "answer_start": [...]}`` (the SQuAD /
Hugging Face layout: character offsets into the context); ``id`` is optional. With ``finetune.no_answer`` (SQuAD
v2), ``answers`` may be empty lists: the question has no answer in the context, and the right answer is "".

- ``finetune.qa_mode: extractive`` (default): a start/end head on the language model picks a span of the
  context. "question + SEP + context" is cut into windows of ``finetune.max_length`` tokens that overlap by
  ``finetune.doc_stride`` (lowered for a row whose long question leaves less than twice that for the context:
  per row, so a row's windows never depend on the other rows of its batch or split); a training window that does not hold the first answer points at token 0 (as in
  Hugging Face's run_qa). A prediction is the best span over all windows of a row. With ``finetune.no_answer``
  each window ends in one more token, EOS, the no-answer position (BERT's CLS comes first; in a causal model only
  the last position has seen the question and the whole window): a window without the answer, or a question without
  one, points there, and a row answers "" when its windows' lowest no-answer score beats its best span's by more
  than ``finetune.null_score_diff_threshold`` (run_qa's rule).
- ``finetune.qa_mode: generative``: a causal LM trained on "prompt + first answer + EOS" with the loss on
  the answer only (:mod:`gptkit.tasks.generative`), evaluated by generating from the prompt; a question without an
  answer is trained to EOS right after the prompt.
"""

from __future__ import annotations

import logging

import torch

from gptkit import metrics, modeling
from gptkit.errors import UserError
from gptkit.tasks import generative as gen
from gptkit.tokenizer import all_cores

log = logging.getLogger(__name__)

FIELDS = ("question", "context", "answers")
OPTIONAL = ("id",)
TEXTS = ("question", "context")
METRIC = "val_f1"
PROMPT = "{context}\nQ: {question}\nA:"
SEP = "\n"  # ends the question, before the context (extractive)
_WHERE = {"train": "data.train_files", "validation": "data.val_files", "test": "data.test_files"}


def _extractive(recipe) -> bool:
    return recipe.finetune.qa_mode == "extractive"


def _template(recipe) -> str:
    return recipe.finetune.prompt or PROMPT


def check_answers(rows: list[dict], split: str, no_answer: bool = False) -> None:
    """Raise a one-line :class:`UserError` naming the row (counted from 0) unless every row's ``answers`` has
    at least one non-empty text (or, with ``no_answer``, none at all) and each text is found at its ``answer_start``
    in the context."""
    where = _WHERE.get(split, split)
    for i, row in enumerate(rows):
        ans = row["answers"]
        texts, starts = (ans.get("text"), ans.get("answer_start")) if isinstance(ans, dict) else (None, None)
        if isinstance(texts, list) and texts == [] and starts == [] and not no_answer:
            raise UserError(f"{where}: row {i} (from 0) has no answer (answers.text is []); set finetune.no_answer: "
                            "true to train on questions without an answer (SQuAD v2)")
        if not (isinstance(texts, list) and isinstance(starts, list) and len(texts) == len(starts)):
            raise UserError(f'{where}: row {i} (from 0): answers must be {{"text": [...], "answer_start": [...]}} '
                            f"with one start per text, got {str(ans)[:80]!r}")
        context = str(row["context"])
        for k, (text, start) in enumerate(zip(texts, starts)):
            ok = isinstance(text, str) and text != "" and isinstance(start, int) and start >= 0
            found = context[start : start + len(text)] if ok else None
            if found != text:
                raise UserError(f"{where}: row {i} (from 0): expected answers.text[{k}] {text!r} at character "
                                f"answers.answer_start[{k}]={start!r} of the context, found {found!r}")


def build_model(recipe, tokenizer, train_rows):
    """Extractive: the LM with a start/end span head (AutoModelForQuestionAnswering); generative: the causal LM."""
    if not _extractive(recipe):
        return gen.build_model(recipe, tokenizer, train_rows)
    from transformers import AutoModelForQuestionAnswering

    try:
        model = AutoModelForQuestionAnswering.from_pretrained(
            modeling.model_dir(recipe.model.init_from or "", "model.init_from"),
            **modeling.load_kwargs(recipe.model))
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        raise UserError(f"finetune.qa_mode: {recipe.model.init_from} has no question-answering head in transformers "
                        "(AutoModelForQuestionAnswering); use qa_mode: generative") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


class _Spans(gen.Examples):
    """Right-padded windows with the first answer's start/end token positions."""

    def batch(self, indices: list[int], epochs: list[int] | None = None) -> dict:
        out = super().batch(indices)
        del out["labels"]
        for key in ("start_positions", "end_positions"):
            out[key] = torch.tensor([self.rows[i][key] for i in indices])
        return out


def _limit(recipe, model) -> int:
    """The tokens of a window before its no-answer position (finetune.no_answer: the last of the model's)."""
    return min(recipe.finetune.max_length, modeling.context_length(model.config)) - int(recipe.finetune.no_answer)


def _windows_of(recipe, limit: int) -> str:
    """The windows as messages name them: ``limit`` tokens, and the no-answer EOS."""
    return f"{limit + 1}-token windows (the no-answer EOS included)" if recipe.finetune.no_answer else \
        f"{limit}-token windows"


def _null_id(tokenizer) -> int:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id


def _questions(tokenizer, rows: list[dict], limit: int) -> tuple[list[str], list[int], int]:
    """(each question + SEP, the question cut to half a window (as BERT's max_query_length) so the context fits;
    the tokens each has; how many were cut)."""
    texts = [str(r["question"]).strip() for r in rows]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    keep = max(1, limit // 2 - 1)
    long = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > keep]
    for i in long:
        texts[i] = texts[i][: enc["offset_mapping"][i][keep - 1][1]]
    texts = [t + SEP for t in texts]
    return texts, list(map(len, tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])), len(long)


def _stride(recipe, tokenizer, question: int, limit: int) -> int:
    """finetune.doc_stride, lowered to half the room a question of ``question`` tokens leaves for the context.
    Decided per row from its own question, so a row's windows (and its prediction) never depend on which rows
    share its batch or split: eval's batches of 16 and fine-tuning's whole test split answer alike."""
    room = limit - question - tokenizer.num_special_tokens_to_add(pair=True)
    if room < 2:
        raise UserError(f"finetune.max_length: {_windows_of(recipe, limit)} leave no room for the context "
                        f"after the question ({question} tokens) and special tokens; raise finetune.max_length")
    return min(recipe.finetune.doc_stride, room // 2)


def check_room(recipe, tokenizer, model) -> None:
    """Raise the "no room" error of :func:`_stride` before any row is read: a question cut to half a window (its
    longest) must leave the context two tokens."""
    if _extractive(recipe):
        limit = _limit(recipe, model)
        _stride(recipe, tokenizer, max(1, limit // 2 - 1) + len(tokenizer(SEP, add_special_tokens=False)["input_ids"]),
                limit)


def windows(recipe, tokenizer, rows: list[dict], limit: int, split: str, setup: tuple | None = None) -> list[dict]:
    """Tokenized windows of "question + SEP + context", at most ``limit`` tokens each, overlapping by the row's
    stride: ``input_ids``, ``offsets`` (character span in the context per token, None outside the context), ``row``.
    ``setup`` is :func:`window_setup` of the rows when it was computed already; rows sharing a stride are encoded
    together (the tokenizer takes one stride per call)."""
    if not rows:
        return []
    questions, strides = setup or window_setup(recipe, tokenizer, rows, limit, split)
    out = []
    for stride in sorted(set(strides)):
        idx = [i for i, s in enumerate(strides) if s == stride]
        enc = tokenizer([questions[i] for i in idx], [str(rows[i]["context"]) for i in idx],
                        truncation="only_second", max_length=limit, stride=stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True, verbose=False)
        null = [_null_id(tokenizer)] if recipe.finetune.no_answer else []  # the no-answer position, last
        for w, k in enumerate(enc["overflow_to_sample_mapping"]):
            seq = enc.sequence_ids(w)
            offsets = [tuple(o) if s == 1 and o[1] > o[0] else None for o, s in zip(enc["offset_mapping"][w], seq)]
            out.append({"input_ids": enc["input_ids"][w] + null, "offsets": offsets + [None] * len(null), "row": idx[k]})
    return sorted(out, key=lambda w: w["row"])  # stable: each row's windows stay in order


def window_setup(recipe, tokenizer, rows: list[dict], limit: int, split: str) -> tuple[list[str], list[int]]:
    """Each row's question + SEP and its stride (:func:`_stride`); the questions are encoded a chunk at a time."""
    questions, strides, cut = [], [], 0
    with all_cores():
        for lo in range(0, len(rows), gen.CHUNK):
            texts, lengths, n_cut = _questions(tokenizer, rows[lo : lo + gen.CHUNK], limit)
            questions += texts
            strides += [_stride(recipe, tokenizer, n, limit) for n in lengths]
            cut += n_cut
    lowered = sum(s < recipe.finetune.doc_stride for s in strides)
    if split != "predict" and cut:  # said once per split, not at every evaluation
        log.warning("%s: %d questions longer than %d tokens were cut (finetune.max_length)", split, cut,
                    max(1, limit // 2 - 1))
    if split != "predict" and lowered:
        log.warning("%s: finetune.doc_stride %d lowered for %d rows: with their question, %s leave "
                    "less than twice that for the context", split, recipe.finetune.doc_stride, lowered,
                    _windows_of(recipe, limit))
    return questions, strides


def _chunks(recipe, tokenizer, rows: list[dict], limit: int, split: str):
    """(the chunk's first row, the chunk, its windows) over the split: windows hold character offsets per token, far
    more than the ids, so only one chunk's exist at a time."""
    if not rows:
        return
    questions, strides = window_setup(recipe, tokenizer, rows, limit, split)
    lo = 0
    bar = ("spans", "predicting") if split == "predict" else (split, "tokenizing")
    for chunk in gen.in_chunks(rows, *bar, size=max(1, gen.CHUNK // 10)):  # a long context makes many windows
        yield lo, chunk, windows(recipe, tokenizer, chunk, limit, split, (questions[lo : lo + len(chunk)],
                                                                     strides[lo : lo + len(chunk)]))
        lo += len(chunk)


def answer_positions(window: dict, row: dict, no_answer: bool = False) -> tuple[int, int]:
    """Token positions of the row's first answer in the window; when it is not wholly inside (or the row has no
    answer), (0, 0), or with ``no_answer`` the window's no-answer position (its last)."""
    null = (len(window["input_ids"]) - 1,) * 2 if no_answer else (0, 0)
    if not row["answers"]["text"]:
        return null
    start = row["answers"]["answer_start"][0]
    end = start + len(row["answers"]["text"][0])
    ctx = [(k, o) for k, o in enumerate(window["offsets"]) if o is not None]
    if not ctx or ctx[0][1][0] > start or ctx[-1][1][1] < end:
        return null
    first = next(k for k, (_, b) in ctx if b > start)
    last = next(k for k, (a, _) in reversed(ctx) if a < end)
    return first, last


def preprocess(recipe, tokenizer, rows, split, model):
    """Checks the answers; extractive: windows with answer positions; generative: prompt + first answer + EOS."""
    check_answers(rows, split, recipe.finetune.no_answer)
    if not _extractive(recipe):
        from gptkit.data import Joined

        def target(row: dict, _) -> dict:  # as read; no answer: EOS right after the prompt
            texts = row["answers"]["text"]
            return {**row, "target": " " + texts[0] if texts else ""}

        targets = Joined([(rows, None)], target)
        return gen.preprocess(recipe, tokenizer, targets, split, template=_template(recipe), target="target",
                              shorten="context")
    no_answer, missing = recipe.finetune.no_answer, [0]

    def parts():
        for lo, chunk, wins in _chunks(recipe, tokenizer, rows, _limit(recipe, model), split):
            spans = [answer_positions(w, chunk[w["row"]], no_answer) for w in wins]
            missing[0] += sum(a == (len(w["input_ids"]) - 1 if no_answer else 0) for w, (a, _) in zip(wins, spans))
            yield gen.Rows([{"input_ids": w["input_ids"], "row": lo + w["row"], "start_positions": a,
                             "end_positions": b} for w, (a, b) in zip(wins, spans)])  # no offsets: training

    out = gen.Rows.concat(parts())
    log.info("%s: %d rows in %d windows, %d without an answer", split, len(rows), len(out), missing[0])
    return _Spans(out, tokenizer.pad_token_id)


def loss(model, batch: dict, per: str = "token", smoothing: float = 0.0) -> torch.Tensor:
    """The span head's loss summed over windows for extractive batches (they carry start_positions: the mean of
    the start and end cross-entropies, as transformers' QA heads compute it; ``smoothing``: label smoothing), else
    the answer-only LM loss (:func:`gptkit.tasks.generative.loss`). The softmax runs over the window's own
    positions, never its padding (transformers' heads include it, so a window's loss depended on its batch)."""
    if "start_positions" not in batch:
        return gen.loss(model, batch, per, smoothing)
    keys = ("start_positions", "end_positions")
    out = model(**{k: v for k, v in batch.items() if k not in keys})
    real = batch["attention_mask"].bool()
    total = 0.0
    for logits, key in zip((out.start_logits, out.end_logits), keys):
        n = logits.shape[1]  # positions past the window are ignored, as in transformers' heads
        target = batch[key].clamp(0, n)
        logp = logits.float().masked_fill(~real, float("-inf")).log_softmax(-1)
        nll = -logp.gather(1, target.clamp(max=n - 1)[:, None])[:, 0]
        uniform = -logp.masked_fill(~real, 0).sum(-1) / real.sum(-1)  # label smoothing over the real positions
        total = total + ((1 - smoothing) * nll + smoothing * uniform)[target < n].sum()
    return total / 2


def count(batch: dict, per: str = "token") -> int:
    return batch["input_ids"].shape[0] if "start_positions" in batch else gen.count(batch, per)


def best_span(start_logits, end_logits, offsets: list, max_tokens: int) -> tuple[float, int, int]:
    """(score, start, end) maximising start_logit + end_logit over spans inside the context, start <= end,
    at most ``max_tokens`` long; score is -inf when the window has no context token."""
    n = len(offsets)
    in_ctx = torch.tensor([o is not None for o in offsets])
    pos = torch.arange(n)
    length = pos[None, :] - pos[:, None]
    valid = (length >= 0) & (length < max_tokens) & in_ctx[:, None] & in_ctx[None, :]
    if not valid.any():
        return float("-inf"), 0, 0
    scores = (start_logits[:n, None].float() + end_logits[None, :n].float()).masked_fill(~valid, float("-inf"))
    flat = int(scores.argmax())
    return float(scores.view(-1)[flat]), flat // n, flat % n


@torch.no_grad()
def predict(model, tokenizer, rows, recipe) -> list[str]:
    """Answer texts. Extractive: the best span over all windows of each row, cut from the context by the
    tokens' character offsets ("" when a row has no valid span); generative: the generated text."""
    if not _extractive(recipe):
        return gen.predict(model, tokenizer, rows, recipe, template=_template(recipe), shorten="context")
    return [s["answer"] for s in spans(model, tokenizer, rows, recipe)]


@torch.no_grad()
def spans(model, tokenizer, rows, recipe) -> list[dict]:
    """Extractive qa: per row the best span over all its windows, ``{answer, start, end, score}`` (character
    offsets into the context, the span's start + end logit); an empty answer at -1 when no span is valid, or
    (finetune.no_answer) when the lowest no-answer score of the row's windows beats the best span's by more than
    finetune.null_score_diff_threshold (its score then the no-answer one)."""
    best = [{"answer": "", "start": -1, "end": -1, "score": float("-inf")} for _ in rows]
    null = [float("inf")] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for first, chunk, wins in _chunks(recipe, tokenizer, rows, _limit(recipe, model), "predict"):
            data = gen.Examples(wins, tokenizer.pad_token_id)
            for lo in range(0, len(wins), 32):
                idx = list(range(lo, min(len(wins), lo + 32)))
                batch = data.batch(idx)
                out = model(input_ids=batch["input_ids"].to(model.device),
                            attention_mask=batch["attention_mask"].to(model.device))
                starts, ends = out.start_logits.float().cpu(), out.end_logits.float().cpu()
                for j, i in enumerate(idx):
                    w, r = wins[i], first + wins[i]["row"]
                    if recipe.finetune.no_answer:
                        last = len(w["input_ids"]) - 1
                        null[r] = min(null[r], float(starts[j, last] + ends[j, last]))
                    value, s, e = best_span(starts[j], ends[j], w["offsets"], recipe.finetune.max_answer_tokens)
                    if value > best[r]["score"]:
                        context = str(chunk[wins[i]["row"]]["context"])
                        lo_char, hi_char = w["offsets"][s][0], w["offsets"][e][1]
                        text = context[lo_char:hi_char]
                        lo_char += len(text) - len(text.lstrip())  # the span without surrounding spaces
                        best[r] = {"answer": text.strip(), "start": lo_char, "end": lo_char + len(text.strip()),
                                   "score": float(value)}
    finally:
        model.train(was_training)
    for r, score in enumerate(null if recipe.finetune.no_answer else []):
        if score - best[r]["score"] > recipe.finetune.null_score_diff_threshold:
            best[r] = {"answer": "", "start": -1, "end": -1, "score": score}
    return best


def score(predictions, rows, recipe=None):
    """SQuAD v1.1 exact match and F1 (x100), each the max over a row's gold answers; v2.0's when some row has no
    answer (:func:`gptkit.metrics.squad_v2_scores`)."""
    return metrics.task_scores("qa", predictions, [list(r["answers"]["text"]) for r in rows],  # no_answer: v2's
                               no_answer=recipe is not None and recipe.finetune.no_answer)  # whatever the sample holds
