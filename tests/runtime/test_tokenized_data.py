"""Data tokenized by a Hugging Face tokenizer, instruction and chat records, packing.

References: the `tokenizers` library's own encode for plain text; transformers'
`apply_chat_template(..., return_assistant_tokens_mask=True)` for chat rendering, token ids
and which tokens are the assistant's (it finds them from character offsets of
`{% generation %}` blocks, a method independent of effc's piece-by-piece rendering); a
Python loop for packing's segments and positions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from effc.lang.check import check_source
from effc.runtime import data as D

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The same template with transformers' {% generation %} markers around what the assistant says.
CHATML_MARKED = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>\n"
                 "{% endgeneration %}{% else %}{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = "The cat sat on the mat. Return the sum of two numbers.\nA tokenizer maps text to ids.\n"


def _tokenizer(folder: Path, template: str | None = CHATML) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"eos_token": "<|im_end|>"} | ({"chat_template": template} if template else {})
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return path.name


def test_text_is_the_tokenizers_encoding(tmp_path):
    folder = _tokenizer(tmp_path / "tok")
    ds = D.load_data("text", {"path": _write(tmp_path / "t.txt", TEXT * 3), "seq": 8, "tokenizer": "tok"}, tmp_path)
    want = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT * 3, add_special_tokens=False).ids
    assert torch.cat([ds.train.tokens, ds.validation.tokens]).tolist() == want
    assert ds.vocab == Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def test_documents_are_joined_by_the_end_of_sequence_token(tmp_path):
    folder = _tokenizer(tmp_path / "tok")
    lines = [json.dumps({"text": t}) for t in ("the cat", "sat on the mat", "two numbers")]
    ds = D.load_data("jsonl", {"path": _write(tmp_path / "d.jsonl", "\n".join(lines * 2)), "seq": 4,
                               "tokenizer": "tok"}, tmp_path)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    stream = torch.cat([ds.train.tokens, ds.validation.tokens]).tolist()
    assert stream[: len(tok.encode("the cat").ids) + 1] == tok.encode("the cat").ids + [eos]


def _reference(folder: Path, msgs: list[dict]) -> tuple[list[int], list[int]]:
    t = T.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), chat_template=CHATML_MARKED)
    assert t.apply_chat_template(msgs, tokenize=False) == \
        T.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), chat_template=CHATML
                                  ).apply_chat_template(msgs, tokenize=False)
    out = t.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return out["input_ids"], out["assistant_masks"]


CONVERSATIONS = [
    [{"role": "user", "content": "Return the sum."}, {"role": "assistant", "content": "The sum of two numbers."}],
    [{"role": "system", "content": "A tokenizer."}, {"role": "user", "content": "the cat"},
     {"role": "assistant", "content": "sat on the mat"}, {"role": "user", "content": "two numbers?"},
     {"role": "assistant", "content": "Return the sum."}],
]


def _records(ds: D.Dataset) -> list[tuple[list[int], list[bool]]]:
    tokens = torch.cat([ds.train.tokens, ds.validation.tokens])
    mask = torch.cat([ds.train.mask, ds.validation.mask])
    doc = torch.cat([ds.train.doc, ds.validation.doc])
    return [(tokens[doc == r].tolist(), mask[doc == r].tolist()) for r in range(int(doc.max()) + 1)]


def test_chat_records_render_and_mask_as_transformers_does(tmp_path):
    folder = _tokenizer(tmp_path / "tok")
    lines = [json.dumps({"conv": c}) for c in CONVERSATIONS] * 3
    ds = D.load_data("jsonl", {"path": _write(tmp_path / "c.jsonl", "\n".join(lines)), "seq": 8,
                               "messages": "conv", "tokenizer": "tok"}, tmp_path)
    for (ids, mask), conv in zip(_records(ds), CONVERSATIONS * 3):
        want_ids, want_mask = _reference(folder, conv)
        assert ids == want_ids
        assert mask == [bool(m) for m in want_mask]
        assert sum(mask) > 0


def test_prompt_response_use_the_template_as_a_two_turn_chat(tmp_path):
    folder = _tokenizer(tmp_path / "tok")
    recs = [{"q": "the cat", "a": "sat on the mat"}, {"q": "two numbers?", "a": "Return the sum."}] * 2
    ds = D.load_data("jsonl", {"path": _write(tmp_path / "p.jsonl", "\n".join(map(json.dumps, recs))), "seq": 8,
                               "prompt": "q", "response": "a", "tokenizer": "tok"}, tmp_path)
    for (ids, mask), r in zip(_records(ds), recs):
        want_ids, want_mask = _reference(folder, [{"role": "user", "content": r["q"]},
                                                  {"role": "assistant", "content": r["a"]}])
        assert (ids, mask) == (want_ids, [bool(m) for m in want_mask])


def test_without_a_template_a_response_ends_with_the_eos_token(tmp_path):
    folder = _tokenizer(tmp_path / "tok", template=None)
    recs = [{"q": "the cat", "a": "sat"}] * 3
    ds = D.load_data("jsonl", {"path": _write(tmp_path / "p.jsonl", "\n".join(map(json.dumps, recs))), "seq": 4,
                               "prompt": "q", "response": "a", "tokenizer": "tok"}, tmp_path)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    p, a = tok.encode("the cat\n").ids, tok.encode("sat\n").ids
    ids, mask = _records(ds)[0]
    assert ids == p + a + [tok.token_to_id("<|im_end|>")]
    assert mask == [False] * len(p) + [True] * (len(a) + 1)


def test_packing_segments_and_positions_against_a_loop(tmp_path):
    recs = [{"q": "x" * n, "a": "y" * m} for n, m in [(3, 2), (1, 1), (6, 4), (2, 5), (4, 1), (2, 2)] * 4]
    ds = D.load_data("jsonl", {"path": _write(tmp_path / "p.jsonl", "\n".join(map(json.dumps, recs))), "seq": 7,
                               "prompt": "q", "response": "a"}, tmp_path)
    split, seq = ds.train, 7
    ids = torch.arange(D.windows(split, seq))
    seg, pos = D.packing(split, seq, ids)
    x, y = D.gather(split, seq, ids)
    for b, w in enumerate(ids.tolist()):
        docs = split.doc[w * seq: w * seq + seq + 1].tolist()
        expect_pos, p = [], 0
        for t in range(seq):
            p = 0 if t == 0 or docs[t] != docs[t - 1] else p + 1
            expect_pos.append(p)
            if docs[t + 1] != docs[t]:  # the next record's first token is never a target here
                assert y[b, t] == D.IGNORE_INDEX
        assert pos[b].tolist() == expect_pos
        same = [[docs[i] == docs[j] for j in range(seq)] for i in range(seq)]
        assert (seg[b][:, None] == seg[b][None, :]).tolist() == same
    assert D.packing(D.load_data("markov", {"seq": 8}, tmp_path).train, 8, ids[:2]) is None


def test_bytes_instruction_data_is_unchanged_by_packing(tmp_path):
    """The byte-level stream and mask of prompt/response data are exactly today's
    (prompt + newline, then the response + newline as targets)."""
    recs = [{"q": "ab", "a": "c"}, {"q": "d", "a": "ef"}, {"q": "g", "a": "h"}]
    ds = D.load_data("jsonl", {"path": _write(tmp_path / "p.jsonl", "\n".join(map(json.dumps, recs))), "seq": 2,
                               "prompt": "q", "response": "a"}, tmp_path)
    assert _records(ds) == [(list(b"ab\nc\n"), [False] * 3 + [True] * 2), (list(b"d\nef\n"), [False] * 2 + [True] * 3),
                            (list(b"g\nh\n"), [False] * 2 + [True] * 2)]


def test_template_errors_and_sandbox_are_data_errors(tmp_path):
    for template, message in [
        ("{{ raise_exception('only user and assistant roles') }}", "only user and assistant roles"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "the chat template failed"),
    ]:
        _tokenizer(tmp_path / "tok", template=template)
        path = _write(tmp_path / "c.jsonl", json.dumps({"conv": CONVERSATIONS[0]}) + "\n")
        with pytest.raises(D.DataError, match=message) as e:
            D.load_data("jsonl", {"path": path, "seq": 4, "messages": "conv", "tokenizer": "tok"}, tmp_path)
        assert e.value.message.startswith("c.jsonl:1:")
    with pytest.raises(D.DataError, match="c.jsonl:1: field 'conv' is not a list of messages"):
        D.load_data("jsonl", {"path": _write(tmp_path / "c.jsonl", '{"conv": "hi"}\n'), "seq": 4, "messages": "conv",
                              "tokenizer": "tok"}, tmp_path)


# ---------------------------------------------------------------- at check time


def _check(tmp_path: Path, data: str, vocab: int = 512) -> list:
    src = (f"pipeline p\nmodel m = decoder(vocab={vocab}, dim=16, layers=1, heads=2, ffn=16, seq=16)\n"
           f"data d = {data}\nstage s:\n    train m on d (steps=1)\n")
    return [d for d in check_source(src, str(tmp_path / "p.eff")).diagnostics if d.severity == "error"]


def test_check_time_diagnostics(tmp_path):
    folder = _tokenizer(tmp_path / "tok", template=None)
    size = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    _write(tmp_path / "t.txt", TEXT)
    _write(tmp_path / "c.jsonl", "{}\n")
    assert _check(tmp_path, 'text("t.txt", seq=8, tokenizer="tok")') == []
    (d,) = _check(tmp_path, 'text("t.txt", seq=8, tokenizer="tok")', vocab=size - 1)
    assert d.code == "E0405" and f"produces {size} token ids but model 'm' has vocab={size - 1}" in d.message
    decl = 'jsonl("c.jsonl", seq=8, messages="conv", tokenizer="tok")'
    (d,) = _check(tmp_path, decl)
    assert d.code == "E0309" and "has no chat_template" in d.message
    assert (d.span.line, d.span.col) == (3, len("data d = ") + decl.index('"conv"') + 1)
    (d,) = _check(tmp_path, 'jsonl("c.jsonl", seq=8, messages="conv")')
    assert d.code == "E0309" and 'tokenizer="bytes" has none' in d.message
    (d,) = _check(tmp_path, 'jsonl("c.jsonl", seq=8, field="t", messages="conv")')
    assert d.code == "E0309" and "not several" in d.message
    (tmp_path / "empty").mkdir()
    decl = 'text("t.txt", seq=8, tokenizer="empty")'
    (d,) = _check(tmp_path, decl)
    assert d.code == "E0309" and "has no tokenizer.json" in d.message
    assert (d.span.line, d.span.col) == (3, len("data d = ") + decl.index('"empty"') + 1)
    _write(tmp_path / "bad.json", "{not json")
    (d,) = _check(tmp_path, 'text("t.txt", seq=8, tokenizer="bad.json")')
    assert d.code == "E0309" and "is not a tokenizer.json file" in d.message


def test_a_changed_tokenizer_reruns_the_stage(tmp_path):
    from effc.runtime.run import RunOptions, run_pipeline

    _tokenizer(tmp_path / "tok", template=None)
    _write(tmp_path / "t.txt", TEXT * 8)
    src = ("pipeline p\nmodel m = decoder(vocab=512, dim=16, layers=1, heads=2, ffn=16, seq=8)\n"
           'data d = text("t.txt", seq=8, tokenizer="tok")\nstage s:\n    train m on d (steps=1, batch=1)\n')
    f = tmp_path / "p.eff"
    f.write_text(src)

    def cached() -> bool:
        r = check_source(src, str(f))
        (entry,) = [e for e in run_pipeline(r, f, RunOptions(out=tmp_path / "run")).stages if "cached" in e]
        return entry["cached"]

    assert not cached() and cached()
    cfg = tmp_path / "tok" / "tokenizer_config.json"
    cfg.write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    assert not cached()
