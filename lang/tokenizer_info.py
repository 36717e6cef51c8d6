"""What the checker needs to know about a tokenizer, read as JSON (no `tokenizers` import):
its vocabulary size, whether its folder has a chat template, and why it is unusable.

A tokenizer argument is "bytes" (byte-level: ids 0..255) or a path, already resolved by
the checker, to a `tokenizer.json` file or to a folder that holds one (a Hugging Face
checkpoint). Beside the file, `tokenizer_config.json` may give `chat_template` (a string,
or a list of {"name", "template"} of which "default" is used), `eos_token` and
`bos_token` (strings or {"content": ...} objects).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


class TokenizerError(Exception):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


@dataclass(frozen=True)
class TokenizerInfo:
    file: str  # the tokenizer.json
    vocab: int  # ids the tokenizer can produce: max id + 1 over the model vocab and added tokens
    chat_template: str | None
    eos_token: str | None
    bos_token: str | None


_CACHE: dict[tuple, TokenizerInfo] = {}


def tokenizer_file(path: str) -> str:
    if os.path.isdir(path):
        f = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(f):
            raise TokenizerError(f"'{path}' has no tokenizer.json",
                                 "name a tokenizer.json file, or a checkpoint folder that holds one")
        return f
    return path


def _token(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _template(v) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        named = {t.get("name"): t.get("template") for t in v if isinstance(t, dict)}
        t = named.get("default")
        return t if isinstance(t, str) else None
    return None


def read_tokenizer(path: str) -> TokenizerInfo:
    f = tokenizer_file(path)
    try:
        stamp = os.stat(f).st_mtime_ns
    except OSError:
        raise TokenizerError(f"'{f}' does not exist", "paths are relative to the .eff file's folder") from None
    key = (f, stamp)
    if key in _CACHE:
        return _CACHE[key]
    try:
        with open(f, encoding="utf-8") as fh:
            data = json.load(fh)
        ids = list(data["model"]["vocab"].values()) if isinstance(data["model"].get("vocab"), dict) else \
            list(range(len(data["model"]["vocab"])))  # Unigram: a list of [piece, score]
        ids += [t["id"] for t in data.get("added_tokens") or []]
        vocab = max(int(i) for i in ids) + 1
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise TokenizerError(f"'{f}' is not a tokenizer.json file",
                             "it must be the JSON a Hugging Face tokenizer saves (with a 'model' and its 'vocab')"
                             ) from None
    config: dict = {}
    cfg_path = os.path.join(os.path.dirname(f), "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as fh:
                config = json.load(fh)
        except (OSError, UnicodeDecodeError, ValueError):
            raise TokenizerError(f"'{cfg_path}' is not valid JSON", "fix or remove tokenizer_config.json") from None
        if not isinstance(config, dict):
            config = {}
    info = TokenizerInfo(f, vocab, _template(config.get("chat_template")), _token(config.get("eos_token")),
                         _token(config.get("bos_token")))
    _CACHE[key] = info
    return info
