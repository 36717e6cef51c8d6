"""Data sources against references built by hand: byte literals, direct slices of the
stream, hand-written masks, and for markov an empirical estimate and a dense eigen-solve."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from effc.runtime import data as D


def write(tmp_path: Path, name: str, content: bytes | str) -> str:
    (tmp_path / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return name


def jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def numbered(n: int) -> D.Split:
    """A stream whose token at position i is i, so a window names itself: x[0] = w*seq."""
    return D.Split(torch.arange(n), None)


def error(source: str, args: dict, base: Path) -> D.DataError:
    with pytest.raises(D.DataError) as e:
        D.load_data(source, args, base)
    return e.value


# ---------------------------------------------------------------- text


def test_text_tokens_are_the_files_bytes(tmp_path):
    raw = "héllo, wörld\n".encode() * 40  # 15 bytes a line (é and ö are two bytes each)
    ds = D.load_data("text", {"path": write(tmp_path, "t.txt", raw), "seq": 8}, tmp_path)
    assert ds.vocab == 256 and ds.seq == 8 and ds.entropy_rate is None and ds.train.mask is None
    stream = ds.train.tokens.tolist() + ds.validation.tokens.tolist()
    assert stream == list(raw)
    assert stream[1:3] == [0xC3, 0xA9]  # é
    assert ds.train.tokens.dtype == torch.int64


def test_text_split_is_last_5_percent_or_one_window(tmp_path):
    raw = bytes(range(256)) * 4  # N = 1024: 5% is 51 tokens, more than seq+1 = 9
    ds = D.load_data("text", {"path": write(tmp_path, "a.txt", raw), "seq": 8}, tmp_path)
    assert ds.train.tokens.tolist() == list(raw[:1024 - 51])
    assert ds.validation.tokens.tolist() == list(raw[-51:])
    ds = D.load_data("text", {"path": "a.txt", "seq": 100}, tmp_path)  # 5% < seq+1 = 101
    assert ds.validation.tokens.tolist() == list(raw[-101:])
    assert ds.train.tokens.numel() == 1024 - 101


def test_the_checkers_static_vocab_matches_the_loaded_data(tmp_path):
    """The checker compares registry.data_vocab with the model's vocab without reading a
    file: it must agree with what loading produces, and every token id must be below it."""
    from effc.lang.registry import data_vocab

    (tmp_path / "t.txt").write_bytes(bytes(range(256)) * 4)
    for source, args in (("text", {"path": "t.txt", "seq": 8, "tokenizer": "bytes"}),
                         ("markov", {"seq": 8, "seed": 0, "vocab": 10})):
        ds = D.load_data(source, args, tmp_path)
        assert ds.vocab == data_vocab(source, args)
        assert int(ds.train.tokens.max()) < ds.vocab
    assert data_vocab("text", {"path": "does/not/exist.txt", "seq": 8}) == 256


# ---------------------------------------------------------------- windows and batches


def test_windows_count():
    assert D.windows(numbered(9), 8) == 1
    assert D.windows(numbered(16), 8) == 1  # the second window would need token 16
    assert D.windows(numbered(17), 8) == 2
    assert D.windows(numbered(101), 4) == 25


def test_batch_is_a_slice_of_the_stream_shifted_by_one():
    tokens = torch.randint(0, 256, (203,), generator=torch.Generator().manual_seed(1))
    split, seq = D.Split(tokens, None), 10
    for index in range(5):
        x, y = D.batch(split, seq, index, 4, seed=3)
        assert x.shape == y.shape == (4, seq) and x.dtype == y.dtype == torch.int64
        for xr, yr in zip(x, y):
            starts = [s for s in range(0, 193, seq) if tokens[s:s + seq].tolist() == xr.tolist()]
            assert starts, "every input row is a window of the stream"
            assert yr.tolist() == tokens[starts[0] + 1:starts[0] + seq + 1].tolist()


def test_every_epoch_visits_every_window_once():
    split, seq, size = numbered(23 * 4 + 1), 4, 5  # 23 windows, batches straddle epochs
    n = D.windows(split, seq)
    assert n == 23
    order = torch.cat([D.batch(split, seq, i, size, seed=7)[0][:, 0] // seq for i in range(20)]).tolist()
    epochs = [order[e * n:(e + 1) * n] for e in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != epochs[1], "each epoch has its own order"
    other = torch.cat([D.batch(split, seq, i, size, seed=8)[0][:, 0] // seq for i in range(5)]).tolist()
    assert sorted(other[:n]) == list(range(n)) and other[:n] != epochs[0]


def test_batch_larger_than_an_epoch():
    split, seq = numbered(3 * 2 + 1), 2  # 3 windows, 7 samples a batch
    first = (D.batch(split, seq, 0, 7, seed=0)[0][:, 0] // seq).tolist()
    second = (D.batch(split, seq, 1, 7, seed=0)[0][:, 0] // seq).tolist()
    order = first + second  # samples 0..13: epochs 0..3 complete, and two of epoch 4
    for e in range(4):
        assert sorted(order[e * 3:(e + 1) * 3]) == [0, 1, 2]


def test_batch_is_a_pure_function_across_calls_and_processes():
    split = numbered(1001)
    here = [D.batch(split, 10, i, 6, seed=5)[0].tolist() for i in (0, 17, 3)]
    again = [D.batch(split, 10, i, 6, seed=5)[0].tolist() for i in (3, 17, 0)]
    assert here == again[::-1]
    code = textwrap.dedent("""
        import torch
        from effc.runtime import data as D
        split = D.Split(torch.arange(1001), None)
        print([D.batch(split, 10, i, 6, seed=5)[0].tolist() for i in (0, 17, 3)])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(here)


def test_eval_batches_in_order_with_a_smaller_last_batch():
    split, seq = numbered(11 * 3 + 2), 3  # 11 windows
    batches = list(D.eval_batches(split, seq, 4))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 3]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    for w in range(11):
        assert x[w].tolist() == list(range(w * 3, w * 3 + 3))
        assert y[w].tolist() == list(range(w * 3 + 1, w * 3 + 4))
    assert [x.shape[0] for x, _ in D.eval_batches(split, seq, 4, samples=5)] == [4, 1]
    assert sum(x.shape[0] for x, _ in D.eval_batches(split, seq, 4, samples=100)) == 11


# ---------------------------------------------------------------- jsonl


def test_jsonl_plain_joins_the_field_with_newlines(tmp_path):
    name = write(tmp_path, "p.jsonl", '{"text": "ab"}\n\n{"text": "cd", "x": 1}\n' * 30)
    ds = D.load_data("jsonl", {"path": name, "seq": 8}, tmp_path)
    stream = bytes(ds.train.tokens.tolist() + ds.validation.tokens.tolist())
    assert stream == b"\n".join([b"ab", b"cd"] * 30)
    assert ds.train.mask is None and ds.validation.tokens.numel() == 9  # max(179 // 20, 8 + 1)
    name = write(tmp_path, "f.jsonl", jsonl({"body": "é", "text": 3}) * 20)
    ds = D.load_data("jsonl", {"path": name, "seq": 4, "field": "body"}, tmp_path)
    assert bytes(ds.train.tokens.tolist() + ds.validation.tokens.tolist()) == b"\n".join(["é".encode()] * 20)


INSTRUCT = jsonl({"q": "hi", "a": "yo"}, {"q": "x", "a": "abc"}, {"q": "", "a": "z"}, {"q": "end", "a": "ok"})


def test_jsonl_instruction_mask_and_targets(tmp_path):
    name = write(tmp_path, "i.jsonl", INSTRUCT)
    ds = D.load_data("jsonl", {"path": name, "seq": 4, "prompt": "q", "response": "a"}, tmp_path)
    # R = 4 records: validation is the last one ("end\nok\n", 7 tokens >= seq+1 = 5).
    train_text, train_mask = b"hi\nyo\nx\nabc\n\nz\n", "000111" "001111" "011"
    assert bytes(ds.train.tokens.tolist()) == train_text
    assert ds.train.mask.tolist() == [c == "1" for c in train_mask]
    assert bytes(ds.validation.tokens.tolist()) == b"end\nok\n"
    assert ds.validation.mask.tolist() == [c == "1" for c in "0000111"]
    [(x, y)] = D.eval_batches(ds.train, 4, 8)
    assert x.shape == (3, 4)  # (15 - 1) // 4 windows
    for w in range(3):
        assert x[w].tolist() == list(train_text[w * 4:w * 4 + 4])
        expected = [train_text[t] if train_mask[t] == "1" else -100 for t in range(w * 4 + 1, w * 4 + 5)]
        assert y[w].tolist() == expected
    assert y[0].tolist() == [-100, -100, ord("y"), ord("o")]  # "i\n" are prompt, "yo" response


def test_jsonl_instruction_validation_grows_to_one_window(tmp_path):
    name = write(tmp_path, "i.jsonl", INSTRUCT)
    ds = D.load_data("jsonl", {"path": name, "seq": 7, "prompt": "q", "response": "a"}, tmp_path)
    # The last record has 7 tokens, seq+1 = 8: validation takes the last two records.
    assert bytes(ds.validation.tokens.tolist()) == b"\nz\nend\nok\n"
    assert bytes(ds.train.tokens.tolist()) == b"hi\nyo\nx\nabc\n"


def test_jsonl_single_record_splits_by_tokens(tmp_path):
    name = write(tmp_path, "one.jsonl", jsonl({"q": "p" * 30, "a": "r" * 69}))  # 31 + 70 = 101 tokens
    ds = D.load_data("jsonl", {"path": name, "seq": 4, "prompt": "q", "response": "a"}, tmp_path)
    assert ds.validation.tokens.numel() == 5  # max(101 // 20, 4 + 1)
    assert ds.train.mask.tolist() == [False] * 31 + [True] * 65


# ---------------------------------------------------------------- errors


def test_missing_empty_and_directory(tmp_path):
    e = error("text", {"path": "nope.txt", "seq": 8}, tmp_path)
    assert e.message == "nope.txt: no such file" and str(tmp_path) in e.hint
    e = error("jsonl", {"path": write(tmp_path, "e.jsonl", b""), "seq": 8}, tmp_path)
    assert e.message == "e.jsonl is empty" and e.hint
    (tmp_path / "dir").mkdir()
    e = error("text", {"path": "dir", "seq": 8}, tmp_path)
    assert e.message == "dir is a directory, not a file" and e.hint


def test_jsonl_malformed_lines_name_the_line(tmp_path):
    name = write(tmp_path, "bad.jsonl", '{"text": "a"}\n\n{"text": "b" "c"}\n')
    e = error("jsonl", {"path": name, "seq": 2}, tmp_path)
    assert e.message == "bad.jsonl:3: not valid JSON (Expecting ',' delimiter)" and e.hint
    name = write(tmp_path, "arr.jsonl", '{"text": "a"}\n["text"]\n')
    assert error("jsonl", {"path": name, "seq": 2}, tmp_path).message == \
        "arr.jsonl:2: expected a JSON object, found an array"
    name = write(tmp_path, "blank.jsonl", "\n  \n")
    assert error("jsonl", {"path": name, "seq": 2}, tmp_path).message == "blank.jsonl has no records (only blank lines)"
    name = write(tmp_path, "latin.jsonl", b'{"text": "caf\xe9"}\n')
    assert error("jsonl", {"path": name, "seq": 2}, tmp_path).message == "latin.jsonl: not valid UTF-8 (byte 13)"


def test_jsonl_missing_or_non_string_field(tmp_path):
    name = write(tmp_path, "f.jsonl", jsonl({"text": "a"}, {"body": "b", "id": 2}))
    e = error("jsonl", {"path": name, "seq": 2}, tmp_path)
    assert e.message == "f.jsonl:2: the record has no field 'text'" and "'body', 'id'" in e.hint
    name = write(tmp_path, "n.jsonl", jsonl({"text": "a"}, {"text": "b"}, {"text": 4.5}))
    assert error("jsonl", {"path": name, "seq": 2}, tmp_path).message == \
        "n.jsonl:3: field 'text' is a number, not a string"
    name = write(tmp_path, "r.jsonl", jsonl({"q": "a", "a": None}))
    assert error("jsonl", {"path": name, "seq": 2, "prompt": "q", "response": "a"}, tmp_path).message == \
        "r.jsonl:1: field 'a' is null, not a string"


def test_too_few_tokens_for_seq(tmp_path):
    name = write(tmp_path, "short.txt", b"x" * 30)  # validation 17 tokens, train 13
    e = error("text", {"path": name, "seq": 16}, tmp_path)
    assert e.message == "the train split has 13 tokens; seq=16 needs at least 17 (seq+1)"
    assert "smaller seq" in e.hint
    with pytest.raises(D.DataError, match="has 5 tokens; seq=5 needs at least 6"):
        D.windows(numbered(5), 5)
    with pytest.raises(D.DataError, match="has 0 tokens"):
        next(D.eval_batches(numbered(0), 1, 1))


def test_a_missing_tokenizer_file_is_a_data_error(tmp_path):
    e = error("text", {"path": write(tmp_path, "t.txt", "abc"), "seq": 1, "tokenizer": "tok.json"}, tmp_path)
    assert e.message == f"'{tmp_path / 'tok.json'}' does not exist" and e.hint


# ---------------------------------------------------------------- markov


def dense_chain(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain's dense matrix P and its stationary distribution from an eigen-solve
    (independent of the power iteration inside the loader)."""
    succ, p, _ = D._markov_chain(vocab, seed)
    dense = torch.zeros(vocab, vocab, dtype=torch.float64).scatter_add_(1, succ, p)
    values, vectors = torch.linalg.eig(dense.T)
    v = vectors[:, (values - 1).abs().argmin()].real
    return dense, v / v.sum()


@pytest.fixture(scope="module")
def markov64():
    return D.load_data("markov", {"seq": 128, "seed": 0, "vocab": 64}, Path("."))


def test_markov_entropy_rate_matches_the_empirical_estimate(markov64):
    ds, V = markov64, 64
    assert 1.0 < ds.entropy_rate < math.log(V) - 1.0
    x, keep = ds.train.tokens, ds.train.mask[1:]  # transitions whose target is a true step
    counts = torch.bincount(x[:-1][keep] * V + x[1:][keep], minlength=V * V).view(V, V).double()
    rows = counts.sum(1, keepdim=True).clamp(min=1)
    plug_in = float(-torch.special.xlogy(counts, counts / rows).sum() / counts.sum())
    # plug-in bias is about -(cells seen) / (2 N) = -0.002 nats here
    assert abs(plug_in - ds.entropy_rate) < 0.01


def test_markov_is_stationary_with_the_exact_entropy_formula(markov64):
    dense, pi = dense_chain(64, 0)
    assert torch.allclose(dense.sum(1), torch.ones(64, dtype=torch.float64))
    h = float(-(pi[:, None] * torch.special.xlogy(dense, dense)).sum())
    assert abs(h - markov64.entropy_rate) < 1e-9
    freq = torch.bincount(markov64.train.tokens, minlength=64).double() / markov64.train.tokens.numel()
    assert float((freq - pi).abs().sum()) < 0.02  # measured 0.006 total variation x2


def test_markov_sizes_layout_and_determinism(markov64):
    ds = markov64
    assert ds.train.tokens.numel() == 2**20 + 1 and ds.validation.tokens.numel() == 2**16 + 1
    assert D.windows(ds.train, 128) == 2**20 // 128
    masked = (~ds.train.mask).nonzero().flatten()
    assert masked.tolist() == list(range(0, 2**20, 4096))  # one chain start every 4096 tokens
    assert not torch.equal(ds.train.tokens[:4096], ds.validation.tokens[:4096])
    again = D.load_data("markov", {"seq": 128, "seed": 0, "vocab": 64}, Path("."))
    assert torch.equal(again.train.tokens, ds.train.tokens)
    assert torch.equal(again.validation.tokens, ds.validation.tokens)
    other = D.load_data("markov", {"seq": 128, "seed": 1, "vocab": 64}, Path("."))
    assert other.entropy_rate != ds.entropy_rate


def test_markov_masked_targets_end_windows():
    ds = D.load_data("markov", {"seq": 7, "seed": 3, "vocab": 300}, Path("."))  # chains of 7 * 586 = 4102
    assert int(ds.train.tokens.max()) < 300 and ds.vocab == 300
    masked = (~ds.train.mask).nonzero().flatten()
    assert masked.tolist() == list(range(0, ds.train.tokens.numel() - 1, 4102))
    assert bool((masked % 7 == 0).all())  # only ever the last target of a window
    _, y = next(D.eval_batches(ds.train, 7, 4102 // 7))
    assert (y == -100).sum() == 1 and y[-1, -1] == -100
    dense, pi = dense_chain(300, 3)  # the sparse-successor chain (vocab > 64)
    assert int((dense > 0).sum(1).max()) == 64
    h = float(-(pi[:, None] * torch.special.xlogy(dense, dense)).sum())
    assert abs(h - ds.entropy_rate) < 1e-9


# ---------------------------------------------------------------- stdlib_text


@pytest.fixture(scope="module")
def stdlib():
    return D.load_data("stdlib_text", {"seq": 256}, Path("."))


def test_stdlib_text_is_english(stdlib):
    tokens = torch.cat([stdlib.train.tokens, stdlib.validation.tokens])
    assert 500_000 < tokens.numel() <= D.STDLIB_CAP
    printable = ((tokens >= 32) & (tokens < 127)) | (tokens == 10)
    assert printable.double().mean() > 0.9
    text = bytes(tokens[:200_000].tolist())
    for word in (b" the ", b" and ", b" of ", b"Return "):
        assert word in text
    n = tokens.numel()
    assert stdlib.validation.tokens.numel() == max(n // 20, 257)


def test_stdlib_text_is_deterministic(stdlib):
    again = D.load_data("stdlib_text", {"seq": 256}, Path("."))
    assert torch.equal(again.train.tokens, stdlib.train.tokens)
    assert torch.equal(again.validation.tokens, stdlib.validation.tokens)
