"""gptkit serve against a live server process: the official openai client (completions, chat, streaming), plain HTTP
for task endpoints and errors, batching of concurrent requests, bearer auth, and SIGTERM draining a request."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from tasks_helpers import (classify3_rows, finetune_recipe, pretrained_base, qa_rows, splits,  # noqa: E402
                           translate_rows)


@contextmanager
def server(model: Path, *args: str):
    log = model.parent / f"serve-{time.monotonic_ns()}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "gptkit", "serve", str(model), "--port", "0", *args],
                                stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline, url = time.time() + 120, None
        while url is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            found = re.search(r"at (http://127\.0\.0\.1:\d+)", log.read_text())
            url = found and found.group(1)
            time.sleep(0.1)
        while True:
            try:
                httpx.get(f"{url}/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
        proc.url, proc.log = url, log
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return pretrained_base(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def lm(base):
    with server(base) as proc:
        yield proc


def client(proc, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proc.url}/v1", api_key=key, max_retries=0)


def local_greedy(base: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    from gptkit import generation, trained

    model, tok = trained.load_lm(base)
    opts = generation.DecodingOptions(max_new_tokens=max_new_tokens, num_beams=1)
    return [t[0] for t in generation.generate_batch(model, tok, prompts, opts, batch_size=1)]


def test_openai_client_completions_chat_and_streaming(lm, base):
    c = client(lm)
    assert [m.id for m in c.models.list()] == ["base"]
    prompts = ["red blue", "the old"]
    want = local_greedy(base, prompts, 12)
    r = c.completions.create(model="base", prompt=prompts, max_tokens=12, temperature=0)
    assert [ch.text for ch in r.choices] == want  # what `gptkit generate`/eval decode greedily, batched here
    one = c.completions.create(model="base", prompt=prompts[0], max_tokens=12, temperature=0)
    stream = c.completions.create(model="base", prompt=prompts[0], max_tokens=12, temperature=0, stream=True,
                                  stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want[0] == one.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == one.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == one.usage.completion_tokens > 0
    assert len({ch.created for ch in chunks}) == 1 and chunks[0].created >= one.created > 0  # one time per stream
    assert r.usage.completion_tokens >= one.usage.completion_tokens
    chat = c.chat.completions.create(model="base", messages=[{"role": "system", "content": "be brief"},
                                                             {"role": "user", "content": "red blue"}],
                                     max_tokens=8, temperature=0)
    prompt = "system: be brief\nuser: red blue\nassistant:"  # no chat template: role lines
    assert chat.choices[0].message.content == local_greedy(base, [prompt], 8)[0].split("\nuser:")[0]
    assert chat.choices[0].message.role == "assistant" and chat.usage.total_tokens == \
        chat.usage.prompt_tokens + chat.usage.completion_tokens
    pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "red blue"}], max_tokens=8, temperature=0, stream=True)]
    again = c.chat.completions.create(model="base", messages=[{"role": "user", "content": "red blue"}], max_tokens=8,
                                      temperature=0)
    assert "".join(pieces) == again.choices[0].message.content


def test_usage_stop_strings_and_seeded_samples(lm, base):
    c = client(lm)
    full = c.completions.create(model="base", prompt="red blue", max_tokens=16, temperature=0, extra_body={
        "ignore_eos": True})
    text = full.choices[0].text
    assert full.usage.completion_tokens == 16 and full.choices[0].finish_reason == "length"
    from gptkit import trained

    _, tok = trained.load_lm(base)
    assert full.usage.prompt_tokens == len(tok("red blue", add_special_tokens=False)["input_ids"])
    stop = text.strip()[3:6] if len(text.strip()) > 6 else text.strip()[-1]
    cut = c.completions.create(model="base", prompt="red blue", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="base", prompt="red blue", max_tokens=16, temperature=0, stop=[stop], stream=True))
    assert streamed == cut.choices[0].text
    a = c.completions.create(model="base", prompt="red", max_tokens=10, temperature=1.0, n=3, seed=7)
    b = c.completions.create(model="base", prompt="red", max_tokens=10, temperature=1.0, n=3, seed=7)
    assert [x.text for x in a.choices] == [x.text for x in b.choices] and len({x.text for x in a.choices}) > 1
    assert sorted(x.index for x in a.choices) == [0, 1, 2]


def test_token_id_prompts_the_developer_role_and_openai_bookkeeping(lm, base):
    """What OpenAI's API takes beside the basics: prompts as token ids (lm-eval-harness sends them), the developer
    role (the system role's newer name), GET /v1/models/ID, and ``"usage": null`` on every chunk but the last when a
    stream includes usage."""
    from gptkit import trained

    _, tok = trained.load_lm(base)
    ids = tok("red blue", add_special_tokens=False)["input_ids"]
    body = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    text = httpx.post(f"{lm.url}/v1/completions", json={**body, "prompt": "red blue"}).json()
    by_ids = httpx.post(f"{lm.url}/v1/completions", json={**body, "prompt": [ids, ids]}).json()
    assert [c["text"] for c in by_ids["choices"]] == [text["choices"][0]["text"]] * 2
    assert by_ids["usage"]["prompt_tokens"] == 2 * len(ids) == 2 * text["usage"]["prompt_tokens"]
    c = client(lm)
    chat = [{"role": "user", "content": "red blue"}]
    system = c.chat.completions.create(model="base", messages=[{"role": "system", "content": "be brief"}, *chat],
                                       max_tokens=6, temperature=0)
    developer = c.chat.completions.create(model="base", messages=[{"role": "developer", "content": "be brief"},
                                                                  *chat], max_tokens=6, temperature=0)
    assert developer.choices[0].message.content == system.choices[0].message.content
    card = c.models.retrieve("base")
    assert card.id == "base" and card.created > 0
    assert httpx.get(f"{lm.url}/v1/models/nope").json()["error"]["code"] == "model_not_found"
    with httpx.stream("POST", f"{lm.url}/v1/completions", json={"prompt": "red", "max_tokens": 4, "stream": True,
                                                                 "stream_options": {"include_usage": True}}) as r:
        import json

        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert [ch["usage"] for ch in chunks[:-1]] == [None] * (len(chunks) - 1) and chunks[-1]["usage"]["total_tokens"]


def test_a_temperature_below_1e_5_is_greedy(lm):
    """As vLLM: dividing the logits by 1e-40 would give inf/NaN probabilities (a 500)."""
    body = {"prompt": "red blue", "max_tokens": 8, "ignore_eos": True}
    greedy = httpx.post(f"{lm.url}/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    for temperature in (1e-40, 1e-6):
        r = httpx.post(f"{lm.url}/v1/completions", json={**body, "temperature": temperature, "seed": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, r.text


def test_unset_max_tokens_is_what_the_context_leaves(lm, base):
    from gptkit import trained

    _, tok = trained.load_lm(base)
    context = 64  # tasks_helpers.base_recipe
    c = client(lm)
    short = c.completions.create(model="base", prompt="red blue", temperature=0, extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 16 and short.choices[0].finish_reason == "length"  # OpenAI's default
    prompt = "red " * 28
    assert context - 16 < len(tok(prompt, add_special_tokens=False)["input_ids"]) < context
    long = c.completions.create(model="base", prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
    assert long.usage.total_tokens == context and long.choices[0].finish_reason == "length"
    chat = c.chat.completions.create(model="base", messages=[{"role": "user", "content": "red blue"}],
                                     temperature=0, extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens > 16  # a chat answer may take the rest of the context
    assert chat.usage.total_tokens == context or chat.choices[0].finish_reason == "stop"


def test_rows_batched_together_fit_the_context_together(lm, base):
    """Rows of one generate call are left-padded to the longest prompt and all run the largest max_tokens: each row
    here fits the context alone (the long prompt + the room it leaves, the short one + 16), together they would not
    (the long prompt + 16), so they are two calls, not an IndexError past the position embedding."""
    from gptkit import trained

    _, tok = trained.load_lm(base)
    long = len(tok("red " * 28, add_special_tokens=False)["input_ids"])
    r = httpx.post(f"{lm.url}/v1/completions", json={"prompt": ["red", "red " * 28], "temperature": 0,
                                                     "ignore_eos": True}, timeout=120)
    assert r.status_code == 200, r.text
    assert [ch["finish_reason"] for ch in r.json()["choices"]] == ["length", "length"]
    assert r.json()["usage"]["completion_tokens"] == 16 + 64 - long


def test_concurrent_requests_share_batches(lm, base):
    prompts = [f"{w} blue" for w in ("red", "green", "black", "white", "small", "big", "old", "new")]
    before = httpx.get(f"{lm.url}/health").json()
    results = {}

    def ask(p):
        r = httpx.post(f"{lm.url}/v1/completions", json={"prompt": p, "max_tokens": 24, "temperature": 0,
                                                         "ignore_eos": True}, timeout=120)
        results[p] = r.json()["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = httpx.get(f"{lm.url}/health").json()
    assert after["requests"] - before["requests"] == len(prompts)
    assert after["batches"] - before["batches"] < len(prompts)  # some requests shared a generate call
    solo = [httpx.post(f"{lm.url}/v1/completions", json={"prompt": p, "max_tokens": 24, "temperature": 0,
                                                         "ignore_eos": True}).json()["choices"][0]["text"]
            for p in prompts]
    assert [results[p] for p in prompts] == solo  # batching does not change a greedy answer
    before = httpx.get(f"{lm.url}/health").json()["batches"]
    r = httpx.post(f"{lm.url}/v1/completions", json={"prompt": prompts * 5, "max_tokens": 4, "temperature": 0})
    assert len(r.json()["choices"]) == 40 and httpx.get(f"{lm.url}/health").json()["batches"] - before == 2  # 32 + 8


@pytest.mark.parametrize("path, body, status, param", [
    ("completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": "a", "max_tokens": 5000}, 400, "max_tokens"),
    ("completions", {"prompt": "a", "temperature": -1}, 400, "temperature"),
    ("completions", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "a", "n": 0}, 400, "n"),
    ("completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("completions", {"max_tokens": 4}, 400, "prompt"),
    ("completions", {"prompt": 17}, 400, "prompt"),
    ("completions", {"prompt": "a", "logprobs": 3}, 400, "logprobs"),
    ("completions", {"prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("completions", {"prompt": "a", "num_beams": 2, "stream": True}, 400, "num_beams"),
    ("completions", {"prompt": "a " * 200, "max_tokens": 8}, 400, "prompt"),
    ("completions", {"prompt": "a " * 200}, 400, "prompt"),  # unset max_tokens, but no room left at all
    ("completions", {"prompt": "red " * 28, "max_tokens": 16}, 400, "prompt"),  # 57 tokens + 16 > 64
    ("completions", '{"prompt": "a", "repetition_penalty": NaN}', 400, "repetition_penalty"),
    ("completions", '{"prompt": "a", "repetition_penalty": Infinity}', 400, "repetition_penalty"),
    ("completions", {"prompt": "a", "repetition_penalty": 1e-308}, 400, "repetition_penalty"),
    ("completions", '{"prompt": "a", "temperature": NaN}', 400, "temperature"),
    ("completions", '{"prompt": "a", "top_p": NaN}', 400, "top_p"),
    ("completions", {"prompt": "a", "seed": 2**70}, 400, "seed"),
    ("completions", {"prompt": "a", "seed": 2**70, "temperature": 0}, 400, "seed"),
    ("completions", {"prompt": "a", "seed": 1.5, "temperature": 0}, 400, "seed"),
    ("completions", {"prompt": "a", "stream": True, "stream_options": "x"}, 400, "stream_options"),
    ("completions", {"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("completions", {"prompt": "a", "stream": False, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream_options": {}}, 400,
     "stream_options"),
    ("completions", {"prompt": "a", "model": "gpt-4"}, 404, "model"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0]"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("classify", {"text": "a"}, 404, None),
    ("completions", '{"prompt": "\\ud800", "max_tokens": 2}', 400, "prompt"),  # a lone surrogate: JSON, not text
    ("chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages[0].content"),
    ("completions", {"prompt": [1, 2, 10**6]}, 400, "prompt"),  # a token id past the vocabulary
    ("completions", {"prompt": [[1, 2], "a", True]}, 400, "prompt"),
    ("completions", {"prompt": []}, 400, "prompt"),
    ("completions", {"prompt": "a", "logprobs": 0}, 400, "logprobs"),  # OpenAI: the sampled token's logprob
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     400, "response_format"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, 400,
     "tool_choice"),
    ("completions", {"prompt": "a", "foo": 1}, 400, "foo"),  # as OpenAI: an unrecognized argument
    ("completions", {"prompt": "a", "messages": []}, 400, "messages"),  # the route decides what a body holds
    ("completions", {"prompt": "a", "model": 5}, 400, "model"),
    ("completions", {"prompt": "a", "max_tokens": 2, "min_tokens": 3}, 400, "min_tokens"),
])
def test_bad_requests_get_a_json_error_naming_the_field(lm, path, body, status, param):
    raw = isinstance(body, str)  # a body as sent, where it is not JSON that httpx would write
    r = httpx.post(f"{lm.url}/v1/{path}", content=body if raw else None, json=None if raw else body,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(param or "POST /v1/classify")


def test_malformed_and_oversized_bodies(lm):
    r = httpx.post(f"{lm.url}/v1/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = httpx.post(f"{lm.url}/v1/completions", content=b"[" * 100000 + b"]" * 100000)  # past the recursion limit
    assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text
    r = httpx.post(f"{lm.url}/v1/completions", json={"prompt": "x" * (2 << 20)})
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: counted as it is read
        yield b'{"prompt": "'
        for _ in range(300):
            yield b"x" * 8192
        yield b'"}'

    r = httpx.post(f"{lm.url}/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"], r.text
    assert "Traceback" not in lm.log.read_text()
    r = httpx.get(f"{lm.url}/v2/anything")
    assert r.status_code == 404 and "routes" in r.json()["error"]["message"]
    assert httpx.get(f"{lm.url}/health").json()["status"] == "ok"  # still serving


def held_request(proc, body: bytes, *headers: str):
    """A socket whose POST /v1/completions is in flight, its handler waiting for the body: sent with ``Expect:
    100-continue`` and no body, until uvicorn answers ``100 Continue`` (which it does when the app reads the body)."""
    import socket

    host, port = proc.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=120)
    head = ["POST /v1/completions HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Expect: 100-continue", *headers]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    got = b""
    while b"\r\n\r\n" not in got:
        got += sock.recv(4096) or pytest.fail(f"connection closed: {got!r}")
    assert got.startswith(b"HTTP/1.1 100 ") and got.endswith(b"\r\n\r\n"), got
    return sock


def sigterm_and_wait_for_refusal(proc):
    """SIGTERM, then wait until a new connection is refused (a request's timeout or a dropped connection is no
    refusal)."""
    proc.send_signal(signal.SIGTERM)
    while True:
        try:
            httpx.get(f"{proc.url}/health", timeout=5)
        except httpx.ConnectError:
            return
        except httpx.TransportError:  # a connection accepted before the listener closed, then dropped
            pass
        time.sleep(0.02)


def read_to_close(sock) -> tuple[bytes, bytes]:
    """The response's head and body; a server shutting down closes the connection after it."""
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    return head, body


def test_api_key_and_sigterm_drains_a_request_in_flight(base):
    """SIGTERM closes the listener at once and answers the request in flight. The request is held in flight without
    racing the model (:func:`held_request`); its body goes only once the server refuses new connections (a long
    --drain-seconds, so a loaded machine cannot run out of drain time)."""
    import json

    with server(base, "--api-key", "s3cret", "--drain-seconds", "600") as proc:
        with pytest.raises(openai.AuthenticationError):
            client(proc, "wrong").completions.create(model="base", prompt="a", max_tokens=2)
        assert httpx.post(f"{proc.url}/v1/completions", json={"prompt": "a"}).status_code == 401
        assert httpx.get(f"{proc.url}/health").status_code == 200  # a load balancer's probe needs no key
        body = json.dumps({"prompt": ["red"] * 2, "n": 2, "max_tokens": 6, "temperature": 0,
                           "ignore_eos": True}).encode()
        with held_request(proc, body, "Authorization: Bearer s3cret") as sock:
            sigterm_and_wait_for_refusal(proc)  # the server stops accepting connections at once...
            sock.sendall(body)  # ...while the request in flight is still answered
            head, answer = read_to_close(sock)
        assert head.startswith(b"HTTP/1.1 200 "), head + answer
        assert json.loads(answer)["usage"]["completion_tokens"] == 2 * 2 * 6
        assert proc.wait(timeout=60) == 0
        assert "serve: stopped; requests in flight were answered" in proc.log.read_text()


def test_a_request_the_drain_time_cuts_off_is_logged_so(base):
    with server(base, "--drain-seconds", "0") as proc:
        with held_request(proc, b"{}") as sock:  # its body never comes
            sigterm_and_wait_for_refusal(proc)
            head, _ = read_to_close(sock)
        assert not head.startswith(b"HTTP/1.1 200 ")
        assert proc.wait(timeout=60) == 0
        log = proc.log.read_text()
        assert "1 request(s) in flight were cut off (--drain-seconds 0 ran out)" in log and "answered" not in log


def test_unknown_v1_routes_are_404_listing_the_routes_and_a_wrong_method_is_405(base):
    """An unknown path under /v1/ is a 404 listing the routes whatever the method (GET /v1/nope matched the
    POST-only /v1/{task} and was a bare 405); a known path with the wrong method is a 405 naming the allowed one."""
    with server(base, "--api-key", "k3y") as proc:
        auth = {"Authorization": "Bearer k3y"}
        assert httpx.get(f"{proc.url}/v1/nope").status_code == 401  # the key is still asked for first
        for method, path in (("GET", "/v1/nope"), ("POST", "/v1/nope"), ("DELETE", "/v1/classify"),
                             ("GET", "/v1/chat/nope"), ("PUT", "/nope")):
            r = httpx.request(method, f"{proc.url}{path}", headers=auth)
            assert r.status_code == 404, (method, path, r.text)
            message = r.json()["error"]["message"]
            assert message.startswith(f"{method} {path}: ") and \
                "routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions" in message, message
        for method, path, allowed in (("GET", "/v1/completions", "POST"), ("GET", "/v1/chat/completions", "POST"),
                                      ("POST", "/v1/models", "GET"), ("POST", "/health", "GET")):
            r = httpx.request(method, f"{proc.url}{path}", headers=auth)
            assert r.status_code == 405, (method, path, r.text)
            assert f"(allowed: {allowed})" in r.json()["error"]["message"] and r.headers["allow"] == allowed


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "red blue"}]


def template_ids(tok, messages) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out if isinstance(out, list) else out["input_ids"])  # transformers 5: a BatchEncoding


@pytest.fixture(scope="module")
def chat_model(base, tmp_path_factory) -> tuple[Path, list[int]]:
    """The base as a chat model (Llama-3 style): a tokenizer that adds BOS, a chat template that writes BOS itself,
    and a generation_config whose eos_token_id lists an end-of-turn id besides EOS: a token that greedy decoding
    of :data:`CHAT` gives after a few others (returned with them)."""
    import json
    import shutil

    import torch
    from tokenizers import processors
    from transformers import AutoTokenizer

    from gptkit import trained
    from gptkit.tokenizer import adds_bos

    folder = tmp_path_factory.mktemp("serve_chat") / "chat"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(base / name, folder / name)
    tok = AutoTokenizer.from_pretrained(base)
    bos = tok.bos_token
    tok._tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                                   special_tokens=[(bos, tok.bos_token_id)])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    model, tok = trained.load_lm(folder)
    assert adds_bos(tok)
    ids = template_ids(tok, CHAT)
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    new = out[0, len(ids):].tolist()
    k = next(i for i in range(1, len(new)) if new[i] not in new[:i] and tok.eos_token_id not in new[: i + 1])
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [tok.eos_token_id, new[k]]}))
    return folder, new[:k]


@pytest.fixture(scope="module")
def chat_lm(chat_model):
    with server(chat_model[0]) as proc:
        yield proc


def test_a_chat_template_gives_the_prompt_ids_once(chat_lm, chat_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model[0])
    ids = template_ids(tok, CHAT)
    assert ids[0] == tok.bos_token_id != ids[1]
    r = client(chat_lm).chat.completions.create(model="chat", messages=CHAT, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(ids)  # not BOS + the template's BOS + ...


@pytest.mark.parametrize("template, needle", [
    ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('roles must alternate user/assistant') }}"
     "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}", "roles must alternate user/assistant"),
    ("{% for m in messages %}{{ m['content'] }", "unexpected"),  # a template that does not compile
])
def test_a_chat_template_that_raises_is_a_400_on_messages(base, template, needle):
    from transformers import AutoTokenizer

    from gptkit.serve import requests as rq

    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = template
    for encoder in (False, True):
        with pytest.raises(rq.ApiError) as err:
            rq.chat_prompt(tok, [{"role": "assistant", "content": "hi"}], encoder)
        assert (err.value.status, err.value.param) == (400, "messages") and needle in err.value.message


def test_generation_config_eos_ids_end_the_text(chat_lm, chat_model):
    from gptkit import trained

    _, tok = trained.load_lm(chat_model[0])
    before = chat_model[1]  # what greedy decoding gives before the end-of-turn id
    want = tok.decode(before, skip_special_tokens=True)
    c = client(chat_lm)
    r = c.chat.completions.create(model="chat", messages=CHAT, max_tokens=8, temperature=0)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, "stop")
    assert r.usage.completion_tokens == len(before) + 1  # the end-of-turn id was generated: it counts, as OpenAI's
    chunks = list(c.chat.completions.create(model="chat", messages=CHAT, max_tokens=8, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    full = c.chat.completions.create(model="chat", messages=CHAT, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == 8 and full.choices[0].message.content.startswith(want)


def test_min_tokens_holds_whatever_max_tokens_a_batch_neighbour_asks(chat_model):
    """min_tokens holds back the end-of-turn id that greedy decoding gives after a few tokens, in a generate call
    shared with a request whose max_tokens is below the minimum (it lowered the call's minimum for every row)."""
    from gptkit import trained
    from gptkit.serve.engine import Choice, Engine, Job, Sampling

    model, tok = trained.load_lm(chat_model[0])
    ids, events = template_ids(tok, CHAT), {8: [], 1: []}
    jobs = [Job(events[m].append, Sampling(min_tokens=8), [Choice(0, ids, m)]) for m in (8, 1)]
    assert jobs[0].key == jobs[1].key and len(chat_model[1]) < 8
    Engine(model, tok)._run(jobs)
    assert [e[3:] for e in events[8]] == [("length", 8)] and [e[3:] for e in events[1]] == [("length", 1)]


PROMPT = "user: hi\nassistant:"  # what a chat of one user message "hi" is without a chat template
SCRIPT = " ok 世界 done 😀 more é"  # its CJK, emoji and accented characters are 2 to 4 tokens each


@pytest.fixture(scope="module")
def split_tok():
    """A byte-level BPE tokenizer that knows only the ASCII words: each byte of any other character is a token."""
    from gptkit.tokenizer import train_bpe

    tok = train_bpe([[f"{PROMPT} ok done more"] * 4], 300, 64)
    assert tok.decode(tok(SCRIPT, add_special_tokens=False)["input_ids"][:3]) == " ok \ufffd"
    return tok


def script_model(tok, prompt: str, script: str):
    """A model that answers ``script`` and then EOS to ``prompt``: a one-layer GPT-2 whose blocks add nothing, whose
    position embedding picks each position's next token and whose head reads it back."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = len(tok)
    start = len(tok(prompt, add_special_tokens=False)["input_ids"])
    ids = tok(script, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=vocab, n_layer=1, n_head=1, tie_word_embeddings=False,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.ln_f.weight.fill_(1)
        model.lm_head.weight.copy_(torch.eye(vocab))
        for i, t in enumerate(ids):
            model.transformer.wpe.weight[start - 1 + i, t] = 1
    return model.eval()


@pytest.fixture(scope="module")
def scripted(split_tok, tmp_path_factory) -> Path:
    """A model that answers :data:`SCRIPT` and then EOS to :data:`PROMPT` (:func:`script_model`)."""
    folder = tmp_path_factory.mktemp("serve_split") / "split"
    script_model(split_tok, PROMPT, SCRIPT).save_pretrained(folder)
    split_tok.save_pretrained(folder)
    return folder


def engine_texts(tok, ids: list[int], max_tokens: int, stop: tuple[str, ...]) -> tuple[list[str], str]:
    """What the engine sends when a model generates ``ids`` after :data:`PROMPT`: the streamed pieces, and the text of
    the same row not streamed."""
    import torch

    from gptkit.serve.engine import Choice, Job, Sampling, _Tracker

    events = {True: [], False: []}
    prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
    jobs = [Job(events[s].append, Sampling(), [Choice(0, prompt, max_tokens, stop)], stream=s) for s in (True, False)]
    tracker = _Tracker(tok, [(job, job.choices[0]) for job in jobs], set(), True)
    for i in range(len(ids)):
        if all(job.choices[0].done for job in jobs):
            break
        tracker(torch.tensor([[0, *ids[: i + 1]]] * 2), None)
    tracker.finish_all()
    return [e[2] for e in events[True]], events[False][0][2]


@pytest.mark.parametrize("stop", [(), ("\nuser:",), ("😀",), ("e 😀",), ("done 😀",), ("界 d", "ok 世界 done")])
def test_streamed_pieces_add_up_to_the_text_where_tokens_split_characters(split_tok, stop):
    ids = split_tok(SCRIPT, add_special_tokens=False)["input_ids"]
    for max_tokens in range(1, len(ids) + 1):
        pieces, whole = engine_texts(split_tok, ids, max_tokens, stop)
        assert "".join(pieces) == whole, (max_tokens, pieces)
        assert "\ufffd" not in "".join(pieces[:-1])  # only the last piece, at max_tokens, may end inside a character


def test_streaming_a_split_character_matches_the_completion(scripted):
    with server(scripted) as proc:
        c = client(proc)
        for stop in (None, ["done 😀"]):
            whole = c.completions.create(model="split", prompt=PROMPT, max_tokens=30, temperature=0, stop=stop)
            pieces = [ch.choices[0].text for ch in c.completions.create(
                model="split", prompt=PROMPT, max_tokens=30, temperature=0, stop=stop, stream=True)]
            assert whole.choices[0].text == (SCRIPT if stop is None else " ok 世界 ")
            assert "".join(pieces) == whole.choices[0].text and "\ufffd" not in "".join(pieces)
            chat = c.chat.completions.create(model="split", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=30, temperature=0, stop=stop)
            pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model="split", messages=[{"role": "user", "content": "hi"}], max_tokens=30, temperature=0, stop=stop,
                stream=True)]
            assert chat.choices[0].message.content == whole.choices[0].text
            assert "".join(pieces) == chat.choices[0].message.content and "\ufffd" not in "".join(pieces)


def test_new_text_continues_the_prompt_with_a_sentencepiece_tokenizer():
    """A Metaspace decoder (SentencePiece, Llama-2) drops the space of a text's first token; the new tokens are the
    text that follows the prompt, space included, streamed or not, cut by stop strings or not, and by beam search;
    in serve, and in generate / eval (generation.generate_batch and stream)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gptkit.serve.engine import Choice, Engine, Job, Sampling

    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    sp.decoder = decoders.Metaspace(prepend_scheme="first")
    sp.train_from_iterator([f"{PROMPT} ok done more"] * 4, trainers.BpeTrainer(vocab_size=60, special_tokens=[
        "<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>")
    script, prompt = " ok done more", tok(PROMPT, add_special_tokens=False)["input_ids"]
    ids = tok(script, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "ok done more" and tok.decode(prompt + ids) == PROMPT + script
    for stop, want in (((), script), (("e m",), " ok don")):
        pieces, whole = engine_texts(tok, ids, len(ids), stop)
        assert whole == "".join(pieces) == want, pieces
    engine, events = Engine(script_model(tok, PROMPT, script), tok), []
    for sampling, streams in ((Sampling(), (True, False)), (Sampling(num_beams=2), (False,))):
        engine._run([Job(events.append, sampling, [Choice(0, prompt, 8)], stream=s) for s in streams])
    texts = [e[2] for e in events]
    assert texts[-2:] == [script, script] and "".join(texts[:-2]) == script, events
    # gptkit generate and eval decode alike: "Once" + " upon", not "Onceupon"
    import io

    from gptkit import generation

    model, opts, out = script_model(tok, PROMPT, script), generation.DecodingOptions(max_new_tokens=8), io.StringIO()
    assert generation.generate_batch(model, tok, [PROMPT, PROMPT], opts) == [[script], [script]]
    assert generation.stream(model, tok, PROMPT, opts, out) == [script] and out.getvalue() == PROMPT + script + "\n"


@pytest.fixture(scope="module")
def task_runs(base, tmp_path_factory):
    from conftest import run_cli

    tmp = tmp_path_factory.mktemp("serve_tasks")
    runs = {}
    for task, make, extra in (("classify", classify3_rows, {}), ("qa", qa_rows, {"qa_mode": "extractive"}),
                              ("translate", translate_rows, {})):
        folder = tmp / task
        folder.mkdir()
        recipe = finetune_recipe(folder, "run", task, base, splits(folder, make, 64),
                                 train={"max_steps": 8, "eval_every": 8, "save_every": 8},
                                 finetune={"max_new_tokens": 8, "eval_examples": 4, **extra})
        code, _, err = run_cli("finetune", str(recipe))
        assert code == 0, err
        runs[task] = folder / "run"
    return runs


def test_task_endpoints_answer_as_the_task_predicts(task_runs):
    from gptkit import tasks, trained

    rows = {"classify": classify3_rows(3, 9), "qa": qa_rows(3, 9), "translate": translate_rows(3, 9)}
    for task, run in task_runs.items():
        model, tok, recipe = trained.load_any(str(run))
        inputs = [{k: r[k] for k in r if k in ("text", "text_pair", "question", "context", "source")}
                  for r in rows[task]]
        with server(run) as proc:
            r = httpx.post(f"{proc.url}/v1/{task}", json={"inputs": inputs}, timeout=120)
            assert r.status_code == 200, r.text
            data = r.json()["data"]
            if task == "classify":
                probs = tasks.load("classify").probabilities(model, tok, inputs, recipe)
                assert [d["label"] for d in data] == [max(p, key=p.get) for p in probs]
                for d, p in zip(data, probs):
                    assert d["probabilities"] == pytest.approx(p, abs=1e-5) and sum(p.values()) == pytest.approx(1)
            elif task == "qa":
                for d, row in zip(data, inputs):
                    assert row["context"][d["start"]:d["end"]] == d["answer"]
                assert [d["answer"] for d in data] == tasks.load("qa").predict(model, tok, inputs, recipe)
            else:
                assert [d["text"] for d in data] == tasks.load("translate").predict(model, tok, inputs, recipe)
            one = httpx.post(f"{proc.url}/v1/{task}", json=inputs[0], timeout=60)  # a single row, no "inputs"
            alone = one.json()["data"][0]
            assert one.status_code == 200 and alone.keys() == data[0].keys()
            for key, value in data[0].items():  # the same answer as in a batch of three (floats up to padding)
                assert alone[key] == (pytest.approx(value, abs=1e-4) if key in ("probabilities", "score") else value)
            missing = httpx.post(f"{proc.url}/v1/{task}", json={"inputs": [{"nothing": "x"}]})
            assert missing.status_code == 400 and missing.json()["error"]["param"].startswith("inputs[0].")
            lm_route = httpx.post(f"{proc.url}/v1/completions", json={"prompt": "a", "max_tokens": 2})
            assert lm_route.status_code == (200 if task == "translate" else 400), lm_route.text


@pytest.mark.parametrize("args, needles", [
    (["{missing}"], ["{missing}"]),
    (["{base}", "--max-batch", "0"], ["--max-batch", ">= 1"]),
    (["{base}", "--drain-seconds", "-1"], ["--drain-seconds", ">= 0"]),
    (["{base}", "--host", "203.0.113.9"], ["--host/--port", "cannot listen"]),  # not this machine's address
    (["{base}", "--wait-ms", "nan"], ["--wait-ms", "finite", "nan"]),
    (["{base}", "--drain-seconds", "nan"], ["--drain-seconds", "finite"]),
    (["{base}", "--drain-seconds", "inf"], ["--drain-seconds", "finite"]),
])
def test_bad_serve_arguments_are_one_line(base, tmp_path, args, needles):
    from conftest import assert_user_error, run_cli

    fill = {"missing": str(tmp_path / "nothing"), "base": str(base)}
    code, _, err = run_cli("serve", *(a.format(**fill) for a in args), "--port", "0")
    assert_user_error(code, err, *(n.format(**fill) for n in needles))


@pytest.mark.parametrize("port", ["-1", "65536", "70000"])
def test_a_port_out_of_range_is_one_line(base, port):
    from conftest import assert_user_error, run_cli

    code, _, err = run_cli("serve", str(base), "--port", port)
    assert_user_error(code, err, "--port", "0", "65535", port)


@pytest.mark.parametrize("hidden", ["fastapi", "uvicorn"])
def test_serve_without_its_extra_names_it(base, monkeypatch, hidden):
    from conftest import assert_user_error, run_cli

    monkeypatch.setitem(sys.modules, hidden, None)
    code, _, err = run_cli("serve", str(base), "--port", "0")
    assert_user_error(code, err, "pip install 'gptkit[serve]'")


def test_a_multitask_run_serves_each_of_its_tasks(base, tmp_path):
    import yaml

    from gptkit import tasks, trained
    from gptkit.tasks import multitask
    from tasks_helpers import summarize_rows

    (tmp_path / "tr").mkdir()
    (tmp_path / "su").mkdir()
    tr, su = splits(tmp_path / "tr", translate_rows, 64), splits(tmp_path / "su", summarize_rows, 64)
    recipe = {"task": "multitask", "model": {"init_from": str(base)},
              "finetune": {"eval_examples": 4, "max_new_tokens": 8, "tasks": [
                  {"task": "translate", "train_files": [str(tr["train"])]},
                  {"task": "summarize", "train_files": [str(su["train"])], "prompt": "{document} tldr"}]},
              "train": {"max_steps": 6, "batch_size": 8, "eval_every": 6, "save_every": 6},
              "output": {"dir": str(tmp_path / "mt")}}
    (tmp_path / "mt.yaml").write_text(yaml.safe_dump(recipe))
    from conftest import run_cli

    code, _, err = run_cli("finetune", str(tmp_path / "mt.yaml"))
    assert code == 0, err
    model, tok, run = trained.load_any(str(tmp_path / "mt"))
    with server(tmp_path / "mt") as proc:
        for i, (task, row) in enumerate((("translate", {"source": "red blue"}),
                                         ("summarize", {"document": "old new fast small"}))):
            r = httpx.post(f"{proc.url}/v1/{task}", json=row, timeout=60)
            assert r.status_code == 200, r.text
            want = tasks.load(task).predict(model, tok, [row], multitask.sub_recipe(run, i))[0]
            assert r.json()["data"][0]["text"] == want  # the task's own prompt ("{document} tldr") and decoding
        assert httpx.post(f"{proc.url}/v1/classify", json={"text": "a"}).status_code == 404


def test_sampling_a_request_leaves_out_comes_from_the_generation_config(base, tmp_path, caplog):
    """As vLLM: temperature / top_p / top_k / repetition_penalty set in the model's generation_config.json are the
    defaults of a request that leaves them out; the request's own values win; --no-generation-config and a gptkit run
    (which sets none) give OpenAI's; a value no request could give is dropped with a warning."""
    import json
    import logging
    import shutil

    from gptkit.serve import requests as rq

    model = tmp_path / "instruct"
    shutil.copytree(base, model)
    path = model / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 7,
                                "repetition_penalty": 1.1}))
    served = rq.load(str(model))
    assert served.defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 7, "repetition_penalty": 1.1}

    def sampling(body, s=served):
        return rq.generation_job(s, rq.Limits(), {"prompt": "a", **body}, ["a"], send=None)[0].sampling

    got = sampling({})
    assert got.do_sample and (got.temperature, got.top_p, got.top_k, got.repetition_penalty) == (0.6, 0.9, 7, 1.1)
    got = sampling({"temperature": 0, "repetition_penalty": None})  # the request's greedy wins; null: the default
    assert not got.do_sample and got.repetition_penalty == 1.1
    got = sampling({"top_p": 0.5, "top_k": 0})
    assert (got.temperature, got.top_p, got.top_k) == (0.6, 0.5, None)
    plain = sampling({}, rq.load(str(model), use_defaults=False))
    assert (plain.temperature, plain.top_p, plain.top_k, plain.repetition_penalty) == (1.0, 1.0, None, 1.0)
    assert rq.load(str(base)).defaults == {}
    path.write_text(json.dumps({**config, "do_sample": True, "temperature": 5.0, "top_p": 0.9}))
    with caplog.at_level(logging.WARNING, logger="gptkit"):
        assert rq.load(str(model)).defaults == {"top_p": 0.9}
    assert "generation_config.json: temperature: expected a number in [0.0, 2.0], got 5.0" in caplog.text
    path.write_text(json.dumps({**config, "do_sample": True, "top_p": 0.0, "top_k": 5}))  # a request's top_p is > 0
    with caplog.at_level(logging.WARNING, logger="gptkit"):
        assert rq.load(str(model)).defaults == {"top_k": 5}
    assert "top_p: expected a number in (0.0, 1.0], got 0.0" in caplog.text


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "red", "max_tokens": 4}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "red"}], "max_tokens": 4}),
    ("/v1/classify", {"text": "a"}),
])
def test_a_client_that_goes_away_stops_its_request(base, route, body):
    """Starlette does not cancel a handler whose client disconnected: a client that timed out and retried left its
    first job running to the end. The handler now answers the disconnect at once and the job is cancelled (the
    engine here never answers, so without that the handler would wait for ever)."""
    import asyncio
    import json

    from gptkit.serve.app import build_app
    from gptkit.serve.requests import Limits, load

    served = load(str(base), None)
    served.tasks = {"classify": None}  # the route only needs to exist: the engine below never runs anything
    jobs = []
    engine = type("Silent", (), {"submit": lambda self, job: jobs.append(job)})()
    app = build_app(served, engine, Limits())

    async def call():
        sent, messages = [], [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.sleep(0.2)  # the client waits a little, then hangs up
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": route,
                 "raw_path": route.encode(), "root_path": "", "scheme": "http", "query_string": b"",
                 "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 80)}
        await asyncio.wait_for(app(scope, receive, send), timeout=30)
        return sent

    sent = asyncio.run(call())
    assert sent[0]["status"] == 499
    assert len(jobs) == 1 and jobs[0].cancelled
