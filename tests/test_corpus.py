"""Corpora read in bounded pieces (gptkit.corpus): the token stream of the pieces equals that of the whole
documents, in every format and sample_by mode, on worker processes too; an interrupted tokenization resumes."""

from __future__ import annotations

import itertools
import json
import logging
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gptkit import corpus
from gptkit import data as data_mod
from gptkit.errors import UserError
from gptkit.recipe import DataConfig
from gptkit.tokenizer import train_bpe

WORDS = ["the", "Über", "naïve", "café", "日本語", "a", "I'm", "don't", "42", "3.14", "!!", "--", "x" * 12]
SEPS = [" ", "  ", "\n", "\n\n", "\n\n\n", " \n", "\t", "\r\n", ". ", ",\n", "\n \n", "\u00a0", "\u00a0 ", "\u3000\n"]
EOS = 0


@pytest.fixture(scope="module")
def bpe():
    text = " ".join(WORDS) * 50 + "".join(SEPS) * 20
    return train_bpe([[text]], 400, 64)


def expected(tok, text: str, sample_by: str) -> np.ndarray:
    """The stream as whole documents give it: EOS after each non-empty document."""
    text = text.replace("\r\n", "\n")
    docs = {"document": [text], "line": text.split("\n"), "paragraph": text.split("\n\n")}[sample_by]
    docs = [d for d in docs if d]
    return corpus.encode(tok.backend_tokenizer, docs, [True] * len(docs), EOS, np.uint16)


def pieces(path, tok, sample_by: str, piece: int) -> np.ndarray:
    """The stream as the tokenization workers give it: units read and encoded one by one."""
    s = corpus.Settings(sample_by=sample_by, piece=piece)
    units = corpus.plan([str(path)], s)
    assert all(u.size <= piece for u in units)
    enc = corpus.Encoder(getattr(tok, "backend_tokenizer", tok))
    out = []
    for u in units:
        texts, eos, _, continued = corpus.read(u, s, enc=enc)
        out.append(corpus.encode(enc, texts, eos, EOS, np.uint16, continued=continued))
    return np.concatenate(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from(SEPS)), min_size=1, max_size=400),
       sample_by=st.sampled_from(["document", "line", "paragraph"]), piece=st.integers(8, 700),
       window=st.sampled_from([16, 1 << 16]))
def test_pieces_tokenize_like_whole_documents(tmp_path, bpe, monkeypatch, tokens, sample_by, piece, window):
    """Cuts inside a document fall where byte-level BPE splits anyway: the ids are exactly the whole text's."""
    monkeypatch.setattr(corpus, "WINDOW", window)  # 16: lines and paragraphs longer than the window get cut
    text = "".join(w + s for w, s in tokens)
    # a window with no ASCII whitespace at all has no exact cut (the fallback cuts at a character boundary):
    # with the real 64 KiB window that takes 64 KiB without a space; with 16 bytes, "Über\u00a0xxxxxxxxxxxx"
    assume(max(map(len, re.split(rb"\s", text.encode()))) < window - 2)
    path = tmp_path / "c.txt"
    path.write_bytes(text.encode())
    assert np.array_equal(pieces(path, bpe, sample_by, piece), expected(bpe, text, sample_by))


def test_text_without_whitespace_is_cut_between_characters(tmp_path, bpe, monkeypatch):
    """No exact cut exists without whitespace in the window: the cut falls between characters, never inside one,
    so the pieces still decode to exactly the text."""
    monkeypatch.setattr(corpus, "WINDOW", 16)
    text = "Über\u00a0日本語café" * 20
    path = tmp_path / "c.txt"
    path.write_bytes(text.encode())
    ids = pieces(path, bpe, "document", 8)
    assert ids[-1] == EOS and bpe.decode(ids[:-1].tolist()) == text


def interrupt_tokenization(monkeypatch, cfg: DataConfig, tok, after: int) -> None:
    """Tokenize ``cfg.train_files`` as a run killed (Ctrl-C) after ``after`` units does, progress saved at each."""
    monkeypatch.setattr(data_mod, "PROGRESS_EVERY", 0.0)
    real = corpus.tokenize

    def killed(units, *args):
        for i, out in enumerate(real(units, *args)):
            if i == after:
                raise KeyboardInterrupt
            yield out

    monkeypatch.setattr(corpus, "tokenize", killed)
    with pytest.raises(KeyboardInterrupt):
        data_mod.token_stream(cfg.train_files, cfg, tok, "data.train_files")
    monkeypatch.setattr(corpus, "tokenize", real)


def test_cuts_with_no_exact_place_are_counted_and_reported(tmp_path, bpe, monkeypatch, caplog):
    """Tokenization says how many cuts inside documents it could not place exactly (their ids may differ from the
    whole document's); a text with whitespace everywhere has none to report."""
    monkeypatch.setattr(corpus, "WINDOW", 16)
    monkeypatch.setattr(corpus, "PIECE", 64)
    for name, text, inexact in (("none.txt", "Über\u00a0日本語café" * 40, True), ("words.txt", "naïve café 42 " * 60, False)):
        path = tmp_path / name
        path.write_text(text)
        cfg = DataConfig(train_files=[str(path)], cache_dir=str(tmp_path / "cache"), num_proc=1)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gptkit"):
            ids = data_mod.token_stream([str(path)], cfg, bpe, "data.train_files")
        assert bpe.decode(ids[:-1].tolist()) == text
        found = re.search(r"data.train_files: (\d+) cuts inside long documents found no place", caplog.text)
        s = corpus.Settings(piece=64)
        enc = corpus.Encoder(bpe.backend_tokenizer)
        cuts = sum(corpus.read(u, s, enc=enc)[3] is not None for u in corpus.plan([str(path)], s))  # inner cuts
        assert cuts > 5 and ((int(found.group(1)) == cuts) if inexact else not found), caplog.text
        counted = int(found.group(1)) if inexact else counted

    # an interrupted tokenization resumes with the count of the units it had done
    cfg = DataConfig(train_files=[str(tmp_path / "none.txt")], cache_dir=str(tmp_path / "cache2"), num_proc=1)
    interrupt_tokenization(monkeypatch, cfg, bpe, after=3)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gptkit"):
        data_mod.token_stream(cfg.train_files, cfg, bpe, "data.train_files")
    assert "resuming tokenization of data.train_files after 3 of" in caplog.text
    assert f"data.train_files: {counted} cuts inside long documents found no place" in caplog.text


def test_a_one_line_document_is_read_in_bounded_pieces(tmp_path, bpe, monkeypatch):
    """A 2 MB file with no newline at all (document and line mode): every read stays near the piece size."""
    monkeypatch.setattr(corpus, "WINDOW", 1024)
    text = ("naïve café 42 " * 150_000).strip()
    path = tmp_path / "one.txt"
    path.write_text(text)
    reads = []
    original = corpus.read

    def spy(unit, s, **kw):
        out = original(unit, s, **kw)
        reads.append(out[2])
        return out

    monkeypatch.setattr(corpus, "read", spy)
    for mode in ("document", "line"):
        reads.clear()
        assert np.array_equal(pieces(path, bpe, mode, 65536), expected(bpe, text, mode))
        assert len(reads) == -(-len(text.encode()) // 65536) and max(reads) <= 65536 + 1024


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _tokenizer(kind: str):
    """Tokenizers shaped as the hub's: Llama-2/Mistral (normalizer Prepend("▁") + Replace, no pre-tokenizer, BPE),
    Metaspace with prepend_scheme "first" (BPE) and "always" (T5-style Unigram), Llama-3 (its split regex, which
    keeps punctuation with the newlines after it, then byte-level BPE)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    text = [" ".join(WORDS) * 20 + "".join(SEPS) * 10, ". ".join(WORDS) + ".\n" + ",\n".join(WORDS)]
    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>"], unk_token="<unk>")
    elif kind == "llama3":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:  # SentencePiece's vocabulary: "▁" only at a piece's start
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"])
    tok.train_from_iterator(text, trainer)
    if kind == "llama2":  # the layout of Llama-2's tokenizer.json: the whole text is one "word" for BPE
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
    return tok


@pytest.fixture(scope="module", params=["llama2", "metaspace", "unigram", "llama3"])
def hub_style(request):
    return _tokenizer(request.param)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from(SEPS)), min_size=50, max_size=600),
       sample_by=st.sampled_from(["document", "paragraph"]), piece=st.integers(300, 600))
def test_pieces_of_sentencepiece_and_llama3_tokenizers_tokenize_like_whole_documents(tmp_path, hub_style, monkeypatch,
                                                                                      tokens, sample_by, piece):
    """A cut inside a document is checked and the piece after it is encoded behind the text before the cut:
    SentencePiece-style tokenizers used to get an extra "▁" per cut, Llama-3's a different split of ".\n"."""
    monkeypatch.setattr(corpus, "WINDOW", 256)  # cuts inside files of a few KB (the window stays below the piece)
    text = "".join(w + s for w, s in tokens)
    path = tmp_path / "c.txt"
    path.write_bytes(text.encode())
    text = text.replace("\r\n", "\n")
    docs = [d for d in ([text] if sample_by == "document" else text.split("\n\n")) if d]
    want = list(itertools.chain.from_iterable(e.ids + [EOS] for e in hub_style.encode_batch(docs)))
    assert pieces(path, hub_style, sample_by, piece).tolist() == want
    long_cell = corpus.encode(hub_style, [text], [True], EOS, np.uint32, piece=piece)  # a jsonl/parquet cell
    assert long_cell.tolist() == hub_style.encode(text).ids + [EOS]


def _layout(kind: str):
    """Tokenizer layouts found on the hub where a cut used to go wrong, with a text that meets the trouble."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

    if kind == "pegasus":  # transformers' Pegasus/DeBERTa-v2 converters: a "▁" before every word, not just the first
        tok = Tokenizer(models.Unigram([("<unk>", 0.0), ("▁a", -1.0), ("▁b", -1.0), ("a", -2.0), ("b", -2.0),
                                        ("▁", -3.0)], unk_id=0))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Metaspace(prepend_scheme="always")])
        return tok, "a b " * 30000, "document"
    if kind == "added":  # Llama-2 layout: a non-special added token gets a "▁" after it, as the text start does
        tok = Tokenizer(models.BPE({"<unk>": 0, "▁": 1, "a": 2, "b": 3, "▁a": 4, "▁b": 5}, [("▁", "a"), ("▁", "b")],
                                   unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.add_tokens([AddedToken("<x>", special=False, normalized=False)])
        return tok, "a " * 50000 + "<x>b", "document"
    if kind == "cjk":  # Llama-3's regex keeps "。\n" together and Chinese has no spaces: cut after the newline
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {c: i for i, c in enumerate(alphabet)}
        merges = [("ã", "Ģ"), ("ãĢ", "Ĥ"), ("ãĢĤ", "Ċ")]  # "。" and "。\n"
        for a, b in merges:
            vocab[a + b] = len(vocab)
        tok = Tokenizer(models.BPE(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return tok, "今天天气很好。\n" * 5000, "document"
    if kind == "paragraph":  # a token spanning "a\n": the check must see the paragraph, not the one before it
        vocab = {"<unk>": 0, "▁": 1, "a": 2, "b": 3, "x": 4, "\n": 5, "▁a": 6, "▁a\n": 7, "▁x": 8, "▁b": 9}
        tok = Tokenizer(models.BPE(vocab, [("▁", "a"), ("▁a", "\n"), ("▁", "x"), ("▁", "b")], unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        return tok, "x " * 2046 + "x\n\n" + "a\nb" + " b" * 40000, "paragraph"
    # transformers' SpmConverter: leading/trailing spaces stripped, runs of spaces squeezed (legacy: "▁▁" at start)
    tok = _tokenizer("metaspace")
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\A +| +\z"), ""),
                                           normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(" ", "▁"),
                                           normalizers.Replace(Regex(r"\A▁"), "▁▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=False)
    return tok, " ".join(itertools.islice(itertools.cycle(WORDS[:4]), 30000)), "document"


@pytest.mark.parametrize("kind", ["pegasus", "added", "cjk", "paragraph", "spm"])
def test_cuts_are_exact_for_every_hub_tokenizer_layout(tmp_path, kind):
    """The piece after a cut is encoded behind the characters before it (their ids dropped) rather than by an edited
    tokenizer: a "▁" a tokenizer puts before every word or after an added token stays, normalizers that treat the
    text start apart are covered; a CJK document is cut after a newline; the check sees only the cut's document."""
    tok, text, sample_by = _layout(kind)
    path = tmp_path / "c.txt"
    path.write_text(text)
    docs = [d for d in (text.split("\n\n") if sample_by == "paragraph" else [text]) if d]
    want = list(itertools.chain.from_iterable(e.ids + [EOS] for e in tok.encode_batch(docs)))
    assert path.stat().st_size > 4096 + corpus.WINDOW  # cut inside: the file does not end in the first window
    assert pieces(path, tok, sample_by, 4096).tolist() == want
    if sample_by == "document":
        assert corpus.encode(tok, [text], [True], EOS, np.uint32, piece=4096).tolist() == want


def test_structured_files_every_cell_of_the_text_columns_is_a_document(tmp_path, bpe):
    import pandas as pd

    rows = [{"title": f"Title {i}", "body": f"Body {i} " * (i % 7) or None, "n": i} for i in range(300)]
    jsonl, pq_path, csv = tmp_path / "d.jsonl", tmp_path / "d.parquet", tmp_path / "d.csv"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pd.DataFrame(rows).to_parquet(pq_path, row_group_size=64)
    pd.DataFrame(rows).to_csv(csv, index=False)
    docs = [str(v) for r in rows for v in (r["title"], r["body"]) if v]
    want = corpus.encode(bpe.backend_tokenizer, docs, [True] * len(docs), EOS, np.uint16)
    s = corpus.Settings(text_columns=("title", "body"), piece=997)
    for path in (jsonl, pq_path, csv):
        units = corpus.plan([str(path)], s)
        got = np.concatenate([corpus.encode(bpe.backend_tokenizer, *corpus.read(u, s)[:2], EOS, np.uint16)
                              for u in units])
        assert np.array_equal(got, want), path.name
    assert len(corpus.plan([str(pq_path)], s)) == 5  # one unit per row group


def test_bad_rows_are_named_by_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5000)) + "{oops\n")
    s = corpus.Settings(text_columns=("text",), piece=4096)
    with pytest.raises(UserError, match=r"d.jsonl: line 5001: invalid JSON"):
        for u in corpus.plan([str(path)], s):
            corpus.read(u, s)
    with pytest.raises(UserError, match=r"column 'body' not found in .*d.jsonl"):
        corpus.plan([str(path)], corpus.Settings(text_columns=("body",)))
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"fine\n" * 3000 + b"\xff\xfe broken\n")
    with pytest.raises(UserError, match=r"b.txt: line 3001: not valid UTF-8"):
        for u in corpus.plan([str(bad)], s):
            corpus.read(u, s)


def test_tokenizer_sample_is_seeded_and_bounded():
    units = [corpus.Unit("f", "text", i, 1000) for i in range(100)]
    a, b = corpus.sample(units, 10_000, seed=1), corpus.sample(units, 10_000, seed=1)
    assert a == b and sum(u.size for u in a) == 10_000 and a == sorted(a, key=lambda u: u.index)
    assert corpus.sample(units, 10_000, seed=2) != a
    assert corpus.sample(units, 10**6, seed=1) == units


def test_worker_processes_and_resume_give_the_same_stream(tmp_path, bpe, monkeypatch, caplog):
    """num_proc 2 (spawned workers) equals 1 process; a run killed mid-way resumes and ends with the same file."""
    monkeypatch.setattr(corpus, "PIECE", 4096)
    path = tmp_path / "c.txt"
    path.write_text("".join(f"{w} line {i}\n" for i, w in enumerate(WORDS * 400)))
    streams = {}
    for n in (1, 2):
        cfg = DataConfig(train_files=[str(path)], sample_by="line", cache_dir=str(tmp_path / f"cache{n}"), num_proc=n)
        streams[n] = np.array(data_mod.token_stream([str(path)], cfg, bpe, "data.train_files"))
    assert len(corpus.plan([str(path)], corpus.Settings(piece=4096))) >= corpus.POOL_MIN_UNITS
    assert np.array_equal(streams[1], streams[2])
    assert np.array_equal(streams[1], expected(bpe, path.read_text(), "line"))

    cfg = DataConfig(train_files=[str(path)], sample_by="line", cache_dir=str(tmp_path / "cache3"), num_proc=1)
    interrupt_tokenization(monkeypatch, cfg, bpe, after=5)
    streams_dir = tmp_path / "cache3" / "streams"
    assert not list(streams_dir.glob("*.bin"))  # never a half stream under the final name
    with caplog.at_level(logging.INFO, logger="gptkit.data"):
        resumed = np.array(data_mod.token_stream([str(path)], cfg, bpe, "data.train_files"))
    assert "resuming tokenization of data.train_files after 5 of" in caplog.text
    assert np.array_equal(resumed, streams[1])
    assert not list(streams_dir.glob(".*.partial")) and not list(streams_dir.glob(".*.progress.json"))


def test_prepare_fills_the_cache_then_pretrain_starts_at_once(tmp_path, caplog):
    """`gptkit pretrain --prepare` trains the tokenizer and tokenizes (for multi-process launches); the run after
    it reuses both and writes nothing it did not."""
    from conftest import SHAKESPEARE, run_cli, tiny_recipe

    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text(SHAKESPEARE.read_text()[:20_000])
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus_file, tmp_path / "run", data={"cache_dir": str(tmp_path / "cache")},
                         train={"max_steps": 2, "eval_every": 2})
    code, out, err = run_cli("pretrain", str(recipe), "--prepare")
    assert code == 0, err
    assert "prepared: 18,001 training and 2,000 validation tokens" in out, out  # 20,000 characters + EOS, 10% held out
    assert not (tmp_path / "run").exists() and list((tmp_path / "cache" / "streams").glob("*.bin"))
    with caplog.at_level(logging.INFO, logger="gptkit"):
        code, _, err = run_cli("pretrain", str(recipe))
    assert code == 0, err
    assert "using cached tokenizer" in caplog.text and "using cached tokens" in caplog.text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from(SEPS)), min_size=1, max_size=300),
       piece=st.integers(4, 300))
def test_a_long_cell_is_encoded_in_pieces_with_the_whole_cells_ids(bpe, tokens, piece):
    """A jsonl/parquet cell longer than the piece size is encoded in bounded pieces (cut before ASCII whitespace
    that follows a non-space character): the ids are exactly those of the whole cell, EOS only at its end."""
    text = "".join(w + s for w, s in tokens)
    assume(max(map(len, re.split(r"[ \t\n\r\f\v]", text))) < piece)  # an exact cut within reach of every target
    calls = []
    tok = bpe.backend_tokenizer

    class Spy:
        def encode_batch_fast(self, batch, **kw):
            calls.append(sum(map(len, batch)))
            return tok.encode_batch_fast(batch, **kw)

    got = corpus.encode(Spy(), [text, "the end"], [True, True], EOS, np.uint16, piece=piece)
    whole = tok.encode_batch_fast([text, "the end"], add_special_tokens=False)
    assert got.tolist() == whole[0].ids + [EOS] + whole[1].ids + [EOS]
    assert max(calls) < 2 * piece + corpus.WINDOW  # every batch about one piece: memory follows the piece size


def test_a_long_cell_never_reaches_the_tokenizer_whole(bpe, monkeypatch):
    """42 KB in one cell, pieces of 64 characters: no encode call sees more than two pieces and a window."""
    monkeypatch.setattr(corpus, "WINDOW", 16)
    text = "naïve café 42 " * 3000
    calls = []
    tok = bpe.backend_tokenizer

    class Spy:
        def encode_batch_fast(self, batch, **kw):
            calls.append(sum(map(len, batch)))
            return tok.encode_batch_fast(batch, **kw)

    got = corpus.encode(Spy(), [text], [True], EOS, np.uint16, piece=64)
    assert got.tolist() == tok.encode_batch_fast([text], add_special_tokens=False)[0].ids + [EOS]
    assert len(calls) > 100 and max(calls) < 2 * 64 + 16


def test_parquet_units_are_sized_by_their_uncompressed_text(tmp_path):
    import pandas as pd

    rows = [{"text": "the same caption again " * 20, "n": i} for i in range(2000)]
    path = tmp_path / "d.parquet"
    pd.DataFrame(rows).to_parquet(path, row_group_size=500)  # repetitive text compresses to almost nothing
    units = corpus.plan([str(path)], corpus.Settings())
    text_bytes = sum(len(r["text"].encode()) for r in rows)
    assert len(units) == 4 and 0.9 < sum(u.size for u in units) / text_bytes < 1.2
    assert path.stat().st_size < text_bytes / 10


def _long_rows(path, n_rows: int, row_chars: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    rows = ["".join(rng.choice(list("abcdefgh "), row_chars)) for _ in range(n_rows)]
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return "".join(rows)


def test_tokenizer_sample_of_rows_longer_than_the_piece_holds_text(tmp_path, monkeypatch):
    """Rows of ~5 pieces: only the unit holding a row's start holds text (all of the row). The sample draws on until
    it holds about the budget of real rows, and says how many bytes it holds; it used to pick units by their nominal
    size, most of them empty (a tokenizer trained on nothing)."""
    monkeypatch.setattr(corpus, "PIECE", 1024)  # as pretrain.tokenizer_for calls it: Settings(piece=corpus.PIECE)
    path = tmp_path / "d.jsonl"
    _long_rows(path, 3, 5000)
    s = corpus.Settings(piece=1024)
    units = corpus.plan([str(path)], s)
    assert len(units) == 15
    for seed in range(6):
        chosen = corpus.sample(units, 1024, seed)
        got = sum(len(t) for batch in corpus.texts(chosen, s) for t in batch)
        assert got >= 1024, (seed, chosen)
        assert [u.size for u in chosen] == [corpus.read(u, s)[2] for u in chosen] and all(u.size for u in chosen)
    two = corpus.sample(units, 6000, seed=1)  # about the budget: two whole rows, not all three
    assert len(two) == 2 and sum(u.size for u in two) == 2 * 5013


def test_measured_jsonl_units_are_the_units_read_and_each_byte_is_scanned_about_once(tmp_path, monkeypatch):
    """Units drawn in any order measure exactly the bytes read() reads of them; one 300 KB line cut into 300 units is
    scanned about once (the sampler's scans stop where an earlier one started), not once per unit."""
    rng = np.random.default_rng(0)
    path = tmp_path / "d.jsonl"
    lengths = [int(x) for x in rng.choice([1, 5, 40, 300, 3000], 120)]
    path.write_text("".join(json.dumps({"text": "x" * k}) + "\n" for k in lengths))
    for piece in (7, 64, 1000):
        s = corpus.Settings(piece=piece)
        units = corpus.plan([str(path)], s)
        starts = corpus._LineStarts(piece)
        order = rng.permutation(len(units))
        spans = {int(i): starts.span(units[i]) for i in order}
        starts.close()
        assert [spans[i] for i in range(len(units))] == [corpus.read(u, s)[2] for u in units]

    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "y" * 300_000}) + "\n" + json.dumps({"text": "end"}) + "\n")
    units = corpus.plan([str(big)], corpus.Settings(piece=1024))
    read_bytes = _count_reads(monkeypatch)  # the sampler's scans
    chosen = corpus.sample(units, 10, seed=3, piece=1024)
    assert chosen and all(u.size for u in chosen)
    assert sum(read_bytes) < 2 * big.stat().st_size


def _count_reads(monkeypatch) -> list[int]:
    """The sizes of every read corpus makes from a file it opens, from now on."""
    read_bytes: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, *a):
            self.fh = real_open(*a)

        def read(self, n=-1):
            out = self.fh.read(n)
            read_bytes.append(len(out))
            return out

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def __getattr__(self, name):
            return getattr(self.fh, name)

    monkeypatch.setattr(corpus, "open", Counting, raising=False)
    return read_bytes


def test_tokenizing_a_line_of_many_pieces_reads_it_about_twice_and_gives_its_ids(tmp_path, bpe, monkeypatch):
    """A 400 KB JSON line in 1 KB units: each unit used to scan from its start to the line's end for its cuts (400
    units x 200 KB on average); a tokenization pass shares its line starts, so the file is read about twice (one scan,
    one read of the row), and the ids are the row's."""
    row = " ".join(itertools.islice(itertools.cycle(WORDS), 60_000))
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"text": "first"}) + "\n" + json.dumps({"text": row}) + "\n"
                    + json.dumps({"text": "last"}) + "\n")
    s = corpus.Settings(piece=1024)
    units = corpus.plan([str(path)], s)
    assert len(units) > 300
    read_bytes = _count_reads(monkeypatch)
    got = np.concatenate([ids for ids, *_ in corpus.tokenize(units, s, bpe.backend_tokenizer.to_str(), EOS, "uint16",
                                                             1)])
    assert sum(read_bytes) < 2.2 * path.stat().st_size
    want = corpus.encode(bpe.backend_tokenizer, ["first", row, "last"], [True] * 3, EOS, np.uint16)
    assert np.array_equal(got, want)


def test_a_sample_without_text_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", None, ""] * 10))
    s = corpus.Settings()
    with pytest.raises(UserError, match=r"^data.train_files: no text in .*d.jsonl to train the tokenizer on"):
        list(corpus.texts(corpus.plan([str(path)], s), s))


@pytest.mark.parametrize("cell,kind", [(["a", "b"], "an array"), ({"a": 1}, "an object"), (123, "a number"),
                                       (True, "a boolean")])
def test_a_text_cell_that_is_not_a_string_is_named_by_file_line_and_column(tmp_path, cell, kind):
    """It used to be trained on as its Python repr ("['a', 'b']"). null is skipped as before."""
    path = tmp_path / "d.jsonl"
    rows = [{"title": "one", "body": None}, {"title": "two", "body": "text"}, {"title": "three", "body": cell}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = corpus.Settings(text_columns=("title", "body"))
    with pytest.raises(UserError, match=rf"d.jsonl: line 3: column 'body': expected a string \(or null\), got {kind}"):
        for u in corpus.plan([str(path)], s):
            corpus.read(u, s)
    array = tmp_path / "a.json"  # a JSON array (read through datasets): named by row
    array.write_text(json.dumps([{"text": cell}, {"text": cell}]))
    with pytest.raises(UserError, match=r"a.json: row 0 \(from 0\): column 'text': expected a string"):
        for u in corpus.plan([str(array)], corpus.Settings()):
            corpus.read(u, corpus.Settings())


def test_a_parquet_text_column_that_is_not_strings_is_one_error(tmp_path):
    import pandas as pd

    path = tmp_path / "d.parquet"
    pd.DataFrame({"text": [1, 2, 3], "s": ["a", None, "b"]}).to_parquet(path)
    with pytest.raises(UserError, match=r"d.parquet: column 'text': expected a string column, got int64"):
        corpus.plan([str(path)], corpus.Settings())
    # strings, categories and all-null columns are text
    pd.DataFrame({"text": pd.Categorical(["x y", "z"]), "s": [None, None]}).to_parquet(path)
    s = corpus.Settings(text_columns=("text", "s"))
    assert [t for u in corpus.plan([str(path)], s) for t in corpus.read(u, s)[0]] == ["x y", "z"]


def test_an_empty_corpus_is_one_error_and_never_cached(tmp_path, bpe):
    """0 tokens used to be cached as an empty stream that np.memmap cannot map: every later run crashed."""
    import pandas as pd

    empty = tmp_path / "e.parquet"
    pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(empty)
    with pytest.raises(UserError, match=r"e.parquet: no rows"):
        corpus.plan([str(empty)], corpus.Settings())
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", None] * 5))
    cfg = DataConfig(train_files=[str(path)], cache_dir=str(tmp_path / "cache"), num_proc=1)
    for _ in range(2):  # the second run reads the files again and says the same
        with pytest.raises(UserError, match=r"^data.train_files: no text in .*d.jsonl: it gives 0 tokens"):
            data_mod.token_stream([str(path)], cfg, bpe, "data.train_files")
        assert [p.name for p in (tmp_path / "cache" / "streams").iterdir() if not p.name.endswith(".lock")] == []


def test_special_token_text_in_a_document_is_ordinary_text(tmp_path, bpe, monkeypatch):
    """A literal "<|endoftext|>" in a document is its characters, as tiktoken's encode_ordinary reads it: EOS only
    between documents. Only the corpus encoding does so (prompts still get the special token), and the stream cache
    key changed with it (a stream cached before holds EOS mid-document)."""
    docs = ["one <|endoftext|> two", "<|endoftext|>", "three<|endoftext|>"]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    cfg = DataConfig(train_files=[str(path)], cache_dir=str(tmp_path / "cache"), num_proc=1)
    ids = data_mod.token_stream([str(path)], cfg, bpe, "data.train_files").tolist()
    eos = bpe.eos_token_id
    ends = [i for i, t in enumerate(ids) if t == eos]
    assert len(ends) == 3 and ends[-1] == len(ids) - 1
    assert [bpe.decode(ids[a + 1 : b]) for a, b in itertools.pairwise([-1, *ends])] == docs
    assert bpe("a<|endoftext|>", add_special_tokens=False)["input_ids"][-1] == eos  # prompts keep special tokens
    key = data_mod._cache_key([str(path)], cfg, bpe)
    monkeypatch.setattr(data_mod, "STREAM_FORMAT", 1)
    assert data_mod._cache_key([str(path)], cfg, bpe) != key


def test_a_tokenizer_saved_with_truncation_padding_or_another_eos_gives_its_own_whole_stream(tmp_path, bpe):
    """A tokenizer.json saved after a call with truncation=True / padding=True carries those settings: the workers
    rebuilt the tokenizer from it and cut every unit to max_length (or padded it). And two tokenizers sharing one
    tokenizer.json but naming another EOS (a base and its instruct variant) shared one cached stream."""
    import json as json_

    from transformers import AutoTokenizer

    path = tmp_path / "c.txt"
    path.write_text("".join(f"{w} line {i}\n" for i, w in enumerate(WORDS * 40)))
    cfg = DataConfig(train_files=[str(path)], sample_by="line", cache_dir=str(tmp_path / "cache"), num_proc=1)
    bpe.save_pretrained(tmp_path / "plain")  # (the fixture is shared: changed only as a copy)
    plain = AutoTokenizer.from_pretrained(tmp_path / "plain")
    plain.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    plain.pad_token = plain.eos_token
    plain.save_pretrained(tmp_path / "plain")
    plain = AutoTokenizer.from_pretrained(tmp_path / "plain")
    want = np.array(data_mod.token_stream([str(path)], cfg, plain, "data.train_files"))
    assert np.array_equal(want, expected(plain, path.read_text(), "line"))
    plain(["some text here", "more"], truncation=True, max_length=4, padding="max_length")  # left on the backend
    plain.save_pretrained(tmp_path / "cutting")
    saved = json_.loads((tmp_path / "cutting" / "tokenizer.json").read_text())
    assert saved["truncation"] and saved["padding"]
    cutting = AutoTokenizer.from_pretrained(tmp_path / "cutting")
    assert np.array_equal(np.array(data_mod.token_stream([str(path)], cfg, cutting, "data.train_files")), want)
    same = AutoTokenizer.from_pretrained(tmp_path / "plain")
    config = json_.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    (tmp_path / "plain" / "tokenizer_config.json").write_text(json_.dumps({**config, "eos_token": "<|eot|>"}))
    other = AutoTokenizer.from_pretrained(tmp_path / "plain")
    assert other.backend_tokenizer.to_str() == same.backend_tokenizer.to_str() and other.eos_token_id != EOS
    stream = np.array(data_mod.token_stream([str(path)], cfg, other, "data.train_files"))
    assert (stream == other.eos_token_id).sum() == len(want[want == EOS]) and not (stream == EOS).any()


def test_thousands_of_jsonl_shards_keep_few_files_open(tmp_path, bpe):
    """Every JSON-lines file's handle stayed open to the end of a pass: a corpus of ~1000 shards ran out of file
    descriptors (ulimit -n 1024). At most _LineStarts.OPEN are open at once now."""
    import resource

    files = []
    for i in range(60):
        files.append(tmp_path / f"s{i:03d}.jsonl")
        files[-1].write_text("".join(json.dumps({"text": f"{w} shard {i}"}) + "\n" for w in WORDS))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, hard))  # fewer than the shards
    try:
        cfg = DataConfig(train_files=[str(f) for f in files], cache_dir=str(tmp_path / "cache"), num_proc=1)
        units = corpus.plan(cfg.train_files, corpus.Settings(piece=64))
        assert len(list(corpus.texts(units, corpus.Settings(piece=64)))) == len(units)
        stream = np.array(data_mod.token_stream(cfg.train_files, cfg, bpe, "data.train_files"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (stream == EOS).sum() == 60 * len(WORDS)


def test_a_torn_or_foreign_parquet_file_is_one_error(tmp_path):
    import pandas as pd

    path = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["a b c"] * 100}).to_parquet(path)
    whole = path.read_bytes()
    for content in (b"not parquet at all", whole[: len(whole) // 2], whole[:-20]):
        path.write_bytes(content)
        with pytest.raises(UserError, match=r"d.parquet: not a readable parquet file \("):
            corpus.plan([str(path)], corpus.Settings())
