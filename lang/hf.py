"""Hugging Face checkpoint folders, as the front end sees them: `config.json` only.

`read_hf(folder, seq)` reads a checkpoint's config.json and describes the model as an
`Arch` (see `effc.lang.tree`), or raises `HFConfigError` saying which field is missing,
unsupported or inconsistent. Checking and costing need nothing else, so a folder holding
just the config of a 70B model checks in milliseconds; the weights are read by the
runtime (`effc.runtime.hf`). No torch here, and nothing from the folder is executed.

Families and the config fields they honour (docs/models.md has the full table):
- llama (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM): hidden_size,
  intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
  head_dim, max_position_embeddings, rms_norm_eps, tie_word_embeddings, rope_theta and
  rope_scaling (or transformers 5's rope_parameters; types default, linear, llama3),
  attention_bias and mlp_bias (Llama), Qwen2's q/k/v biases; hidden_act must be silu; a
  sliding window shorter than the sequence is refused.
- gpt2 (GPT2LMHeadModel): n_embd, n_layer, n_head, n_inner, n_positions,
  layer_norm_epsilon, activation_function (gelu_new, gelu), tie_word_embeddings.
- bert (BertModel): hidden_size, num_hidden_layers, num_attention_heads,
  intermediate_size, hidden_act, max_position_embeddings, type_vocab_size, layer_norm_eps;
  absolute positions only. The model's output is its mean-pooled last hidden state (a
  sentence embedding, as sentence-transformers computes it).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from effc.lang.tree import Arch, RopeScaling
from effc.lang.types import Problem

ARCHITECTURES = {  # the `architectures` entry of config.json -> effc's family
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "llama",
    "GPT2LMHeadModel": "gpt2", "BertModel": "bert",
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "gpt2": "GPT2LMHeadModel", "bert": "BertModel"}
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


class HFConfigError(Exception):
    """`arg`: the argument of hf(...) to blame ("path": the folder's config; "seq")."""

    def __init__(self, message: str, hint: str | None = None, arg: str = "path"):
        super().__init__(message)
        self.message, self.hint, self.arg = message, hint, arg


@dataclass(frozen=True)
class HFModel:
    folder: str
    family: str  # "llama" | "gpt2" | "bert"
    model_type: str
    architecture: str
    arch: Arch
    config: dict = field(default_factory=dict, compare=False, repr=False)  # config.json as read


_CACHE: dict[tuple, HFModel] = {}


def read_hf(folder: str, seq: int | None = None) -> HFModel:
    path = os.path.join(folder, "config.json")
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        if not os.path.isdir(folder):
            raise HFConfigError(f"'{folder}' is not a folder",
                                "hf(...) names a Hugging Face checkpoint folder (config.json, *.safetensors)") from None
        raise HFConfigError(f"'{folder}' has no config.json",
                            "a Hugging Face checkpoint folder holds config.json beside its weights") from None
    key = (path, stamp, seq)
    if key not in _CACHE:
        _CACHE[key] = _describe(folder, _load_json(path), seq)
    return _CACHE[key]


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HFConfigError(f"cannot read {path}: {e}", "config.json must be a JSON object (UTF-8)") from None
    if not isinstance(cfg, dict):
        raise HFConfigError(f"{path} holds JSON that is not an object", "config.json must be a JSON object")
    return cfg


class _Fields:
    """Typed reads of config fields, each failure naming the field."""

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def get(self, name: str, kind: type | tuple, default: Any = ...) -> Any:
        if name not in self.cfg or self.cfg[name] is None:
            if default is ...:
                raise HFConfigError(f"config.json has no '{name}'", "this field is required for this architecture")
            return default
        v = self.cfg[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
            raise HFConfigError(f"config.json field '{name}' is {v!r}, expected {kinds[0].__name__}")
        if isinstance(v, int) and not isinstance(v, bool) and v < 0:
            raise HFConfigError(f"config.json field '{name}' is negative ({v})")
        return v

    def positive(self, name: str, default: Any = ...) -> int:
        v = self.get(name, int, default)
        if v is not None and v <= 0:
            raise HFConfigError(f"config.json field '{name}' must be positive, is {v}")
        return v

    def require(self, name: str, want: Any, default: Any, why: str) -> None:
        v = self.cfg.get(name, default)
        if v != want:
            raise HFConfigError(f"config.json sets {name}={json.dumps(v)}, which effc does not support", why)


def _architecture(cfg: dict) -> tuple[str, str]:
    archs = cfg.get("architectures")
    mtype = cfg.get("model_type")
    if isinstance(archs, list) and archs:
        name = archs[0]
        if name not in ARCHITECTURES:
            raise HFConfigError(f"architecture '{name}' is not supported",
                                f"supported: {', '.join(sorted(ARCHITECTURES))} (docs/models.md)")
        return name, str(mtype or "")
    if mtype in MODEL_TYPES:
        return MODEL_TYPES[mtype], mtype
    raise HFConfigError(f"config.json names no supported architecture (model_type {mtype!r})",
                        f"supported: {', '.join(sorted(ARCHITECTURES))} (docs/models.md)")


def _describe(folder: str, cfg: dict, seq: int | None) -> HFModel:
    name, mtype = _architecture(cfg)
    family = ARCHITECTURES[name]
    f = _Fields(cfg)
    arch = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}[family](f, name, seq)
    if arch.heads % arch.kv_heads:
        raise HFConfigError(f"num_key_value_heads={arch.kv_heads} does not divide num_attention_heads={arch.heads}")
    return HFModel(folder, family, mtype, name, arch, cfg)


def _seq(f: _Fields, field: str, seq: int | None) -> int:
    limit = f.positive(field)
    if seq is not None and seq > limit:
        raise HFConfigError(f"seq={seq} is longer than the checkpoint's {field}={limit}",
                            f"use seq={limit} or less", arg="seq")
    return seq or limit


def _rope(f: _Fields) -> tuple[float, RopeScaling]:
    params = f.get("rope_parameters", dict, None)  # transformers 5
    scaling = f.get("rope_scaling", dict, None)
    theta = f.get("rope_theta", float, None)
    if params is not None:
        theta = float(params.get("rope_theta", theta if theta is not None else 10000.0))
        scaling = params
    theta = 10000.0 if theta is None else theta
    if not scaling:
        return theta, RopeScaling()
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise HFConfigError(f"rope scaling type '{kind}' is not supported",
                            f"supported rope types: {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return theta, RopeScaling()
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return theta, RopeScaling("linear", factor)
    return theta, RopeScaling("llama3", factor, float(scaling.get("low_freq_factor", 1.0)),
                              float(scaling.get("high_freq_factor", 4.0)),
                              int(scaling.get("original_max_position_embeddings", 8192)))


def _llama(f: _Fields, name: str, seq: int | None) -> Arch:
    f.require("hidden_act", "silu", "silu", "the Llama family's MLP is SwiGLU: silu(gate) * up")
    dim, heads = f.positive("hidden_size"), f.positive("num_attention_heads")
    head_dim = f.positive("head_dim", None) or dim // heads
    if head_dim * heads != dim and f.get("head_dim", int, None) is None:
        raise HFConfigError(f"num_attention_heads={heads} does not divide hidden_size={dim}",
                            "give head_dim in config.json")
    if head_dim % 2:
        raise HFConfigError(f"head_dim={head_dim} is odd", "rotary embeddings rotate channel pairs")
    seq = _seq(f, "max_position_embeddings", seq)
    window_on = name != "Qwen2ForCausalLM" or f.get("use_sliding_window", bool, False)
    window = f.get("sliding_window", int, None) if window_on else None
    if window is not None and window < seq:
        raise HFConfigError(f"sliding_window={window} is shorter than the sequence ({seq})",
                            f"sliding-window attention is not supported: use seq={window} or less")
    theta, scaling = _rope(f)
    qwen = name == "Qwen2ForCausalLM"
    attn_bias = f.get("attention_bias", bool, False)
    return Arch(vocab=f.positive("vocab_size"), dim=dim, layers=f.positive("num_hidden_layers"), heads=heads,
                kv_heads=f.positive("num_key_value_heads", None) or heads, head_dim=head_dim,
                ffn=f.positive("intermediate_size"), seq=seq, tied=f.get("tie_word_embeddings", bool, False),
                norm_eps=f.get("rms_norm_eps", float, 1e-6), rope_theta=theta, rope_scaling=scaling,
                qkv_bias=qwen or attn_bias, o_bias=attn_bias and not qwen, mlp_bias=f.get("mlp_bias", bool, False))


def _activation(f: _Fields, field: str, default: str) -> str:
    act = f.get(field, str, default)
    if act not in ACTIVATIONS:
        raise HFConfigError(f"config.json sets {field}=\"{act}\", which effc does not support",
                            f"supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def _gpt2(f: _Fields, name: str, seq: int | None) -> Arch:
    f.require("scale_attn_by_inverse_layer_idx", False, False, "effc scales attention by 1/sqrt(head_dim) only")
    f.require("add_cross_attention", False, False, "effc's GPT-2 is a decoder without cross-attention")
    f.require("scale_attn_weights", True, True, "effc scales attention by 1/sqrt(head_dim)")
    dim, heads = f.positive("n_embd"), f.positive("n_head")
    if dim % heads:
        raise HFConfigError(f"n_head={heads} does not divide n_embd={dim}")
    rows = f.positive("n_positions")
    seq = _seq(f, "n_positions", seq)
    return Arch(position_rows=rows, vocab=f.positive("vocab_size"), dim=dim, layers=f.positive("n_layer"), heads=heads, kv_heads=heads,
                head_dim=dim // heads, ffn=f.positive("n_inner", None) or 4 * dim, seq=seq,
                tied=f.get("tie_word_embeddings", bool, True), norm="layer",
                norm_eps=f.get("layer_norm_epsilon", float, 1e-5), positions="learned",
                mlp=_activation(f, "activation_function", "gelu_new"), qkv_bias=True, o_bias=True, mlp_bias=True)


def _bert(f: _Fields, name: str, seq: int | None) -> Arch:
    f.require("position_embedding_type", "absolute", "absolute", "effc's BERT has learned absolute positions")
    f.require("is_decoder", False, False, "effc reads BERT as a bidirectional encoder")
    dim, heads = f.positive("hidden_size"), f.positive("num_attention_heads")
    if dim % heads:
        raise HFConfigError(f"num_attention_heads={heads} does not divide hidden_size={dim}")
    rows = f.positive("max_position_embeddings")
    seq = _seq(f, "max_position_embeddings", seq)
    return Arch(position_rows=rows,
                vocab=f.positive("vocab_size"), dim=dim, layers=f.positive("num_hidden_layers"), heads=heads,
                kv_heads=heads, head_dim=dim // heads, ffn=f.positive("intermediate_size"), seq=seq, norm="layer",
                norm_eps=f.get("layer_norm_eps", float, 1e-12), post_norm=True, positions="learned",
                mlp=_activation(f, "hidden_act", "gelu"), qkv_bias=True, o_bias=True, mlp_bias=True, causal=False,
                type_vocab=f.positive("type_vocab_size", 2), embed_norm=True, final_norm=False, output="embedding")


# ---------------------------------------------------------------- the registry's view


def hf_arch(args: Mapping) -> Arch | None:
    """The catalog's entry for `hf(...)`: None when the folder is unusable (the registry's
    constraint has reported why)."""
    try:
        return read_hf(str(args["path"]), args.get("seq")).arch
    except HFConfigError:
        return None


def hf_problems(args: Mapping) -> list[Problem]:
    try:
        read_hf(str(args["path"]), args.get("seq"))
    except HFConfigError as e:
        return [Problem(e.arg, e.message, e.hint)]
    return []


def hf_derived(args: Mapping) -> dict:
    """Args the rest of the checker reads from any model (vocab, seq), and the family."""
    m = read_hf(str(args["path"]), args.get("seq"))
    return {"vocab": m.arch.vocab, "seq": m.arch.seq, "hf_family": m.family, "architecture": m.architecture}


# ---------------------------------------------------------------- parameter names
# (effc's canonical paths -> Hugging Face names, per family; effc.runtime.hf documents
# the tables and reads checkpoints with them, the checker maps PEFT's module names.)

@dataclass(frozen=True)
class Source:
    """Where a canonical tensor comes from: the HF name, whether it is stored (in, out)
    (GPT-2's Conv1D), and for a fused tensor which of `parts` equal slices along the
    output dimension it is."""

    name: str
    transposed: bool = False
    part: int = 0
    parts: int = 1


_LLAMA_LAYER = {"attn_norm": "input_layernorm", "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
                "attn.v": "self_attn.v_proj", "attn.o": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
                "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}
_GPT2_LAYER = {"attn_norm": "ln_1", "attn.o": "attn.c_proj", "mlp_norm": "ln_2", "mlp.up": "mlp.c_fc",
               "mlp.down": "mlp.c_proj"}
_BERT_LAYER = {"attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
               "attn.o": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
               "mlp.up": "intermediate.dense", "mlp.down": "output.dense", "mlp_norm": "output.LayerNorm"}
_TOP = {
    "llama": {"embed": "model.embed_tokens", "norm": "model.norm", "head": "lm_head"},
    "gpt2": {"embed": "transformer.wte", "pos_embed": "transformer.wpe", "norm": "transformer.ln_f", "head": "lm_head"},
    "bert": {"embed": "embeddings.word_embeddings", "pos_embed": "embeddings.position_embeddings",
             "type_embed": "embeddings.token_type_embeddings", "embed_norm": "embeddings.LayerNorm"},
}
_LAYER_PREFIX = {"llama": "model.layers.{i}.", "gpt2": "transformer.h.{i}.", "bert": "encoder.layer.{i}."}
_LAYERS = {"llama": _LLAMA_LAYER, "gpt2": _GPT2_LAYER, "bert": _BERT_LAYER}
# Where a family's model sits inside a task model's checkpoint (GPT2Model has no
# "transformer.", BertForMaskedLM has "bert."): tried in turn when a name is missing.
_PREFIXES = {"llama": ("model.", ""), "gpt2": ("transformer.", ""), "bert": ("", "bert.")}
_LAYER_RE = re.compile(r"^layers\[(\d+)\]\.(.+)$")


def source(family: str, path: str) -> Source:
    """The Hugging Face source of a canonical param path ('layers[0].attn.q.weight')."""
    module, _, leaf = path.rpartition(".")
    m = _LAYER_RE.match(module)
    if m is None:
        if module not in _TOP[family]:
            raise KeyError(path)
        return Source(f"{_TOP[family][module]}.{leaf}")
    i, rel = m.group(1), m.group(2)
    prefix = _LAYER_PREFIX[family].format(i=i)
    if family == "gpt2":
        conv = leaf == "weight"  # Conv1D weights are (in, out); biases are plain vectors
        if rel in ("attn.q", "attn.k", "attn.v"):
            return Source(f"{prefix}attn.c_attn.{leaf}", conv, "qkv".index(rel[-1]), 3)
        if rel in ("attn.o", "mlp.up", "mlp.down"):
            return Source(f"{prefix}{_GPT2_LAYER[rel]}.{leaf}", conv)
    if rel not in _LAYERS[family]:
        raise KeyError(path)
    return Source(f"{prefix}{_LAYERS[family][rel]}.{leaf}")
