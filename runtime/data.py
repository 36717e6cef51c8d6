"""The data sources of the `.eff` language, loaded into token streams, and the batches cut
from them.

A declaration such as `data corpus = text("data/train.txt", seq=128)` becomes a `Dataset`:
two `Split`s (train, validation), each one 1-D int64 token stream with an optional mask.

Sequences are the non-overlapping windows of seq+1 tokens that start at multiples of seq,
so window w is stream[w*seq : w*seq + seq + 1] and neighbouring windows share one token.
Inputs are window[:-1], targets window[1:]; a target whose mask is False becomes
IGNORE_INDEX, which cross-entropy skips.

A sentence encoder reads jsonl prompt/response records as (anchor, positive) pairs
instead (`load_pairs`): no stream, no windows; each text is tokenized on its own, and a
batch pads each side to its longest text, with a `keep` mask on the real tokens.

Shape legend: N stream length, B sequences in a batch, T seq, W = T+1 window length,
C chains, L tokens a chain lays into the stream, V vocab, K successors of a symbol,
P pairs, S the longest text of a batch's side.
"""

from __future__ import annotations

import ast
import functools
import gc
import hashlib
import json
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from effc.lang.registry import BYTE_VOCAB, MIN_PAIRS
from effc.lang.tokenizer_info import TokenizerError
from effc.runtime.tokenizer import TemplateError, TextTokenizer, open_tokenizer

VOCAB_BYTES = BYTE_VOCAB  # the checker compares it with the model's vocab (registry.data_vocab)
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
VALIDATION_FRACTION = 20  # validation is the last 1/20 = 5%


class DataError(Exception):
    """Bad data found at run time (missing, empty, malformed). The runtime turns it into a
    diagnostic at the .eff line that declared the data, so message and hint are user-facing."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class Split:
    tokens: torch.Tensor  # (N,) int64
    mask: torch.Tensor | None  # None, or (N,) bool: True where the token is a learning target
    doc: torch.Tensor | None = None  # None, or (N,) int64: the record each token belongs to (packing)


@dataclass(frozen=True)
class Dataset:
    source: str  # "text" | "jsonl" | "markov" | "stdlib_text"
    vocab: int  # number of distinct token ids the source can produce
    seq: int
    train: Split
    validation: Split
    entropy_rate: float | None  # nats per token; known exactly for markov, else None
    description: str  # one line for the run summary


def load_data(source: str, args: dict, base_dir: Path) -> Dataset:
    """Load a checked data declaration; paths in `args` are relative to `base_dir` (the
    .eff file's folder). Both splits are checked to hold at least one window, so `batch`
    and `eval_batches` cannot fail later on a dataset this returns."""
    if source not in _LOADERS:
        raise ValueError(f"unknown data source {source!r}")
    ds = _LOADERS[source](args, Path(base_dir))
    for name, split in (("train", ds.train), ("validation", ds.validation)):
        _windows(split, ds.seq, f"the {name} split")
    return ds


def windows(split: Split, seq: int) -> int:
    """Number of training sequences in `split`: floor((N - 1) / seq). Raises DataError when
    the split is shorter than one window (seq+1 tokens)."""
    return _windows(split, seq, "the split")


def batch(split: Split, seq: int, index: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch number `index` as (inputs, targets), both (size, seq) int64: the
    windows `batch_windows` picks, gathered."""
    return gather(split, seq, batch_windows(split, seq, index, size, seed))


def batch_windows(split: Split, seq: int, index: int, size: int, seed: int) -> torch.Tensor:
    """The (size,) window numbers of training batch number `index`.

    Sample k = index*size + j (j < size) is window perm(seed, epoch)[k % n] with
    epoch = k // n and n = windows(split, seq), where perm is `torch.randperm(n)` under a
    generator seeded from (seed, epoch). The result depends on the arguments alone, so a
    run resumed at step s reads exactly the batches it would have read (for a given torch
    version: randperm's stream is not promised across versions), and every epoch visits
    each window exactly once.
    """
    return _draw(windows(split, seq), index, size, seed)


def _draw(n: int, index: int, size: int, seed: int) -> torch.Tensor:
    """The (size,) item numbers (of n) of batch number `index`: see `batch_windows`."""
    k_B = torch.arange(index * size, (index + 1) * size)
    epoch_B, pos_B = k_B // n, k_B % n
    ids_B = torch.empty_like(k_B)
    for epoch in epoch_B.unique().tolist():  # one epoch, or two where a batch straddles them
        sel_B = epoch_B == epoch
        ids_B[sel_B] = _perm(n, seed, epoch)[pos_B[sel_B]]
    return ids_B


def eval_batches(split: Split, seq: int, size: int, samples: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The windows of `split` in stream order, at most `samples` of them, as (inputs,
    targets) batches of `size` sequences (the last batch may be smaller)."""
    for ids_B in eval_windows(split, seq, size, samples):
        yield gather(split, seq, ids_B)


def eval_windows(split: Split, seq: int, size: int, samples: int | None = None) -> Iterator[torch.Tensor]:
    n = windows(split, seq)
    total = n if samples is None else min(n, samples)
    for start in range(0, total, size):
        yield torch.arange(start, min(start + size, total))


def packing(split: Split, seq: int, ids_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For the inputs of windows `ids_B` of a split made of records: (segments, positions),
    both (B, T) int64. Two positions of a window have the same segment number iff their
    tokens belong to the same record; a position's number is where it stands in its
    record's part of the window (0 at the window's start and at each record's first
    token). The graph keeps attention inside a segment and restarts positions with them.
    None for a split without records (one continuous stream)."""
    if split.doc is None:
        return None
    idx_BT = ids_B[:, None] * seq + torch.arange(seq)
    seg_BT = split.doc[idx_BT]
    t_BT = torch.arange(seq).expand_as(seg_BT)
    starts_BT = torch.ones_like(seg_BT, dtype=torch.bool)
    starts_BT[:, 1:] = seg_BT[:, 1:] != seg_BT[:, :-1]
    first_BT = torch.where(starts_BT, t_BT, 0).cummax(dim=1).values  # where each position's segment began
    return seg_BT, t_BT - first_BT


# ---------------------------------------------------------------- windows and batches


def _windows(split: Split, seq: int, what: str) -> int:
    n_tokens = split.tokens.numel()
    if n_tokens < seq + 1:
        raise DataError(f"{what} has {n_tokens:,} tokens; seq={seq} needs at least {seq + 1:,} (seq+1)",
                        "use a smaller seq, or more data: a sequence reads seq+1 tokens "
                        "(seq inputs and the token after each)")
    return (n_tokens - 1) // seq


def gather(split: Split, seq: int, ids_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows `ids_B` as (inputs, targets), (B, T) each. A target is IGNORE_INDEX where
    the mask says it is not a learning target, and where it is the first token of a
    record (it would be predicted from the record before)."""
    idx_BW = ids_B[:, None] * seq + torch.arange(seq + 1)
    w_BW = split.tokens[idx_BW]
    x_BT, y_BT = w_BW[:, :-1].contiguous(), w_BW[:, 1:].contiguous()
    if split.mask is not None:
        y_BT[~split.mask[idx_BW[:, 1:]]] = IGNORE_INDEX
    if split.doc is not None:
        d_BW = split.doc[idx_BW]
        y_BT[d_BW[:, 1:] != d_BW[:, :-1]] = IGNORE_INDEX
    return x_BT, y_BT


def _generator(*parts: object) -> torch.Generator:
    """A generator seeded from a tuple, the same in every process (unlike `hash`)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


@functools.lru_cache(maxsize=4)
def _perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    # Cached because consecutive batches share an epoch: randperm of 10M windows takes
    # 0.25 s, which would otherwise be paid every step. Callers only index the result.
    return torch.randperm(n, generator=_generator(seed, epoch))


def _tail(n_tokens: int, seq: int) -> int:
    """Where validation starts: it is the last max(floor(N/20), seq+1) tokens, or all N
    when the stream is shorter than that (the window check then reports it)."""
    return n_tokens - min(n_tokens, max(n_tokens // VALIDATION_FRACTION, seq + 1))


def _split_at(tokens_N: torch.Tensor, mask_N: torch.Tensor | None, cut: int,
              doc_N: torch.Tensor | None = None) -> tuple[Split, Split]:
    def part(t, lo, hi):
        return None if t is None else t[lo:hi]

    n = tokens_N.numel()
    return (Split(tokens_N[:cut], part(mask_N, 0, cut), part(doc_N, 0, cut)),
            Split(tokens_N[cut:], part(mask_N, cut, n), part(doc_N, cut, n)))


def _describe(source: str, train: Split, validation: Split, origin: str) -> str:
    return (f"{source}: {train.tokens.numel():,} train + {validation.tokens.numel():,} "
            f"validation tokens from {origin}")


# ---------------------------------------------------------------- text


def _read(base_dir: Path, name: str) -> bytes:
    path = base_dir / name
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: no such file", f"paths are relative to the .eff file's folder ({base_dir})") from None
    except IsADirectoryError:
        raise DataError(f"{name} is a directory, not a file", "name a file inside it") from None
    except OSError as e:
        raise DataError(f"cannot read {name}: {e.strerror}", "check that the file exists and is readable") from None
    if not raw:
        raise DataError(f"{name} is empty", "the data file must hold some text")
    return raw


def _bytes_tokens(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)


def _tokenizer(args: dict, base_dir: Path) -> TextTokenizer:
    """The declaration's tokenizer; a path is relative to `base_dir`, as data paths are."""
    spec = str(args.get("tokenizer", "bytes"))
    try:
        return open_tokenizer(spec if spec == "bytes" else str(base_dir / spec))
    except TokenizerError as e:
        raise DataError(e.message, e.hint) from None


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not valid UTF-8 (byte {e.start})", "a tokenizer reads UTF-8 text") from None


def _joined(tok: TextTokenizer, texts: list[str], sep: str) -> torch.Tensor:
    """Documents as one stream: bytes joined by `sep`; tokenized documents joined by the
    tokenizer's end-of-sequence token when it has one (a model learns where documents
    end), else by the tokens of `sep`."""
    if tok.name == "bytes":
        return _bytes_tokens(sep.encode("utf-8").join(t.encode("utf-8") for t in texts))
    glue = [tok.eos_id] if tok.eos_id is not None else tok.encode([sep])[0]
    ids: list[int] = []
    for i, doc in enumerate(tok.encode(texts)):
        ids += (glue if i else []) + doc
    return torch.tensor(ids, dtype=torch.int64)


def _load_text(args: dict, base_dir: Path) -> Dataset:
    """text(path, seq, tokenizer="bytes"): with bytes, the file's raw bytes are the tokens
    (vocab 256); with a tokenizer, the file's UTF-8 text encoded without special tokens.
    Validation is the last max(floor(N/20), seq+1) tokens of the N, train the tokens
    before it."""
    tok = _tokenizer(args, base_dir)
    name, seq = args["path"], args["seq"]
    raw = _read(base_dir, name)
    tokens_N = _bytes_tokens(raw) if tok.name == "bytes" else torch.tensor(tok.encode([_decode(raw, name)])[0])
    train, validation = _split_at(tokens_N, None, _tail(tokens_N.numel(), seq))
    return Dataset("text", tok.vocab, seq, train, validation, None,
                   _describe("text", train, validation, name))


# ---------------------------------------------------------------- jsonl


def _json_kind(value: object) -> str:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "null")


def _records(raw: bytes, name: str) -> list[tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not valid UTF-8 (byte {e.start})", "JSON lines files are UTF-8 text") from None
    out = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line breaks raw.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{lineno}: not valid JSON ({e.msg})",
                            "each line must hold one complete JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name}:{lineno}: expected a JSON object, found {_json_kind(obj)}",
                            'each line must hold one object, e.g. {"text": "..."}')
        out.append((lineno, obj))
    if not out:
        raise DataError(f"{name} has no records (only blank lines)", "write one JSON object a line")
    return out


def _field(obj: dict, key: str, name: str, lineno: int) -> str:
    if key not in obj:
        fields = ", ".join(repr(k) for k in obj) or "none"
        raise DataError(f"{name}:{lineno}: the record has no field {key!r}",
                        f"the record's fields are: {fields}; name the one to read in the data declaration")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{name}:{lineno}: field {key!r} is {_json_kind(value)}, not a string",
                        "the text fields of every record must be JSON strings")
    return value


def _messages(obj: dict, key: str, name: str, lineno: int) -> list[dict]:
    value = obj.get(key)
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    if key not in obj:
        _field(obj, key, name, lineno)  # the "no field" message
    if not ok:
        raise DataError(f"{name}:{lineno}: field {key!r} is not a list of messages",
                        'chat records hold [{"role": "user", "content": "..."}, {"role": "assistant", ...}]')
    if not any(m["role"] == "assistant" for m in value):
        raise DataError(f"{name}:{lineno}: the conversation has no assistant message",
                        "the loss is on the assistant's messages: each record needs at least one")
    return value


def _pieces(tok: TextTokenizer, msgs: list[dict], name: str, lineno: int) -> list[tuple[str, bool]]:
    """A conversation as (text, is_target) pieces whose concatenation is the template's
    rendering of the whole conversation. An assistant turn's target is what rendering it
    adds after the generation prompt: its content and whatever closes the turn (ChatML's
    <|im_end|>), so the model learns to stop."""
    out, before = [], ""
    try:
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                prompt = tok.render(msgs[:i], add_generation_prompt=True)
                whole = tok.render(msgs[: i + 1], add_generation_prompt=False)
                if not (prompt.startswith(before) and whole.startswith(prompt)):
                    raise DataError(f"{name}:{lineno}: the chat template does not render this conversation "
                                    "turn by turn (an earlier turn changes when a later one is added)",
                                    "use prompt=/response= with this tokenizer, or a template that renders "
                                    "conversations incrementally")
                out += [(prompt[len(before):], False), (whole[len(prompt):], True)]
            else:
                whole = tok.render(msgs[: i + 1], add_generation_prompt=False)
                if not whole.startswith(before):
                    raise DataError(f"{name}:{lineno}: the chat template does not render this conversation "
                                    "turn by turn", "use prompt=/response= with this tokenizer")
                out.append((whole[len(before):], False))
            before = whole
    except TemplateError as e:
        raise DataError(f"{name}:{lineno}: the chat template failed: {e}",
                        "the template's own message says what it expected of the record") from None
    return out


def _record_tail(lengths_R: torch.Tensor, seq: int) -> int:
    """How many records validation takes: the last max(floor(R/20), 1), grown until they
    hold at least seq+1 tokens, but never all R (train keeps at least one record)."""
    n_records = lengths_R.numel()
    tail_R = lengths_R.flip(0).cumsum(0)  # tokens in the last r+1 records
    enough = int(torch.searchsorted(tail_R, seq + 1)) + 1  # fewest last records with seq+1 tokens
    return min(max(n_records // VALIDATION_FRACTION, 1, enough), n_records - 1)


def _load_jsonl(args: dict, base_dir: Path) -> Dataset:
    """jsonl(path, seq, field=None | prompt=, response= | messages=, tokenizer="bytes"): one
    JSON object a line, blank lines skipped.

    Plain mode (field, default "text"): the field's strings as one stream without a mask,
    joined by "\n" (bytes) or the tokenizer's end-of-sequence token; validation is the
    last max(floor(N/20), seq+1) tokens.

    Instruction mode (prompt and response) and chat mode (messages: a list of {role,
    content}): each record becomes pieces of text, each a target or not (`_pieces`), each
    piece tokenized on its own, so the mask is exact at the token level. With the
    tokenizer's chat template, prompt/response is the conversation [user: prompt,
    assistant: response], and the targets are the assistant's turns as the template closes
    them. Without one, a record is prompt + "\n" (not a target) and response + "\n" (the
    target) and, with a tokenizer that has one, its end-of-sequence token (a target).
    Records are packed into one stream with `doc` marking each token's record, so the
    graph keeps attention inside a record (`packing`) and a record's first target is never
    predicted from the record before (`gather`). Validation is the last records (see
    `_record_tail`) when there are at least two, else the last max(floor(N/20), seq+1)
    tokens.
    """
    name, seq = args["path"], args["seq"]
    tok = _tokenizer(args, base_dir)
    records = _records(_read(base_dir, name), name)
    prompt, response, chat = args.get("prompt"), args.get("response"), args.get("messages")
    if prompt is None and chat is None:
        key = "text" if args.get("field") is None else args["field"]
        tokens_N = _joined(tok, [_field(o, key, name, ln) for ln, o in records], "\n")
        train, validation = _split_at(tokens_N, None, _tail(tokens_N.numel(), seq))
        return Dataset("jsonl", tok.vocab, seq, train, validation, None,
                       _describe("jsonl", train, validation, f"{len(records):,} records of {name}"))
    if chat is not None and tok.chat_template is None:
        raise DataError(f"{name}: chat records need a chat template, and the tokenizer has none",
                        "use prompt=/response=, or a checkpoint whose tokenizer_config.json has a chat_template")
    pieces: list[list[tuple[str, bool]]] = []
    for lineno, obj in records:
        if chat is not None:
            msgs = _messages(obj, chat, name, lineno)
        else:
            msgs = [{"role": "user", "content": _field(obj, prompt, name, lineno)},
                    {"role": "assistant", "content": _field(obj, response, name, lineno)}]
        if tok.chat_template is not None:
            pieces.append(_pieces(tok, msgs, name, lineno))
        else:
            pieces.append([(msgs[0]["content"] + "\n", False), (msgs[1]["content"] + "\n", True)])
    flat = [p for rec in pieces for p in rec]
    ids = tok.encode([text for text, _ in flat])
    eos = [] if tok.chat_template is not None or tok.eos_id is None else [tok.eos_id]
    tokens, mask, doc, lengths = [], [], [], []
    k = 0
    for r, rec in enumerate(pieces):
        start = len(tokens)
        for (_, target), piece_ids in zip(rec, ids[k: k + len(rec)]):
            tokens += piece_ids
            mask += [target] * len(piece_ids)
        k += len(rec)
        tokens += eos
        mask += [True] * len(eos)
        doc += [r] * (len(tokens) - start)
        lengths.append(len(tokens) - start)
    tokens_N, mask_N, doc_N = torch.tensor(tokens), torch.tensor(mask), torch.tensor(doc)
    lengths_R = torch.tensor(lengths)
    if len(records) >= 2:
        cut = int(lengths_R[: len(records) - _record_tail(lengths_R, seq)].sum())
    else:
        cut = _tail(tokens_N.numel(), seq)
    train, validation = _split_at(tokens_N, mask_N, cut, doc_N)
    kind = "chat" if chat is not None else "prompt/response"
    return Dataset("jsonl", tok.vocab, seq, train, validation, None,
                   _describe("jsonl", train, validation, f"{len(records):,} {kind} records of {name} "
                             "(loss on responses)"))


# ---------------------------------------------------------------- sentence pairs (encoders)

@dataclass(frozen=True)
class Sentences:
    """Tokenized texts end to end: text i is ids[offsets[i] : offsets[i+1]]."""

    ids: torch.Tensor  # (N,) int64
    offsets: torch.Tensor  # (P+1,) int64

    def __len__(self) -> int:
        return self.offsets.numel() - 1


@dataclass(frozen=True)
class PairSplit:
    anchors: Sentences  # pair i is (anchors[i], positives[i])
    positives: Sentences

    def __len__(self) -> int:
        return len(self.anchors)


@dataclass(frozen=True)
class Pairs:
    """A sentence encoder's data: (anchor, positive) pairs, split into train and validation."""

    vocab: int
    seq: int
    train: PairSplit
    validation: PairSplit
    description: str  # one line for the run summary


def load_pairs(source: str, args: dict, base_dir: Path) -> Pairs:
    """jsonl(path, seq, prompt=, response=, tokenizer=) as a sentence encoder reads it:
    record r is the pair (anchor = its prompt field, positive = its response field). Each
    text is tokenized on its own with the tokenizer's special tokens and truncated to seq
    tokens (`TextTokenizer.encode_sentences`), as sentence-transformers tokenizes a
    column with max_seq_length = seq. Validation is the last max(floor(R/20), 2) records
    of the R, train the records before it; both hold at least MIN_PAIRS pairs, so a file
    needs R >= 4. The checker lets only such declarations reach an encoder."""
    if source != "jsonl" or args.get("prompt") is None or args.get("response") is None:
        raise ValueError("sentence pairs come from jsonl(..., prompt=, response=) data")
    name, seq = args["path"], args["seq"]
    tok = _tokenizer(args, base_dir)
    records = _records(_read(base_dir, name), name)
    if len(records) < 2 * MIN_PAIRS:
        raise DataError(f"{name} has {len(records)} record(s); a sentence encoder's pairs need at least "
                        f"{2 * MIN_PAIRS}", "in-batch negatives need two pairs to train on and two to validate")
    sides = []
    for key in (args["prompt"], args["response"]):
        texts = [_field(obj, key, name, lineno) for lineno, obj in records]
        try:
            sides.append(tok.encode_sentences(texts, seq))
        except ValueError as e:
            raise DataError(f"{name}: {e}", "raise the data's seq") from None
    cut = len(records) - max(len(records) // VALIDATION_FRACTION, MIN_PAIRS)
    train = PairSplit(_sentences(sides[0][:cut]), _sentences(sides[1][:cut]))
    validation = PairSplit(_sentences(sides[0][cut:]), _sentences(sides[1][cut:]))
    return Pairs(tok.vocab, seq, train, validation,
                 f"jsonl: {len(train):,} train + {len(validation):,} validation pairs from {name}")


def _sentences(ids: list[list[int]]) -> Sentences:
    lengths_P = torch.tensor([len(x) for x in ids], dtype=torch.int64)
    offsets = torch.zeros(len(ids) + 1, dtype=torch.int64)
    offsets[1:] = lengths_P.cumsum(0)
    return Sentences(torch.tensor([t for x in ids for t in x], dtype=torch.int64), offsets)


def pair_batch(split: PairSplit, index: int, size: int, seed: int) -> torch.Tensor:
    """The (size,) pair numbers of training batch number `index`, drawn as `batch_windows`
    draws windows: each epoch visits every pair once, in an order fixed by (seed, epoch),
    so the batch is a function of (seed, index) alone and a resumed run reads the same
    pairs. Only a batch that straddles two epochs can hold a pair twice (the run refuses
    a batch larger than the train split)."""
    return _draw(len(split), index, size, seed)


def gather_pairs(split: PairSplit, ids_B: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs `ids_B` as (anchors, anchor keep, positives, positive keep), (B, S) each side,
    each side padded to its own longest text: the encoder's inputs `tokens` and `keep`."""
    return (*padded(split.anchors, ids_B), *padded(split.positives, ids_B))


def padded(texts: Sentences, ids_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts `ids_B` as (tokens, keep), both (B, S) with S the longest of them (at least
    1): keep is True on real tokens; padding is id 0, which `keep` hides from attention
    and from the mean."""
    start_B = texts.offsets[ids_B]
    len_B = texts.offsets[ids_B + 1] - start_B
    pos_S = torch.arange(max(int(len_B.max()), 1) if len(ids_B) else 1)
    keep_BS = pos_S < len_B[:, None]
    idx_BS = torch.where(keep_BS, start_B[:, None] + pos_S, 0)
    tokens_BS = texts.ids[idx_BS] if texts.ids.numel() else torch.zeros_like(idx_BS)  # all texts empty: no ids
    return torch.where(keep_BS, tokens_BS, 0), keep_BS


# ---------------------------------------------------------------- markov

MARKOV_VOCAB = 64
MARKOV_SUCCESSORS = 64  # K: a dense V x V matrix would take 32 GiB in float64 at vocab 65536
# Total Dirichlet concentration of a row, alpha = 6.4/K each: at vocab 64 (alpha 0.1) the
# entropy rate is ~2.35 nats against log 64 = 4.16. A fixed alpha of 0.1 made small vocabs
# near-deterministic (vocab 2: H = 2e-6 nats).
MARKOV_CONCENTRATION = 6.4
MARKOV_TRAIN_TOKENS = 2**20
MARKOV_VALIDATION_TOKENS = 2**16
MARKOV_CHAIN_TOKENS = 4096  # chains are at least this long, so ~1 target in 4096 is masked


def _markov_chain(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chain drawn from `seed`: successors (V, K), their probabilities (V, K) and the
    stationary distribution (V,), all exact in float64.

    Symbol i can be followed by (i + o) mod V for the K = min(V, 64) offsets o: 0 and 1,
    and K-2 distinct others drawn at random (every symbol when V <= 64, a dense matrix).
    Offset 0 makes the chain aperiodic and offset 1 irreducible, so the stationary
    distribution is unique and power iteration converges to it. Each row's
    probabilities are a Dirichlet(6.4/K) draw (normalised Gamma samples); at vocab 64 the
    entropy rate is ~2.35 nats, well below log 64 = 4.16.
    """
    g = _generator("markov", seed)
    k = min(vocab, MARKOV_SUCCESSORS)
    offsets_K = torch.cat([torch.tensor([0, 1]), torch.randperm(vocab - 2, generator=g)[: k - 2] + 2])
    succ_VK = (torch.arange(vocab)[:, None] + offsets_K) % vocab
    alpha_VK = torch.full((vocab, k), MARKOV_CONCENTRATION / k, dtype=torch.float64)
    gamma_VK = torch._standard_gamma(alpha_VK, generator=g)  # the only seeded Gamma sampler torch has
    p_VK = gamma_VK / gamma_VK.sum(1, keepdim=True)
    pi_V = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    for _ in range(100_000):
        nxt_V = torch.zeros_like(pi_V).index_add_(0, succ_VK.flatten(), (pi_V[:, None] * p_VK).flatten())
        done = float((nxt_V - pi_V).abs().sum()) < 1e-13
        pi_V = nxt_V
        if done:
            break
    else:
        raise AssertionError(f"power iteration did not converge for markov(vocab={vocab}, seed={seed})")
    assert abs(float(pi_V.sum()) - 1.0) < 1e-9 and float(pi_V.min()) >= 0.0, "pi is not a distribution"
    return succ_VK, p_VK, pi_V


def _sample_chains(succ_VK: torch.Tensor, p_VK: torch.Tensor, pi_V: torch.Tensor,
                   u_CL: torch.Tensor) -> torch.Tensor:
    """Chains (C, L) driven by uniforms u_CL: column 0 from pi, then one step of the chain a
    column, each by inverse CDF (the first cumulative probability above u)."""
    cum_V = pi_V.cumsum(0)
    cum_VK = p_VK.cumsum(1)
    cum_V[-1] = cum_VK[:, -1] = 1.0  # rounding must not leave u in [sum, 1) without a symbol
    u_LC = u_CL.T.contiguous()  # time-major: each step reads and writes contiguous rows
    x_LC = torch.empty(u_LC.shape, dtype=torch.int64)
    x_LC[0] = torch.searchsorted(cum_V, u_LC[0], right=True)
    for t in range(1, u_LC.shape[0]):
        j_C = torch.searchsorted(cum_VK[x_LC[t - 1]], u_LC[t, :, None], right=True).squeeze(1)
        x_LC[t] = succ_VK[x_LC[t - 1], j_C]
    return x_LC.T


def _lay_out(x_CL: torch.Tensor, length: int) -> Split:
    """Chains (C, length+1) laid end to end: chain c fills stream[c*length : (c+1)*length],
    and the last chain adds its extra token so that the final window is complete. The first
    token of each chain is masked: it is the last target of the window before it, and its
    predecessor belongs to another chain."""
    n_chains = x_CL.shape[0]
    tokens_N = torch.cat([x_CL[:, :length].reshape(-1), x_CL[-1, length:]])  # (C, L) -> (C*L,), + 1
    mask_N = torch.ones_like(tokens_N, dtype=torch.bool)
    mask_N[0 : n_chains * length : length] = False
    return Split(tokens_N, mask_N)


def _load_markov(args: dict, base_dir: Path) -> Dataset:
    """markov(seq, seed=0, vocab=64): text from a first-order Markov chain over `vocab`
    symbols (see `_markov_chain`), with its entropy rate
    H = -sum_i pi_i sum_j P_ij log P_ij (nats per token).

    Layout: many independent chains, each started from pi (so every token is distributed
    as pi) and L = seq * ceil(4096 / seq) tokens long, laid end to end (see `_lay_out`).
    Because L is a multiple of seq, windows k*c ... k*c + k-1 (k = L/seq) lie inside chain
    c, except that the last target of the last of them is chain c+1's first token, which
    the mask removes. So every target is a true step of the chain from its input, and the
    expected loss of the ideal model is exactly H. Train has ceil(2^20 / L) chains,
    validation ceil(2^16 / L) chains drawn from a different sub-seed of the same P.

    The time loop runs L steps over all chains at once: 0.13 s at seq=128 and 0.9 s at
    seq=65536 on 2 cores; vocab 65536 adds ~2 s of power iteration.
    """
    seq, seed, vocab = args["seq"], args.get("seed", 0), args.get("vocab", MARKOV_VOCAB)
    succ_VK, p_VK, pi_V = _markov_chain(vocab, seed)
    entropy = float(-(pi_V * torch.special.xlogy(p_VK, p_VK).sum(1)).sum())
    length = seq * math.ceil(MARKOV_CHAIN_TOKENS / seq)
    n_train, n_val = math.ceil(MARKOV_TRAIN_TOKENS / length), math.ceil(MARKOV_VALIDATION_TOKENS / length)
    u_CL = torch.cat([  # both splits step together: one time loop instead of two
        torch.rand(n, length + 1, dtype=torch.float64, generator=_generator(seed, split))
        for n, split in ((n_train, "train"), (n_val, "validation"))
    ])
    x_CL = _sample_chains(succ_VK, p_VK, pi_V, u_CL)
    train, validation = _lay_out(x_CL[:n_train], length), _lay_out(x_CL[n_train:], length)
    origin = f"{n_train} + {n_val} chains over {vocab} symbols, entropy rate {entropy:.4f} nats/token"
    return Dataset("markov", vocab, seq, train, validation, entropy, _describe("markov", train, validation, origin))


# ---------------------------------------------------------------- stdlib_text

STDLIB_CAP = 3_000_000  # bytes of docstrings; CPython 3.11's whole stdlib has 1.8 MB, parsed in ~1.8 s
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _stdlib_docstrings(root: str) -> tuple[list[str], int]:
    """Docstrings of the *.py files under `root` in sorted walk order, until STDLIB_CAP
    bytes, and the number of files they came from. Files are parsed, never imported."""
    docs, size, files = [], 0, 0
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP)  # in place: os.walk descends in this order
        for fname in sorted(n for n in names if n.endswith(".py")):
            try:
                tree = ast.parse(Path(folder, fname).read_bytes())
            except (OSError, SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
                continue
            found = [d for n in ast.walk(tree) if isinstance(n, _DOC_NODES) and (d := ast.get_docstring(n, clean=True))]
            files += bool(found)
            docs += found
            size += sum(len(d.encode("utf-8")) + 2 for d in found)
            if size >= STDLIB_CAP:
                return docs, files
    return docs, files


def _load_stdlib_text(args: dict, base_dir: Path) -> Dataset:
    """stdlib_text(seq, tokenizer="bytes"): the docstrings (module, class, function) of the standard library's
    own modules, joined by "\\n\\n", as UTF-8 bytes (vocab 256), cut to STDLIB_CAP bytes.
    Test suites and site-packages are skipped, as are files that do not parse. The same
    Python install always gives the same stream. Validation is the last
    max(floor(N/20), seq+1) tokens."""
    seq, root = args["seq"], sysconfig.get_paths()["stdlib"]
    # AST nodes hold no reference cycles, so the collector only costs time here: with torch
    # imported, the walk took 2.9 s with it and 1.8 s without (CPython 3.11, whole stdlib).
    enabled = gc.isenabled()
    gc.disable()
    try:
        docs, files = _stdlib_docstrings(root)
    finally:
        if enabled:
            gc.enable()
    if not docs:
        raise DataError(f"no docstrings found in the standard library at {root}",
                        "this Python install ships without its library sources; use text(...) instead")
    tok = _tokenizer(args, base_dir)
    if tok.name == "bytes":
        tokens_N = _bytes_tokens("\n\n".join(docs).encode("utf-8")[:STDLIB_CAP])
    else:
        tokens_N = _joined(tok, docs, "\n\n")
    train, validation = _split_at(tokens_N, None, _tail(tokens_N.numel(), seq))
    return Dataset("stdlib_text", tok.vocab, seq, train, validation, None,
                   _describe("stdlib_text", train, validation, f"{files:,} files of {root}"))


_LOADERS = {"text": _load_text, "jsonl": _load_jsonl, "markov": _load_markov, "stdlib_text": _load_stdlib_text}
