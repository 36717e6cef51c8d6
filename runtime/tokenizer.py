"""Text to token ids: bytes, or a Hugging Face tokenizer.json, and chat templates.

`open_tokenizer("bytes" | path)` gives a `TextTokenizer`. Byte-level: each UTF-8 byte is a
token (ids 0..255), no special tokens. A tokenizer.json is loaded with the `tokenizers`
library (never with transformers, never from pickle) and used as its files say, with two
rules of effc's: `encode` adds no special tokens (no BOS, no SEP), and it neither pads nor
truncates whatever tokenizer.json presets; documents and records are joined explicitly
(`eos_id`, from tokenizer_config.json's eos_token when it names a token). A sentence
encoder's texts are encoded one by one with the special tokens (`encode_sentences`).

Chat templates (tokenizer_config.json's `chat_template`) are Jinja templates, as
transformers renders them: in jinja2's ImmutableSandboxedEnvironment, which refuses
attribute access to Python internals, so a template is data and cannot run code. The
globals are `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and
`raise_exception` (a template's own error, reported as a DataError).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from effc.lang.tokenizer_info import TokenizerError, read_tokenizer


class TemplateError(Exception):
    """A chat template raised or failed to render; the message is the template's."""


@dataclass
class TextTokenizer:
    name: str  # "bytes" or the tokenizer.json path
    vocab: int
    eos_id: int | None
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    _tok: object = None  # tokenizers.Tokenizer, or None for bytes
    _template: object = None

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self._tok is None:
            return [list(t.encode("utf-8")) for t in texts]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_sentences(self, texts: list[str], seq: int) -> list[list[int]]:
        """Each text on its own, as a sentence encoder reads it and sentence-transformers
        tokenizes it: with the tokenizer's special tokens (BERT's post-processor wraps a
        sentence in [CLS] ... [SEP]), truncated to at most `seq` tokens with the special
        tokens kept, never padded (a batch pads). Truncation is a setting of the tokenizer
        object, so a copy truncates and `encode` keeps reading whole documents. Bytes: each
        text's UTF-8 bytes, cut to `seq`. Raises ValueError when `seq` cannot hold the
        special tokens and one token of text."""
        if self._tok is None:
            return [list(t.encode("utf-8"))[:seq] for t in texts]
        from tokenizers import Tokenizer

        special = self._tok.num_special_tokens_to_add(False)
        if seq <= special:
            raise ValueError(f"seq={seq} leaves no room for text beside the tokenizer's {special} special tokens")
        tok = Tokenizer.from_str(self._tok.to_str())  # 20 ms for a 30k-token vocabulary
        tok.enable_truncation(seq)
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=True)]

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self._template is None:
            self._template = _environment().from_string(self.chat_template)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError:
            raise
        except Exception as e:  # jinja2's errors, and the sandbox's SecurityError
            raise TemplateError(f"{type(e).__name__}: {e}") from None


def _raise(message: str):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment():
    """The environment transformers renders chat templates in: sandboxed, blocks trimmed,
    loop controls, a JSON filter that keeps non-ASCII text."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    return env


def open_tokenizer(spec: str) -> TextTokenizer:
    """Raises TokenizerError (message, hint) for a file the tokenizers library cannot load."""
    if spec == "bytes":
        return TextTokenizer("bytes", 256, None, None, None, None)
    info = read_tokenizer(spec)
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(info.file)
    except Exception as e:  # the library raises a plain Exception for a malformed file
        raise TokenizerError(f"the tokenizers library cannot load '{info.file}': {e}",
                             "the file is damaged, or from a tokenizers version newer than this one") from None
    # tokenizer.json may preset padding and truncation (all-MiniLM-L6-v2's pads and cuts every
    # text to 128 tokens): `encode` reads whole documents, so neither applies to it.
    tok.no_padding()
    tok.no_truncation()
    eos = tok.token_to_id(info.eos_token) if info.eos_token else None
    return TextTokenizer(info.file, info.vocab, eos, info.chat_template, info.bos_token, info.eos_token, tok)
