"""PEFT adapter folders in and out, in PEFT's own names, for LoRA, DoRA, IA3 and prompt tuning.

Out: `export_peft` writes adapter_config.json and adapter_model.safetensors as PEFT's
save_pretrained does, so `peft.PeftModel.from_pretrained(base, folder)` loads them onto
the Hugging Face model and computes what effc computes. Tensor names are
`base_model.model.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`
(DoRA) and `.ia3_l` (IA3: (out, 1) on an output, (1, in) on a feedforward input), with
<module> the Hugging Face module of the target (`effc.lang.peft.module_name`); a soft
prompt is `prompt_embeddings` (n, dim), PEFT's PROMPT_TUNING with n virtual tokens.
target_modules lists full module names, so exactly effc's targets are adapted; ranks and
alphas that differ from the most common ones go to rank_pattern and alpha_pattern (keyed
by full module name); GPT-2's Conv1D layers get fan_in_fan_out. The checker has already
refused what PEFT cannot hold (E0407). base_model_name_or_path is the hf(...) folder
when effc's base weights are still that checkpoint's; otherwise (the built-in decoder,
or a base that effc trained) the base is written beside the adapter, in `base/`, as a
transformers folder, and named.

In: `read_peft(ir, adapter_args)` reads, for every adapter node imported by
`adapt m with peft("dir")`, its tensors from the folder's adapter_model.safetensors, as
its initial values (the checker read adapter_config.json: kinds, targets, ranks).
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from effc.compiler.ir import ADAPTERS, IR
from effc.lang.check import ModelInfo, hf_family
from effc.lang.peft import module_name
from effc.runtime.checkpoint import atomic_write_json, write_tensors
from effc.runtime.hf import CheckpointReader, HFError, decoder_config, write_hf

PEFT_TYPE = {"lora": "LORA", "dora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING"}
TENSORS = "adapter_model.safetensors"


class PeftError(Exception):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


def _names(n, family: str) -> dict[str, str]:
    """PEFT's tensor name for each of the node's params, by effc leaf."""
    if n.op.value == "prompt":  # the prompt encoder's table, outside the base model
        return {"embeddings": "prompt_embeddings"}
    prefix = f"base_model.model.{module_name(family, n.attrs.target)}"
    if n.op.value == "ia3":
        return {"l": f"{prefix}.ia3_l"}
    names = {"A": f"{prefix}.lora_A.weight", "B": f"{prefix}.lora_B.weight"}
    return names | ({"m": f"{prefix}.lora_magnitude_vector"} if n.op.value == "dora" else {})


def _peft_shape(n, leaf: str, shape: tuple) -> tuple:
    if n.op.value == "ia3":  # a column to scale outputs, a row to scale inputs
        return (1, shape[0]) if n.attrs.scales == "input" else (shape[0], 1)
    return shape


def export_peft(folder: Path, ir: IR, state, info: ModelInfo, source: CheckpointReader | None,
                final: Path) -> list[dict]:
    family = hf_family(info)
    nodes = [n for n in ir.nodes() if n.op in ADAPTERS]
    kind = nodes[0].op.value
    tensors = {}
    for n in nodes:
        for p in n.params:
            leaf = p.path.rsplit(".", 1)[-1]
            tensors[_names(n, family)[leaf]] = state[p.path].reshape(_peft_shape(n, leaf, p.shape)).contiguous()
    write_tensors(folder / TENSORS, tensors, metadata={"format": "pt"})
    modules = {n.attrs.target: module_name(family, n.attrs.target) for n in nodes}
    config = {"peft_type": PEFT_TYPE[kind], "task_type": "FEATURE_EXTRACTION" if info.arch.output == "embedding"
              else "CAUSAL_LM", "base_model_name_or_path": _base(folder, ir, state, info, source, final),
              "inference_mode": True, "modules_to_save": None, "revision": None}
    if kind == "prompt":
        a = info.arch
        config |= {"num_virtual_tokens": nodes[0].attrs.length, "token_dim": a.dim, "num_transformer_submodules": 1,
                   "num_attention_heads": a.heads, "num_layers": a.layers, "prompt_tuning_init": "RANDOM",
                   "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None}
    else:
        config |= {"target_modules": sorted(modules.values()), "fan_in_fan_out": family == "gpt2"}
    if kind == "ia3":
        config |= {"feedforward_modules": sorted(modules[n.attrs.target] for n in nodes if n.attrs.scales == "input"),
                   "init_ia3_weights": True}
    elif kind in ("lora", "dora"):
        ranks = {modules[n.attrs.target]: n.attrs.rank for n in nodes}
        alphas = {modules[n.attrs.target]: n.attrs.alpha for n in nodes}
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        config |= {"r": r, "lora_alpha": alpha, "rank_pattern": {m: v for m, v in ranks.items() if v != r},
                   "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
                   "lora_dropout": nodes[0].attrs.dropout, "use_dora": kind == "dora",
                   "use_rslora": nodes[0].attrs.rslora,
                   "bias": "none", "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None}
    atomic_write_json(folder / "adapter_config.json", config)
    return [{"node": n.id, "technique": n.op.value, **dataclasses.asdict(n.attrs)} for n in nodes]


def _base(folder: Path, ir: IR, state, info: ModelInfo, source: CheckpointReader | None, final: Path) -> str:
    """The base model's folder: the checkpoint's, or a copy of effc's base written to base/."""
    adapter = {p.path for n in ir.nodes() if n.op in ADAPTERS for p in n.params}
    base = {k: v for k, v in state.items() if k not in adapter}
    if source is not None and all(torch.equal(base[p], source[p]) for p in source):
        return source.model.folder
    arch = info.arch
    if info.family == "hf":
        family, config, src, extra = info.args["hf_family"], source.model.config, source.model.folder, source.extra()
    else:
        family, config, src, extra = "llama", decoder_config(arch), None, {}
    (folder / "base").mkdir()
    try:
        write_hf(folder / "base", family, config, base, arch, src, extra)
    except HFError as e:
        raise PeftError(e.message, e.hint) from None
    return str(final / "base")


def read_peft(ir: IR, adapter_args: dict, family: str) -> dict[str, torch.Tensor]:
    """Initial values of the adapters imported from PEFT folders, by canonical path."""
    out, handles = {}, {}
    for n in ir.nodes():
        folder = adapter_args.get(n.id, {}).get("peft")
        if n.op not in ADAPTERS or folder is None:
            continue
        path = os.path.join(folder, TENSORS)
        try:
            f = handles.get(path) or handles.setdefault(path, safe_open(path, framework="pt"))
        except (SafetensorError, OSError, ValueError) as e:
            raise PeftError(f"cannot read {path}: {e}", "PEFT's save_pretrained writes adapter_model.safetensors "
                            "beside adapter_config.json (effc never loads the pickled adapter_model.bin)") from None
        keys = set(f.keys())
        for p in n.params:
            leaf = p.path.rsplit(".", 1)[-1]
            name = _names(n, family)[leaf]
            if name not in keys:
                raise PeftError(f"{path} has no tensor '{name}' (effc's {p.path})",
                                "is adapter_config.json from the same adapter as the tensors?")
            t = f.get_tensor(name)
            want = _peft_shape(n, leaf, p.shape)
            if tuple(t.shape) != want:
                raise PeftError(f"tensor '{name}' has shape {tuple(t.shape)}, but adapter_config.json implies {want}",
                                "adapter_config.json and the tensors disagree")
            out[p.path] = t.reshape(p.shape).to(getattr(torch, p.dtype))
    return out
