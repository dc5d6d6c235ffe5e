"""What ``gptkit serve`` serves and how it reads requests: the loaded model and its endpoints, OpenAI-style
bodies checked field by field (each problem an :class:`ApiError` naming the field), prompts and chat templates,
and the response bodies and stream chunks."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

TASK_INPUTS = {"classify": (("text",), ("text_pair",)), "qa": (("question", "context"), ()),
               "translate": (("source",), ()), "summarize": (("document",), ())}
MAX_INPUTS = 64  # rows per task request, prompts per completion request
SAMPLING_EPS = 1e-5  # a lower temperature is greedy, as vLLM's _SAMPLING_EPS (1e-40 would overflow the logits)
# OpenAI options gptkit does not have: refused by name (a value that asks for nothing aside), never ignored
REFUSED = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions", "tool_choice",
           "function_call", "response_format", "modalities", "audio", "prediction", "reasoning_effort",
           "web_search_options", "frequency_penalty", "presence_penalty", "best_of")
HARMLESS = {"top_logprobs": (0,), "tool_choice": ("none",), "function_call": ("none",),
            "response_format": ({"type": "text"},), "modalities": (["text"],), "frequency_penalty": (0,),
            "presence_penalty": (0,), "best_of": (1,)}
# what a completion or chat request may hold; anything else is refused as OpenAI refuses it ("Unrecognized request
# argument"). Bookkeeping OpenAI accepts (user, metadata, ...) is read and ignored; top_k and after are vLLM's.
READ = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream", "stream_options",
        "stop", "seed", "user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
        "prompt_cache_key", "top_k", "repetition_penalty", "num_beams", "min_tokens", "ignore_eos", *REFUSED}


@dataclass
class Limits:
    max_tokens: int = 1024  # the most tokens one completion may ask for (--max-tokens)
    max_body: int = 1 << 20  # request body bytes (--max-request-bytes)
    api_key: str | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------- what is served
@dataclass
class Served:
    """The loaded model and what it can answer: a language model (completions) and/or task endpoints."""

    name: str
    model: Any
    tok: Any
    run: Any  # the run's recipe, None for a plain model
    tasks: dict  # endpoint name -> function(rows) -> results
    lm: bool  # completions and chat are served
    defaults: dict = field(default_factory=dict)  # sampling a request leaves out: the model's generation_config

    @property
    def context(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


def load(path: str, name: str | None = None, use_defaults: bool = True) -> Served:
    """The model of a run or model directory (loaded as ``gptkit eval`` loads it) and its endpoints."""
    from pathlib import Path

    from gptkit import trained

    model, tok, run = trained.load_any(path, "RUN")
    task_fns = _task_functions(model, tok, run) if run is not None else {}
    lm = run is None or not trained.has_head(run.task, run)
    return Served(name or Path(path).resolve().name, model, tok, run, task_fns, lm,
                  sampling_defaults(model) if use_defaults else {})


SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "repetition_penalty")


def sampling_defaults(model) -> dict:
    """The sampling settings the model's ``generation_config.json`` sets (those differing from transformers'
    defaults), used where a request leaves them out, as vLLM does (``--generation-config auto``): an instruct
    model's temperature 0.6 / top_p 0.9 without each client repeating them. A value a request could not give
    (checked as a request's) is left out with a warning."""
    config = getattr(model, "generation_config", None)
    diff = config.to_diff_dict() if config is not None else {}
    out = {}
    for key in SAMPLING_DEFAULTS:
        if diff.get(key) is None:
            continue
        try:
            _sampling({key: diff[key]})
        except ApiError as e:
            log.warning("generation_config.json: %s; requests default to OpenAI's %s", e.message, key)
            continue
        out[key] = diff[key]
    return out


def _task_functions(model, tok, run) -> dict:
    from gptkit import tasks

    if run.task == "classify":
        return {"classify": lambda rows: _classify(model, tok, rows, run)}
    if run.task == "qa" and run.finetune.qa_mode == "extractive":
        return {"qa": lambda rows: tasks.load("qa").spans(model, tok, rows, run)}
    if run.task == "multitask":
        from gptkit.tasks import multitask

        return {name: _generative(model, tok, multitask.sub_recipe(run, i))
                for i, name in enumerate(multitask._names(run))}
    if run.task in TASK_INPUTS:
        return {run.task: _generative(model, tok, run)}
    return {}


def _classify(model, tok, rows, run) -> list[dict]:
    from gptkit.tasks import classify

    probs = classify.probabilities(model, tok, rows, run)
    return [{"label": max(p, key=p.get), "probabilities": p} for p in probs]


def _generative(model, tok, recipe):
    from gptkit import tasks

    module, key = tasks.load(recipe.task), "answer" if recipe.task == "qa" else "text"
    return lambda rows: [{key: text} for text in module.predict(model, tok, rows, recipe)]


# ------------------------------------------------------------------------------------------- requests
def _sampling(body: dict, defaults: dict | None = None) -> Any:
    """A request's sampling; what it leaves out comes from ``defaults`` (:func:`sampling_defaults`), else OpenAI's."""
    from gptkit.generation import REPETITION_PENALTY
    from gptkit.serve.engine import Sampling

    body = {**(defaults or {}), **{k: v for k, v in body.items() if v is not None}}
    temperature = _number(body, "temperature", 1.0, low=0.0, high=2.0)
    top_p = _number(body, "top_p", 1.0, low=0.0, high=1.0, open_low=True)
    top_k = body.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < -1):
        raise ApiError(400, "top_k: expected an integer >= 1 (0 or -1: off)", "top_k")
    beams = _integer(body, "num_beams", 1, low=1, high=8)
    if beams > 1 and body.get("stream"):
        raise ApiError(400, "num_beams: beam search cannot stream; set stream to false", "num_beams")
    for penalty in ("frequency_penalty", "presence_penalty"):
        if body.get(penalty) not in (None, 0, 0.0):
            raise ApiError(400, f"{penalty}: not supported; repetition_penalty is (1.0 = off)", penalty)
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "best_of: not supported (use n)", "best_of")
    for unsupported in REFUSED:
        value = body.get(unsupported)
        if not (value is None or value is False or value in ([], {}) or value in HARMLESS.get(unsupported, ())):
            raise ApiError(400, f"{unsupported}: not supported by gptkit serve", unsupported)
    seed = _integer(body, "seed", None, low=-(1 << 63), high=(1 << 63) - 1)  # checked even when greedy
    sample = temperature >= SAMPLING_EPS and beams == 1
    return Sampling(do_sample=sample, temperature=temperature if sample else 1.0,
                    top_k=top_k if sample and top_k and top_k > 0 else None, top_p=top_p if sample else None,
                    repetition_penalty=_number(body, "repetition_penalty", 1.0, *REPETITION_PENALTY),
                    num_beams=beams, min_tokens=_integer(body, "min_tokens", 0, low=0),
                    ignore_eos=_flag(body, "ignore_eos"), seed=seed if sample else None)


def _number(body, key, default, low=None, high=None, open_low=False):
    value = body.get(key, default)
    value = default if value is None else value
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ApiError(400, f"{key}: expected a number, got {json.dumps(value)[:40]}", key)
    if isinstance(value, float) and not math.isfinite(value):  # raw NaN/Infinity, which Python's json reads
        raise ApiError(400, f"{key}: expected a finite number, got {json.dumps(value)}", key)
    if low is not None and (value < low or open_low and value == low) or high is not None and value > high:
        rng = f"{'(' if open_low else '['}{low}, {high if high is not None else 'inf'}]"
        raise ApiError(400, f"{key}: expected a number in {rng}, got {value}", key)
    return float(value)


def _integer(body, key, default, low=None, high=None):
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"{key}: expected an integer, got {json.dumps(value)[:40]}", key)
    if low is not None and value < low or high is not None and value > high:
        raise ApiError(400, f"{key}: expected an integer in [{low}, {high if high is not None else 'inf'}], "
                            f"got {value}", key)
    return value


def _flag(body, key) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{key}: expected true or false", key)
    return value


def _stops(body) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop: expected a non-empty string or a list of at most 4", "stop")
    return tuple(stop)


def _ids(value) -> bool:
    """A prompt given as token ids: a non-empty list of integers."""
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def _prompts(body) -> list[str | list[int]]:
    """The prompts of a completion request, as OpenAI takes them: a string, token ids, or a list of either."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) or _ids(prompt) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) or _ids(p) for p in prompts):
        raise ApiError(400, "prompt: expected a string, a list of token ids, or a list of either", "prompt")
    if len(prompts) > MAX_INPUTS:
        raise ApiError(400, f"prompt: at most {MAX_INPUTS} prompts per request, got {len(prompts)}", "prompt")
    for p in prompts:
        if isinstance(p, str):
            valid_text(p, "prompt")
    return prompts


def valid_text(value: str, where: str) -> str:
    """``value``, a string the tokenizer can read: JSON may carry a lone surrogate ("\\ud800"), which no UTF-8
    encoder takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{where}: not valid text (a lone UTF-16 surrogate)", where) from None
    return value


def chat_prompt(tok, messages, encoder: bool = False) -> tuple[str | list[int], tuple[str, ...]]:
    """The prompt of a conversation, and stop strings the template implies (a plain template's next ``user:``).
    A decoder's chat template gives token ids, as ``apply_chat_template(tokenize=True)`` makes them: the template
    places BOS itself, so the text must not be encoded again with the tokenizer's own BOS."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of {role, content}", "messages")
    clean = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant") or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}]: expected role system|developer|user|assistant and a string content",
                           f"messages[{i}]")
        # OpenAI's newer name for the system role; chat templates know "system"
        clean.append({"role": "system" if role == "developer" else role,
                      "content": valid_text(content, f"messages[{i}].content")})
    if getattr(tok, "chat_template", None):
        from jinja2 import TemplateError

        try:
            if encoder:
                return tok.apply_chat_template(clean, tokenize=False, add_generation_prompt=True), ()
            ids = tok.apply_chat_template(clean, tokenize=True, add_generation_prompt=True)
        except TemplateError as e:  # Llama-2/Mistral templates raise_exception() on roles out of order
            raise ApiError(400, f"messages: the model's chat template refused them: {e}", "messages") from None
        return list(ids if isinstance(ids, list) else ids["input_ids"]), ()  # transformers 5: a BatchEncoding
    return "".join(f"{m['role']}: {m['content']}\n" for m in clean) + "assistant:", ("\nuser:",)


def encode(served: Served, prompt: str | list[int], max_tokens: int | None, field_name: str) -> list[int]:
    """A prompt's token ids (``prompt`` may be ids already), checked to fit the context with ``max_tokens`` new ones
    (unset: with at least one)."""
    from gptkit.modeling import is_encoder_decoder
    from gptkit.tokenizer import prompt_ids

    encoder = is_encoder_decoder(served.model.config)
    ids = list(prompt) if isinstance(prompt, list) else prompt_ids(served.tok, prompt, encoder)
    vocab = getattr(served.model.config, "vocab_size", None) or len(served.tok)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"{field_name}: token id {bad} is outside the model's vocabulary [0, {vocab})", field_name)
    if not ids:
        start = served.tok.bos_token_id if served.tok.bos_token_id is not None else served.tok.eos_token_id
        ids = [start]
    limit, new = served.context, 1 if max_tokens is None else max_tokens
    if limit is not None and (len(ids) + (0 if encoder else new) > limit or new >= limit):
        if max_tokens is None:
            raise ApiError(400, f"{field_name}: {len(ids)} prompt tokens leave no room for new ones in the model's "
                                f"context of {limit} tokens", field_name, code="context_length_exceeded")
        raise ApiError(400, f"{field_name}: {len(ids)} prompt tokens + max_tokens {max_tokens} exceed the model's "
                            f"context of {limit} tokens", field_name, code="context_length_exceeded")
    return ids


def _room(served: Served, ids: list[int]) -> int | None:
    """The most new tokens the context leaves after a prompt of ``ids`` (None: no known context)."""
    from gptkit.modeling import is_encoder_decoder

    limit = served.context
    if limit is None:
        return None
    return limit - 1 if is_encoder_decoder(served.model.config) else limit - len(ids)


def generation_job(served: Served, limits: Limits, body: dict, prompts: list, send, stops=(), chat: bool = False):
    """A :class:`gptkit.serve.engine.Job` of n choices per prompt, and the prompts' token counts. An unset
    max_tokens is 16 for a completion, the server's --max-tokens for a chat (``chat``: the route, not the body's
    keys), either capped by the room the prompt leaves in the context (as OpenAI: never a context error the client
    did not ask for)."""
    from gptkit.serve.engine import Choice, Job

    unknown = sorted(set(body) - READ - ({"messages"} if chat else {"prompt"}))
    if unknown:
        raise ApiError(400, f"{unknown[0]}: unrecognized request argument (gptkit serve reads: "
                            f"{', '.join(sorted(READ - set(REFUSED)))})", unknown[0])
    default = min(limits.max_tokens, 16) if not chat else limits.max_tokens
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = _integer(body, key, None, low=1, high=limits.max_tokens)
    n = _integer(body, "n", 1, low=1, high=16)
    sampling = _sampling(body, served.defaults)
    if asked is not None and sampling.min_tokens > asked:
        raise ApiError(400, f"min_tokens: {sampling.min_tokens} is more than {key} {asked}", "min_tokens")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict)
                                or not isinstance(options.get("include_usage", False), bool)):
        raise ApiError(400, "stream_options: expected an object such as {\"include_usage\": true}", "stream_options")
    stream = _flag(body, "stream")
    if options is not None and not stream:  # as OpenAI: the options of a stream that was not asked for
        raise ApiError(400, "stream_options: only allowed when stream is true", "stream_options")
    stop = _stops(body) + stops
    choices, prompt_tokens = [], 0
    for i, prompt in enumerate(prompts):
        ids = encode(served, prompt, asked, "messages" if chat else "prompt")
        left = _room(served, ids)
        max_tokens = asked if asked is not None else default if left is None else min(default, left)
        prompt_tokens += len(ids)
        choices += [Choice(i * n + j, ids, max_tokens, stop) for j in range(n)]
    return Job(send, sampling, choices, stream=stream), prompt_tokens


def task_rows(task: str, body: Any) -> list[dict]:
    """``{"inputs": [row, ...]}`` or one row; each row has the task's input fields as strings."""
    if not isinstance(body, dict):
        raise ApiError(400, "body: expected a JSON object", "body")
    rows = body["inputs"] if "inputs" in body else [body]
    if not isinstance(rows, list) or not rows or len(rows) > MAX_INPUTS:
        raise ApiError(400, f"inputs: expected a list of 1 to {MAX_INPUTS} objects", "inputs")
    required, optional = TASK_INPUTS[task if task in TASK_INPUTS else _kind(task)]
    out = []
    for i, row in enumerate(rows):
        where = f"inputs[{i}]." if "inputs" in body else ""
        if not isinstance(row, dict):
            raise ApiError(400, f"inputs[{i}]: expected an object with {', '.join(required)}", f"inputs[{i}]")
        for key in required + optional:
            if key in required and key not in row:
                raise ApiError(400, f"{where}{key}: required (a {task} request gives {', '.join(required)})",
                               f"{where}{key}")
            if key in row and not isinstance(row[key], str):
                raise ApiError(400, f"{where}{key}: expected a string", f"{where}{key}")
            if key in row:
                valid_text(row[key], f"{where}{key}")
        out.append({k: row[k] for k in required + optional if k in row})
    return out


def _kind(name: str) -> str:
    return name.rstrip("0123456789")  # a multitask run's second translate task is "translate1"


def completion_chunk(kind: str, rid: str, model: str, index: int, piece: str, reason: str | None, first: bool,
                     created: int, usage: bool = False) -> dict:
    """One streamed chunk; every chunk of a stream carries the same ``created`` (the request's time), and with
    ``usage`` (include_usage) ``"usage": null`` until the last, as OpenAI's."""
    if kind == "chat":
        delta = {"role": "assistant", "content": piece} if first else {"content": piece}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    else:
        chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
                 "choices": [{"index": index, "text": piece, "logprobs": None, "finish_reason": reason}]}
    return {**chunk, "usage": None} if usage else chunk


def completion_body(kind: str, rid: str, model: str, finished: dict, usage: dict) -> dict:
    choices = []
    for index in sorted(finished):
        answer, reason = finished[index]
        if kind == "chat":
            choices.append({"index": index, "message": {"role": "assistant", "content": answer}, "logprobs": None,
                            "finish_reason": reason})
        else:
            choices.append({"index": index, "text": answer, "logprobs": None, "finish_reason": reason})
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices, "usage": usage}


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def channel():
    """An asyncio queue and a thread-safe function that puts into it."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    return q, lambda event: loop.call_soon_threadsafe(q.put_nowait, event)
