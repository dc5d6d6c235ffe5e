"""The model behind ``gptkit serve``: requests of many clients batched onto one model by one worker thread.

The worker owns the model. Requests wait in a queue; the worker takes the first, waits up to ``wait_ms`` for
more (``max_batch`` rows at most), groups them by what one ``generate`` call must share (the sampling settings;
a seeded sampled request runs alone, so its seed alone decides its text) and runs each group as one batch
(split where max_batch rows or the model's context would be exceeded).
A stopping criterion looks at every row's new token as it is produced: it applies the row's own ``max_tokens``,
stop strings and end of text, sends new text to a streaming client, and finishes the row there, so a short
answer returns while longer ones in its batch go on. Task requests (classify, qa, translate, summarize) are
batched the same way into one call of the task's predict function. Events go back to each request's asyncio
queue through ``loop.call_soon_threadsafe``: the HTTP side never waits on the model.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

Send = Callable[[tuple], None]  # posts an event to the request: ("delta", i, text) | ("finish", i, text, reason,
# tokens) | ("result", list) | ("error", status, message)


@dataclass(frozen=True)
class Sampling:
    """What every row of one ``generate`` call shares."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    num_beams: int = 1
    min_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None


@dataclass
class Choice:
    """One sequence to generate: a prompt's ids, its limits, and what it has produced so far."""

    index: int
    ids: list[int]
    max_tokens: int
    stop: tuple[str, ...] = ()
    out: list[int] = field(default_factory=list)
    sent: int = 0  # characters already streamed
    done: bool = False


@dataclass
class Job:
    """A request: generation choices (``choices``) or task rows (``task`` + ``rows``), and where events go."""

    send: Send
    sampling: Sampling | None = None
    choices: list[Choice] = field(default_factory=list)
    stream: bool = False
    task: str | None = None
    rows: list[dict] = field(default_factory=list)
    cancelled: bool = False
    key: Any = None

    def __post_init__(self):
        if self.task is not None:
            self.key = ("task", self.task)
        elif self.sampling.do_sample and self.sampling.seed is not None:
            self.key = ("alone", id(self))
        else:
            self.key = ("generate", self.sampling)

    def size(self) -> int:
        return len(self.rows) if self.task is not None else len(self.choices)


class Engine:
    """One worker thread over one model; :meth:`submit` is safe from any thread."""

    def __init__(self, model: Any, tokenizer: Any, tasks: dict[str, Callable[[list[dict]], list]] | None = None,
                 max_batch: int = 32, wait_ms: float = 5.0):
        self.model, self.tok, self.tasks = model, tokenizer, tasks or {}
        self.max_batch, self.wait = max(1, max_batch), wait_ms / 1000
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="gptkit-serve-engine", daemon=True)
        self.jobs = self.batches = 0  # requests taken, generate/predict calls made (GET /health shows both)

    def start(self) -> Engine:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=60)

    def submit(self, job: Job) -> None:
        self.jobs += 1
        self.queue.put(job)

    def _work(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs, rows, deadline = [first], first.size(), time.monotonic() + self.wait
            while rows < self.max_batch:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)  # stop after this batch
                    break
                jobs.append(nxt)
                rows += nxt.size()
            groups: dict[Any, list[Job]] = {}
            for job in jobs:
                if not job.cancelled:
                    groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[Job]) -> None:
        try:
            if group[0].task is not None:
                self.batches += 1
                self._task(group)
            else:  # a seed covers all of a job's calls
                from gptkit.generation import seeded

                sampling = group[0].sampling
                with seeded(self.model, sampling.seed):
                    for call in self._calls([(job, c) for job in group for c in job.choices]):
                        self.batches += 1
                        self._generate(sampling, call)
        except Exception as exc:  # a bug or an out-of-memory: those requests get a 500, the server goes on
            log.exception("serve: batch of %d requests failed", len(group))
            for job in group:
                job.send(("error", 500, f"generation failed: {type(exc).__name__}: {str(exc)[:200]}"))

    def _calls(self, choices: list[tuple[Job, Choice]]) -> list[list[tuple[Job, Choice]]]:
        """The generate calls of a group: at most max_batch rows each, in order of prompt length, and a new call
        where a row would not fit the context with the call's others (a decoder's rows are left-padded to the
        longest prompt and all run the largest max_tokens; each row fits alone, as its request was checked)."""
        from gptkit.modeling import is_encoder_decoder

        config = self.model.config
        limit = None if is_encoder_decoder(config) else getattr(config, "max_position_embeddings", None)
        calls: list[list[tuple[Job, Choice]]] = []
        most = 0  # the largest max_tokens of the last call; sorted, its longest prompt is the row's own
        for job, c in sorted(choices, key=lambda jc: len(jc[1].ids)):
            if not calls or len(calls[-1]) == self.max_batch or \
                    limit is not None and len(c.ids) + max(most, c.max_tokens) > limit:
                calls.append([])
                most = 0
            calls[-1].append((job, c))
            most = max(most, c.max_tokens)
        return calls

    def _task(self, group: list[Job]) -> None:
        rows = [r for job in group for r in job.rows]
        results = self.tasks[group[0].task](rows)
        at = 0
        for job in group:
            job.send(("result", results[at : at + len(job.rows)]))
            at += len(job.rows)

    def _generate(self, s: Sampling, choices: list[tuple[Job, Choice]]) -> None:
        import torch

        from gptkit.generation import DecodingOptions, eos_ids
        from gptkit.modeling import is_encoder_decoder

        # min_tokens capped by the call's largest max_tokens, not each row's: a row ends at its own max_tokens
        # anyway, and a short neighbour must not lower the others' minimum
        longest = max(c.max_tokens for _, c in choices)
        opts = DecodingOptions(max_new_tokens=longest, do_sample=s.do_sample, temperature=s.temperature,
                               top_k=s.top_k, top_p=s.top_p, num_beams=s.num_beams,
                               repetition_penalty=s.repetition_penalty, seed=s.seed,
                               min_new_tokens=min(s.min_tokens, longest))
        kwargs = opts.to_generate_kwargs(self.tok)
        eos = set() if s.ignore_eos else eos_ids(self.model, self.tok)
        if eos or s.ignore_eos:  # generate (beam search) ends at any of them, not at the tokenizer's alone
            kwargs["eos_token_id"] = sorted(eos) or None
        encoder_decoder = is_encoder_decoder(self.model.config)
        saved = self.tok.padding_side
        self.tok.padding_side = "right" if encoder_decoder else "left"
        try:
            batch = self.tok.pad({"input_ids": [c.ids for _, c in choices]}, return_tensors="pt").to(self.model.device)
        finally:
            self.tok.padding_side = saved
        tracker = None if s.num_beams > 1 else _Tracker(self.tok, choices, eos, not encoder_decoder)
        from transformers import StoppingCriteriaList

        with torch.inference_mode():
            output = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         stopping_criteria=StoppingCriteriaList([tracker] if tracker else []),
                                         **kwargs)
        if tracker is None:  # beam search: whole sequences at the end
            start = 1 if encoder_decoder else batch["input_ids"].shape[1]
            for (job, c), seq in zip(choices, output[:, start:].tolist()):
                _finish_whole(self.tok, job, c, seq, eos, not encoder_decoder)
        else:
            tracker.finish_all()


def _finish_whole(tok, job: Job, c: Choice, seq: list[int], eos: set[int], after_prompt: bool) -> None:
    """A sequence generated in one piece: cut at end of text (any of ``eos``), stop strings and max_tokens, then
    sent."""
    reason = "length"
    for i, t in enumerate(seq[: c.max_tokens]):
        if t in eos:
            seq, reason = seq[:i], "stop"
            break
        c.out.append(t)
    text, hit = _cut(_text(tok, c, after_prompt), c.stop)
    c.done = True
    job.send(("finish", c.index, text, "stop" if hit else reason, len(c.out) + (reason == "stop")))


def _text(tok, c: Choice, after_prompt: bool) -> str:
    """The text of a row's new tokens as it continues its prompt (``after_prompt``: a decoder-only model's row)."""
    from gptkit.generation import continuation

    return continuation(tok, c.ids if after_prompt else [], c.out)


def _cut(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class _Tracker:
    """A ``StoppingCriteria`` reading each row's new token: it ends rows at their own limits and streams text."""

    def __init__(self, tok, choices: list[tuple[Job, Choice]], eos: set[int], after_prompt: bool):
        self.tok, self.choices, self.eos, self.after_prompt = tok, choices, eos, after_prompt

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        new = input_ids[:, -1].tolist()
        for (job, c), t in zip(self.choices, new):
            if c.done:
                continue
            if job.cancelled:
                c.done = True
            elif t in self.eos:
                self._finish(job, c, "stop", eos=True)
            else:
                c.out.append(t)
                self._advance(job, c)
        return torch.tensor([c.done for _, c in self.choices], device=input_ids.device)

    def _advance(self, job: Job, c: Choice) -> None:
        if not (job.stream or c.stop):
            if len(c.out) >= c.max_tokens:
                self._finish(job, c, "length")
            return
        text = _text(self.tok, c, self.after_prompt)
        cut, hit = _cut(text, c.stop)
        if hit:
            self._finish(job, c, "stop", cut)
        elif len(c.out) >= c.max_tokens:
            self._finish(job, c, "length", text)
        elif job.stream:
            ready = len(text)
            while ready > c.sent and text[ready - 1] == "\ufffd":  # half a character, which a next token completes
                ready -= 1
            ready -= max((len(s) for s in c.stop), default=1) - 1  # a stop string may start in the whole characters
            if ready > c.sent:
                job.send(("delta", c.index, text[c.sent : ready]))
                c.sent = ready

    def _finish(self, job: Job, c: Choice, reason: str, text: str | None = None, eos: bool = False) -> None:
        """The row's last text and its count of generated tokens (an end-of-text token counts, as in OpenAI's and
        vLLM's usage, though it is not text)."""
        if text is None:
            text = _text(self.tok, c, self.after_prompt)
        c.done = True
        job.send(("finish", c.index, text[c.sent :] if job.stream else text, reason, len(c.out) + eos))

    def finish_all(self) -> None:
        """Rows still open when generate returned (it stops at the group's longest max_tokens)."""
        for job, c in self.choices:
            if not c.done and not job.cancelled:
                self._finish(job, c, "length")
