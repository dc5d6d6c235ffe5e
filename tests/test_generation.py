"""Tests for gptkit.generation: tiny models and a character-level tokenizer built in code, offline."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from gptkit.errors import UserError
from gptkit.generation import DecodingOptions, generate_batch, stream
from gptkit.trained import load_lm as load_for_generation

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'\n0123456789"))
PROMPTS = ["a", "hello world", "The cat sat on the mat.", "xyz", "Once upon a time there was", "q", "", "ab cd"]
MEMO = "the quick brown fox jumps over the lazy dog."


def make_tokenizer(pad: bool = False) -> PreTrainedTokenizerFast:
    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    if pad:
        tok.pad_token = tok.eos_token
    return tok


def make_model(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(CHARS) + 1,
               bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    return GPT2LMHeadModel(GPT2Config(**{**cfg, **overrides})).eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(pad=True)


@pytest.fixture(scope="module")
def model():
    return make_model()


def greedy(n: int = 12) -> DecodingOptions:
    return DecodingOptions(max_new_tokens=n, min_new_tokens=n)


def generate_alone(model, tok, prompt: str, **kwargs) -> list[str]:
    """Plain model.generate on one prompt, no padding: the reference for the batched path."""
    ids = tok(prompt)["input_ids"] or [tok.eos_token_id]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kwargs)
    return tok.batch_decode(out[:, len(ids):], skip_special_tokens=True)


def sequence_logprob(model, tok, prompt: str, continuation: str) -> float:
    prompt_ids, new_ids = tok(prompt)["input_ids"], tok(continuation)["input_ids"]
    ids = torch.tensor([prompt_ids + new_ids])
    with torch.no_grad():
        logprobs = model(ids).logits.log_softmax(-1)[0, len(prompt_ids) - 1 : -1]
    return logprobs.gather(-1, torch.tensor(new_ids)[:, None]).sum().item()


# --- batching, padding, order ----------------------------------------------------------------------


def test_greedy_is_batch_size_invariant_and_matches_unpadded_generate(model, tok):
    one = generate_batch(model, tok, PROMPTS, greedy(), batch_size=1)
    eight = generate_batch(model, tok, PROMPTS, greedy(), batch_size=8)
    three = generate_batch(model, tok, PROMPTS, greedy(), batch_size=3)
    alone = [generate_alone(model, tok, p, max_new_tokens=12, min_new_tokens=12, do_sample=False) for p in PROMPTS]
    assert one == eight == three == alone
    assert all(len(texts) == 1 and len(texts[0]) == 12 for texts in eight)


def test_results_come_back_in_original_order(model, tok):
    prompts = ["a much longer prompt than the others", "b", "medium one", "zz"]
    batched = generate_batch(model, tok, prompts, greedy(), batch_size=4)
    singles = [generate_batch(model, tok, [p], greedy())[0] for p in prompts]
    assert len({texts[0] for texts in singles}) == len(prompts)  # distinct outputs, so a permutation shows
    assert batched == singles


def test_padding_side_and_pad_token_are_restored(model):
    tok = make_tokenizer(pad=False)
    tok.padding_side = "right"
    generate_batch(model, tok, ["abc", "a"], greedy(3))
    assert tok.padding_side == "right" and tok.pad_token is None


def test_empty_prompt_list_and_bad_batch_size(model, tok):
    assert generate_batch(model, tok, [], greedy()) == []
    with pytest.raises(UserError, match="batch_size"):
        generate_batch(model, tok, ["a"], greedy(), batch_size=0)


def test_overlong_prompt_keeps_its_end(model, tok):
    prompt = "abcdefghij" * 10  # 100 chars > n_positions=64
    with pytest.warns(UserWarning, match="keeping the last 54"):
        (text,), = generate_batch(model, tok, [prompt], greedy(10))
    assert text == generate_alone(model, tok, prompt[-54:], max_new_tokens=10, min_new_tokens=10)[0]


# --- decoding strategies -----------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_seed_dependent(model, tok):
    def run(seed):
        return generate_batch(model, tok, PROMPTS, DecodingOptions(do_sample=True, seed=seed, max_new_tokens=16))

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_1_sampling_equals_greedy(model, tok):
    sampled = generate_batch(model, tok, PROMPTS, DecodingOptions(do_sample=True, top_k=1, seed=5, max_new_tokens=12,
                                                                  min_new_tokens=12, temperature=0.7))
    assert sampled == generate_batch(model, tok, PROMPTS, greedy())


def test_num_return_sequences(model, tok):
    sampled = generate_batch(model, tok, ["ab", "hello"], DecodingOptions(do_sample=True, num_return_sequences=3,
                                                                           seed=0, max_new_tokens=8))
    assert [len(texts) for texts in sampled] == [3, 3]
    assert all(len(set(texts)) > 1 for texts in sampled)
    beams = generate_batch(model, tok, ["ab", "hello"], DecodingOptions(num_beams=4, num_return_sequences=2,
                                                                         max_new_tokens=8))
    assert [len(texts) for texts in beams] == [2, 2]


def test_beam_search_matches_generate_and_beats_greedy(model, tok):
    options = DecodingOptions(num_beams=4, max_new_tokens=12, min_new_tokens=12)
    beams = generate_batch(model, tok, PROMPTS, options, batch_size=3)
    direct = [generate_alone(model, tok, p, num_beams=4, max_new_tokens=12, min_new_tokens=12, do_sample=False)
              for p in PROMPTS]
    assert beams == direct
    greedy_out = generate_batch(model, tok, PROMPTS, greedy())
    differs = 0
    for prompt, (beam,), (best_greedy,) in zip(PROMPTS, beams, greedy_out):
        prompt = prompt or "<eos>"
        beam_lp = sequence_logprob(model, tok, prompt, beam)
        assert beam_lp >= sequence_logprob(model, tok, prompt, best_greedy) - 1e-4
        differs += beam != best_greedy
    assert differs > 0  # otherwise beam search was not actually used


def repeating_model() -> GPT2LMHeadModel:
    """Whatever the input, logits are 5 for 'a', 4 for 'b' and 0 elsewhere: greedy says 'aaaa...'."""
    model = make_model(tie_word_embeddings=False)
    a, b = CHARS.index("a") + 1, CHARS.index("b") + 1
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[a] = 5.0 / model.config.n_embd
        model.lm_head.weight[b] = 4.0 / model.config.n_embd
    return model


def test_repetition_penalty_changes_output_on_a_repeating_model(tok):
    model = repeating_model()
    assert generate_batch(model, tok, ["xyz"], greedy(6)) == [["aaaaaa"]]
    # a: 5 -> 2.5 once generated, so b (4) wins once, then b: 4 -> 2 and a wins again for good.
    penalised = DecodingOptions(max_new_tokens=6, min_new_tokens=6, repetition_penalty=2.0)
    assert generate_batch(model, tok, ["xyz"], penalised) == [["abaaaa"]]


# --- a model that learned something -------------------------------------------------------------


@pytest.fixture(scope="module")
def memorised(tok):
    """A tiny model trained until it reproduces MEMO followed by EOS."""
    model = make_model(seed=1, initializer_range=0.02)
    ids = torch.tensor([tok(MEMO)["input_ids"] + [tok.eos_token_id]])
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        loss = model(ids, labels=ids).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        if loss.item() < 0.02:
            break
    return model.eval()


def test_memorised_string_is_continued_exactly_and_stops_at_eos(memorised, tok):
    prompts = ["the quick", "the quick brown fox", "the"]  # longest + max_new_tokens fits n_positions=64
    out = generate_batch(memorised, tok, prompts, DecodingOptions(max_new_tokens=45), batch_size=3)
    assert out == [[MEMO[len(p):]] for p in prompts]


def test_stream_writes_tokens_as_they_come(memorised, tok):
    writes = []

    class Recorder(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)

    out = Recorder()
    texts = stream(memorised, tok, "the quick", DecodingOptions(max_new_tokens=45), out=out)
    assert texts == [MEMO[len("the quick"):]]
    assert out.getvalue() == "the quick" + texts[0] + "\n"  # the prompt, then its continuation
    assert len([w for w in writes if w.strip()]) > 3  # word by word, not all at the end


def test_stream_several_samples_prints_headers(model, tok):
    out = io.StringIO()
    options = DecodingOptions(do_sample=True, num_return_sequences=2, seed=3, max_new_tokens=10)
    texts = stream(model, tok, "hello", options, out=out)
    assert len(texts) == 2
    assert out.getvalue() == f"=== sample 1/2 ===\nhello{texts[0]}\n=== sample 2/2 ===\nhello{texts[1]}\n"
    assert texts == generate_batch(model, tok, ["hello"], options)[0]


def test_beams_within_the_context_say_where_the_prompt_was_cut(model, tok, caplog):
    """Beams and several samples run in one call inside the 64-position context: a prompt that does not fit beside
    the new tokens is continued from its last tokens, and the printed prompt says so (it printed the whole prompt,
    as if the samples continued all of it, and only a raw UserWarning told); more new tokens than the context is one
    line naming the flag."""
    from gptkit.errors import UserError

    out, prompt = io.StringIO(), "abcdefgh" * 6  # 48 tokens + 24 new > 64
    options = DecodingOptions(num_beams=2, max_new_tokens=24, min_new_tokens=24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level("WARNING", logger="gptkit"):
            texts = stream(model, tok, prompt, options, out=out)
    assert "the samples continue its last 40" in caplog.text
    assert out.getvalue() == f"=== sample 1/1 ===\n...{prompt[-40:]}{texts[0]}\n"
    with pytest.raises(UserError, match="--max-new-tokens 64: beams and several samples"):
        stream(model, tok, "a", DecodingOptions(num_beams=2, max_new_tokens=64), out=out)


# --- options and loading -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(num_return_sequences=2), "num_return_sequences"),
        (dict(do_sample=True, num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=4, min_new_tokens=5), "min_new_tokens"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=1e-308), "repetition_penalty"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty"),
        (dict(do_sample=True, seed=2**70), "seed"),
        (dict(seed=-1), "seed"),
    ],
)
def test_validate_rejects_impossible_options(kwargs, field):
    with pytest.raises(UserError, match=field) as info:
        DecodingOptions(**kwargs).validate()
    assert "\n" not in str(info.value)


def test_validate_accepts_sensible_options():
    DecodingOptions().validate()
    DecodingOptions(do_sample=True, temperature=0.7, top_k=40, top_p=0.9, num_return_sequences=4).validate()
    DecodingOptions(num_beams=4, num_return_sequences=4).validate()


def test_generate_kwargs_only_pass_sampling_params_when_sampling(tok):
    greedy_kwargs = DecodingOptions(temperature=0.5, top_k=3).to_generate_kwargs(tok)
    assert not {"temperature", "top_k", "top_p"} & greedy_kwargs.keys()
    assert greedy_kwargs["pad_token_id"] == greedy_kwargs["eos_token_id"] == tok.eos_token_id
    sample_kwargs = DecodingOptions(do_sample=True, temperature=0.5).to_generate_kwargs(tok)
    assert (sample_kwargs["temperature"], sample_kwargs["top_k"], sample_kwargs["top_p"]) == (0.5, 0, 1.0)


def test_load_for_generation_rejects_what_it_cannot_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="is no local directory, is not in the local Hugging Face cache .*hf download"):
        load_for_generation("gpt2")  # the test session's cache is empty and HF_HUB_OFFLINE=1 (conftest)
    with pytest.raises(UserError, match="neither a local directory nor a Hugging Face hub id"):
        load_for_generation(str(tmp_path / "missing"))


def test_load_for_generation_needs_config_and_tokenizer(tmp_path, model):
    model.save_pretrained(tmp_path / "no_tok")
    with pytest.raises(UserError, match="no tokenizer files"):
        load_for_generation(tmp_path / "no_tok")
    make_tokenizer().save_pretrained(tmp_path / "no_config")
    with pytest.raises(UserError, match="no config.json"):
        load_for_generation(tmp_path / "no_config")


def test_load_for_generation_round_trip(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    make_tokenizer(pad=False).save_pretrained(tmp_path / "m")
    loaded, tok = load_for_generation(tmp_path / "m")
    assert not loaded.training
    assert tok.pad_token == tok.eos_token == "<eos>"
    expected = generate_batch(model, make_tokenizer(pad=True), PROMPTS, greedy())
    assert generate_batch(loaded, tok, PROMPTS, greedy()) == expected


def test_stream_slides_past_the_context(model, tok):
    """More new tokens than the context holds: generation continues on a sliding window."""
    limit = model.config.max_position_embeddings
    out = io.StringIO()
    options = DecodingOptions(max_new_tokens=limit * 2 + 5, min_new_tokens=limit * 2 + 5)
    texts = stream(model, tok, "ab", options, out=out)
    assert len(tok(texts[0])["input_ids"]) == limit * 2 + 5
    assert out.getvalue() == "ab" + texts[0] + "\n"


def test_stream_keeps_the_whole_prompt_while_the_context_holds_it(model, tok):
    """A 38-token prompt + 40 new tokens in a 64-token context: the first 26 tokens see the whole prompt (as one
    plain generate call does), the rest slide; nothing is cut to leave room for all 40 at once."""
    prompt = ("the cat sat on a mat, " * 3)[:38]
    out = io.StringIO()
    texts = stream(model, tok, prompt, DecodingOptions(max_new_tokens=40, min_new_tokens=40), out=out)
    assert texts[0][:26] == generate_alone(model, tok, prompt, max_new_tokens=26, min_new_tokens=26, do_sample=False)[0]
    assert len(tok(texts[0])["input_ids"]) == 40 and out.getvalue() == prompt + texts[0] + "\n"


def test_generation_config_eos_ids_end_the_text(tok):
    """A chat model lists end-of-turn ids in generation_config.eos_token_id: batched and streamed generation stop
    at any of them, as plain transformers generate does (which gptkit's explicit kwargs used to override)."""
    model = make_model()
    greedy_ids = tok(generate_alone(model, tok, "ab", max_new_tokens=12, do_sample=False)[0])["input_ids"]
    k = next(i for i in range(1, len(greedy_ids)) if greedy_ids[i] not in greedy_ids[:i])
    model.generation_config.eos_token_id = [tok.eos_token_id, greedy_ids[k]]
    expected = tok.decode(greedy_ids[: k + 1])  # up to and with the end-of-turn token (special ones are skipped)
    assert generate_batch(model, tok, ["ab"], DecodingOptions(max_new_tokens=12)) == [[expected]]
    assert stream(model, tok, "ab", DecodingOptions(max_new_tokens=12), out=io.StringIO()) == [expected]


def test_seeded_sampling_leaves_the_callers_random_state_alone(model, tok):
    """Sampled validation inside a training loop must not reset the loop's RNG (dropout, later sampling)."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_batch(model, tok, PROMPTS, DecodingOptions(max_new_tokens=4, do_sample=True, seed=7))
    assert torch.equal(torch.rand(3), expected)


def test_temperature_0_is_greedy_as_in_serve(tmp_path, model):
    """`gptkit generate --temperature 0` decodes greedily (OpenAI's semantics, which serve follows) instead of
    refusing; a negative temperature is still one line."""
    from conftest import assert_user_error, run_cli
    from gptkit.generation import sampling_rule

    assert sampling_rule(True, 0) == sampling_rule(True, 0.0) == (False, 1.0)
    assert sampling_rule(False, 0.7) == (True, 0.7) and sampling_rule(False, None) == (False, 1.0)
    assert sampling_rule(True, None) == (True, 1.0)
    model.save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    args = ["generate", str(tmp_path / "m"), "--prompt", "hello", "--max-new-tokens", "10"]
    code, greedy_out, err = run_cli(*args)
    assert code == 0, err
    for extra in (["--temperature", "0"], ["--temperature", "0", "--top-k", "5", "--seed", "3"], ["--sample",
                                                                                                   "--temperature", "0"]):
        code, out, err = run_cli(*args, *extra)
        assert code == 0, err
        assert out == greedy_out
    assert_user_error(*run_cli(*args, "--temperature", "-1")[::2], "temperature")
