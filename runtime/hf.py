"""Hugging Face checkpoints in and out: each family's name mapping, lazy reading, writing.

Reading. `CheckpointReader(model)` is a read-only mapping from effc's canonical param
paths (`layers[0].attn.q.weight`) to tensors, over the checkpoint's safetensors files
(one `model.safetensors`, or the shards named by `model.safetensors.index.json`).
Nothing is read until a tensor is asked for, and then only that tensor (or, for GPT-2's
fused attention projection, only its slice): `materialize` copies each one into its
parameter and drops it, so loading holds the model plus one tensor. `check(ir)` compares
every name and shape with what config.json implies, from the files' headers alone.
Weights are converted to the IR's dtype (fp32). No pickle file is ever opened.

Writing. `write_hf(folder, ...)` writes config.json, the weights as safetensors (sharded
with an index above `max_shard_bytes`) and the source checkpoint's tokenizer files, so
that transformers' Auto classes load the folder.

Mapping tables (canonical path -> Hugging Face name; `i` is the layer), one per family,
also in docs/models.md:
- llama: embed -> model.embed_tokens, layers[i].attn_norm -> model.layers.i.input_layernorm,
  layers[i].attn.{q,k,v,o} -> model.layers.i.self_attn.{q,k,v,o}_proj,
  layers[i].mlp_norm -> model.layers.i.post_attention_layernorm,
  layers[i].mlp.{gate,up,down} -> model.layers.i.mlp.{gate,up,down}_proj, norm -> model.norm,
  head -> lm_head.
- gpt2: embed -> transformer.wte, pos_embed -> transformer.wpe, layers[i].attn_norm ->
  transformer.h.i.ln_1, layers[i].attn.{q,k,v} -> thirds of transformer.h.i.attn.c_attn,
  layers[i].attn.o -> transformer.h.i.attn.c_proj, layers[i].mlp_norm -> transformer.h.i.ln_2,
  layers[i].mlp.up -> transformer.h.i.mlp.c_fc, layers[i].mlp.down -> transformer.h.i.mlp.c_proj,
  norm -> transformer.ln_f, head -> lm_head (tied to wte). GPT-2's Conv1D stores (in, out):
  its weights are transposed on the way in and out.
- bert: embed -> embeddings.word_embeddings, pos_embed -> embeddings.position_embeddings,
  type_embed -> embeddings.token_type_embeddings, embed_norm -> embeddings.LayerNorm,
  layers[i].attn.{q,k,v} -> encoder.layer.i.attention.self.{query,key,value},
  layers[i].attn.o -> encoder.layer.i.attention.output.dense, layers[i].attn_norm ->
  encoder.layer.i.attention.output.LayerNorm, layers[i].mlp.up ->
  encoder.layer.i.intermediate.dense, layers[i].mlp.down -> encoder.layer.i.output.dense,
  layers[i].mlp_norm -> encoder.layer.i.output.LayerNorm. The pooler (pooler.dense) is
  not part of the sentence embedding; it is carried through an hf export unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from effc.compiler.ir import IR
from effc.compiler.lower import lower_arch
from effc.lang.hf import _PREFIXES, HFModel, Source, read_hf, source  # noqa: F401 (re-exported)
from effc.lang.tree import Arch
from effc.runtime.checkpoint import atomic_write_json, write_tensors
from effc.runtime.model import materialize

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "tokenizer.model", "added_tokens.json", "generation_config.json")
MAX_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


class HFError(Exception):
    """A checkpoint's weights cannot be used; message and hint are for the user."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


# The mapping tables and `source` live in effc.lang.hf (the checker reads them too).


# ---------------------------------------------------------------- reading


def weight_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint, or HFError saying what is there instead."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise HFError(f"cannot read {index}: {e}", "the index must be JSON with a 'weight_map' object") from None
        missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise HFError(f"shard '{missing[0]}' named by model.safetensors.index.json is missing",
                          f"the index names {len(names)} shards; copy the checkpoint folder completely")
        return [os.path.join(folder, n) for n in names]
    if os.path.isfile(single):
        return [single]
    pickled = [n for n in ("pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json")
               if os.path.exists(os.path.join(folder, n))]
    if pickled:
        raise HFError(f"'{folder}' holds {pickled[0]}, a pickle file, which effc never loads",
                      "convert it to safetensors once with a tool you trust (for example transformers' "
                      "save_pretrained(..., safe_serialization=True))")
    raise HFError(f"'{folder}' has no model.safetensors or model.safetensors.index.json",
                  "a Hugging Face checkpoint keeps its weights in safetensors files beside config.json")


class CheckpointReader(Mapping):
    """Canonical path -> tensor (fp32), read from the checkpoint only when asked for."""

    def __init__(self, model: HFModel, ir: IR):
        self.model = model
        self.family = model.family
        self.files = weight_files(model.folder)
        self._where: dict[str, str] = {}  # HF name -> file
        self._handles: dict[str, object] = {}
        for f in self.files:
            for name in self._open(f).keys():
                self._where[name] = f
        self.params = {p.path: p for p in ir.params() if p.tied_to is None and p.role != "adapter"}
        self._names = {path: self._resolve(source(self.family, path)) for path in self.params}

    def _open(self, f: str):
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(f, framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise HFError(f"cannot read {f}: {e}", "the file is damaged or not a safetensors file") from None
        return self._handles[f]

    def _resolve(self, src: Source) -> tuple[Source, str | None]:
        """The source with the name as stored (prefixes differ between task models)."""
        base = src.name
        for old in _PREFIXES[self.family]:
            if old and not base.startswith(old):
                continue
            stem = base[len(old):]
            for new in _PREFIXES[self.family]:
                if new + stem in self._where:
                    return Source(new + stem, src.transposed, src.part, src.parts), self._where[new + stem]
        return src, None

    def check(self) -> None:
        """Every param present with the shape config.json implies (headers only)."""
        for path, p in self.params.items():
            src, f = self._names[path]
            if f is None:
                near = sorted(self._where)[:6]
                raise HFError(f"the checkpoint has no tensor '{src.name}' (effc's {path})",
                              f"it holds {len(self._where)} tensors, such as {', '.join(near)}; "
                              "is config.json from the same checkpoint as the weights?")
            shape = list(self._open(f).get_slice(src.name).get_shape())
            want = list(p.shape)
            if src.transposed:
                want = want[::-1]
            if src.parts > 1:
                want[-1 if src.transposed else 0] *= src.parts
            if shape != want:
                raise HFError(f"tensor '{src.name}' has shape {tuple(shape)}, but config.json implies {tuple(want)}",
                              "config.json and the weights disagree: is the folder complete and from one checkpoint?")

    def __getitem__(self, path: str) -> torch.Tensor:
        if path not in self._names:
            raise KeyError(path)
        src, f = self._names[path]
        if f is None:
            raise KeyError(path)
        sl = self._open(f).get_slice(src.name)
        if src.parts > 1:  # one third of GPT-2's fused (in, 3 * out) c_attn
            shape = sl.get_shape()
            n = shape[-1] // src.parts
            lo, hi = src.part * n, (src.part + 1) * n
            t = sl[:, lo:hi] if len(shape) == 2 else sl[lo:hi]
        else:
            t = sl[:]
        if src.transposed:
            t = t.T
        return t.to(getattr(torch, self.params[path].dtype)).contiguous()

    def __contains__(self, path: object) -> bool:
        return path in self._names and self._names[path][1] is not None

    def __iter__(self) -> Iterator[str]:
        return (p for p, (_, f) in self._names.items() if f is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def extra(self) -> dict[str, torch.Tensor]:
        """Tensors of the checkpoint that effc's tree does not use (BERT's pooler): an hf
        export writes them back unchanged."""
        used = {src.name for src, _ in self._names.values()}
        return {n: self._open(f).get_tensor(n) for n, f in self._where.items()
                if n not in used and not n.endswith(".position_ids")}  # a buffer of old checkpoints


def load(folder: str, seq: int | None = None, output: str | None = None):
    """A checkpoint as (HFModel, IR, fx graph) with its weights: the Python entry point
    that tests and tools use. Raises HFConfigError or HFError."""
    model = read_hf(folder, seq)
    ir = lower_arch(model.arch, None)
    reader = CheckpointReader(model, ir)
    reader.check()
    gm, fresh = materialize(ir, model.arch.seq, reader, seed=0, output=output)
    if fresh:
        raise HFError(f"the checkpoint lacks {fresh[0]}")
    return model, ir, gm


# ---------------------------------------------------------------- writing


def hf_state(family: str, state: Mapping[str, torch.Tensor], arch: Arch) -> dict[str, torch.Tensor]:
    """effc's canonical state -> Hugging Face names (fused and transposed as the family
    stores them). A tied head is not written (transformers ties it from the config)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list] = {}
    for path, t in state.items():
        src = source(family, path)
        t = t.T if src.transposed else t
        if src.parts > 1:
            fused.setdefault(src.name, [None] * src.parts)[src.part] = t
        else:
            out[src.name] = t.contiguous()
    for name, parts in fused.items():
        out[name] = torch.cat(parts, dim=-1 if parts[0].dim() == 2 else 0).contiguous()
    return out


def decoder_config(arch: Arch) -> dict:
    """config.json of a LlamaForCausalLM equal to effc's built-in decoder."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": arch.vocab,
            "hidden_size": arch.dim, "intermediate_size": arch.ffn, "num_hidden_layers": arch.layers,
            "num_attention_heads": arch.heads, "num_key_value_heads": arch.kv_heads, "head_dim": arch.head_dim,
            "max_position_embeddings": arch.seq, "rms_norm_eps": arch.norm_eps, "rope_theta": arch.rope_theta,
            "hidden_act": "silu", "tie_word_embeddings": arch.tied, "attention_bias": False, "mlp_bias": False,
            "torch_dtype": "float32"}


def write_hf(folder: Path, family: str, config: dict, state: Mapping[str, torch.Tensor], arch: Arch,
             source_folder: str | None = None, extra: Mapping[str, torch.Tensor] | None = None,
             max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write a transformers-loadable folder; returns the file names written."""
    tensors = hf_state(family, state, arch)
    tensors.update(extra or {})
    cfg = dict(config)
    cfg["tie_word_embeddings"] = arch.tied
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "float32"
    atomic_write_json(folder / "config.json", cfg)
    written = ["config.json"] + _write_shards(folder, tensors, max_shard_bytes)
    if source_folder:
        written += copy_tokenizer(source_folder, folder)
    return written


def copy_tokenizer(source_folder: str, folder: Path) -> list[str]:
    """The source checkpoint's tokenizer files, copied into an export; returns their names."""
    written = []
    for name in TOKENIZER_FILES:
        src = os.path.join(source_folder, name)
        if os.path.isfile(src):
            shutil.copyfile(src, folder / name)
            written.append(name)
    return written


def _write_shards(folder: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> list[str]:
    """One model.safetensors, or shards model-0000K-of-0000N.safetensors of at most
    max_bytes each (a larger tensor gets a shard of its own) and their index."""
    names = sorted(tensors)
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        b = tensors[n].numel() * tensors[n].element_size()
        if shards[-1] and size + b > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_tensors(folder / "model.safetensors", tensors, metadata=meta)
        return ["model.safetensors"]
    files, weight_map = [], {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_tensors(folder / fname, {n: tensors[n] for n in shard}, metadata=meta)
        files.append(fname)
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write_json(folder / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files + ["model.safetensors.index.json"]
