"""PEFT adapter folders, as the front end sees them: `adapter_config.json` only.

`adapt m with peft("dir")` imports an adapter that PEFT saved (`save_pretrained`):
LoRA, LoRA with use_dora (DoRA), IA3 or prompt tuning. The checker reads adapter_config.json here, so
it knows the adapter's kind, target paths and param shapes without loading a tensor;
the runtime reads adapter_model.safetensors (`effc.runtime.peft`). No torch here.

`peft_uses(folder, family, targets)` matches PEFT's target_modules against the Hugging
Face module names of the model's linear layers (`effc.lang.hf.source`) as PEFT does (a
name equal to a target or ending in "." + target; a single string is a full-match
regular expression) and groups the matches by (rank, alpha) from r / rank_pattern and
lora_alpha / alpha_pattern, each group one adapter use (use_rslora carried). Anything
effc would compute differently from PEFT is refused with the reason: a bias, fused GPT-2
projections, layers_to_transform, modules_to_save, an unconverted PiSSA-style
initialisation, unknown peft_type.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from effc.lang.hf import source

PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt"}
# Initialisations that rewrite the base weight (PiSSA, OLoRA, CorDA): an adapter saved
# with one of them holds tensors relative to that rewritten base.
RESIDUAL_INITS = ("pissa", "olora", "corda")


class PeftConfigError(Exception):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


@dataclass(frozen=True)
class PeftUse:
    technique: str  # "lora" | "dora" | "ia3"
    paths: frozenset[str]
    args: dict = field(default_factory=dict, compare=False)


def module_name(family: str, path: str) -> str | None:
    """The Hugging Face module of an effc linear ('layers[0].attn.q' ->
    'model.layers.0.self_attn.q_proj'), or None where PEFT cannot adapt it alone (one
    third of GPT-2's fused c_attn)."""
    try:
        src = source(family, f"{path}.weight")
    except KeyError:
        return None
    return None if src.parts > 1 else src.name.removesuffix(".weight")


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _pattern(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matching the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(path):
        raise PeftConfigError(f"'{folder}' has no adapter_config.json",
                              "peft(...) names a folder that PEFT's save_pretrained wrote")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise PeftConfigError(f"cannot read {path}: {e}", "it must be the JSON that PEFT wrote") from None
    if not isinstance(cfg, dict):
        raise PeftConfigError(f"{path} does not hold a JSON object")
    return cfg


def _prompt_use(cfg: dict, folder: str, dim: int | None) -> PeftUse:
    """PEFT's prompt tuning: n virtual tokens of the model's width before every sequence."""
    n, width = cfg.get("num_virtual_tokens"), cfg.get("token_dim")
    if not isinstance(n, int) or n < 1:
        raise PeftConfigError(f"num_virtual_tokens is {n!r}, not a positive integer", "is adapter_config.json damaged?")
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise PeftConfigError("the prompt is for an encoder-decoder model (num_transformer_submodules=2)",
                              "effc imports prompts of decoders and encoders")
    if dim is not None and width not in (None, dim):
        raise PeftConfigError(f"the prompt's token_dim is {width}, and the model's width is {dim}",
                              "the adapter was trained on another model")
    return PeftUse("prompt", frozenset({""}), {"length": n, "init": "vocab", "peft": folder})


def peft_uses(folder: str, family: str, linears: list[str], dim: int | None = None) -> list[PeftUse]:
    """The adapter uses an adapter folder describes on a model of `family` whose linear
    layers are `linears` (canonical paths) and whose width is `dim`."""
    cfg = read_config(folder)
    kind = PEFT_TYPES.get(cfg.get("peft_type"))
    if kind is None:
        raise PeftConfigError(f"peft_type {cfg.get('peft_type')!r} is not supported",
                              f"effc imports {', '.join(PEFT_TYPES)} adapters (LoRA with use_dora is DoRA)")
    unsupported = [(k, v) for k, v in (("modules_to_save", cfg.get("modules_to_save")),
                                       ("layers_to_transform", cfg.get("layers_to_transform")),
                                       ("target_parameters", cfg.get("target_parameters")))
                   if v] + ([("bias", cfg["bias"])] if cfg.get("bias", "none") != "none" else [])
    if unsupported:
        k, v = unsupported[0]
        raise PeftConfigError(f"the adapter sets {k}={v!r}, which effc does not import",
                              "export it from PEFT without that option, or merge it with PEFT first")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.split("_")[0] in RESIDUAL_INITS:
        raise PeftConfigError(f"the adapter was saved with init_lora_weights={init!r}: its tensors are relative to "
                              "a base model that this initialisation changed, not to the checkpoint",
                              "save it from PEFT with path_initial_model_for_weight_conversion=... (a plain LoRA on "
                              "the original base), or use effc's lora(init=pissa) to start one")
    if kind == "prompt":
        return [_prompt_use(cfg, folder, dim)]
    targets = cfg.get("target_modules")
    if not targets:
        raise PeftConfigError("adapter_config.json names no target_modules")
    names = {p: module_name(family, p) for p in linears}
    hit = [p for p, n in names.items() if n is not None and _matches(n, targets)]
    fused = [p for p, n in names.items() if n is None and _matches(source(family, f"{p}.weight").name
                                                                   .removesuffix(".weight"), targets)]
    if fused:
        raise PeftConfigError(f"the adapter targets GPT-2's fused attention projection (c_attn), which effc "
                              f"holds as separate q, k and v ('{fused[0]}')",
                              "effc imports adapters on GPT-2's attn.c_proj, mlp.c_fc and mlp.c_proj")
    if not hit:
        raise PeftConfigError(f"target_modules {targets!r} match no linear layer of this model",
                              f"its linear layers are named like {next(iter(n for n in names.values() if n), '?')}")
    if kind == "ia3":
        ff = cfg.get("feedforward_modules") or []
        inputs = frozenset(p for p in hit if _matches(names[p], ff))
        return [PeftUse("ia3", frozenset(hit), {"inputs": inputs, "peft": folder})]
    technique = "dora" if cfg.get("use_dora") else "lora"
    groups: dict[tuple, set] = {}
    for p in hit:
        r = int(_pattern(cfg.get("rank_pattern") or {}, names[p], cfg.get("r", 8)))
        alpha = float(_pattern(cfg.get("alpha_pattern") or {}, names[p], cfg.get("lora_alpha", 8)))
        groups.setdefault((r, alpha), set()).add(p)
    dropout = float(cfg.get("lora_dropout") or 0.0)
    rslora = bool(cfg.get("use_rslora"))
    return [PeftUse(technique, frozenset(ps), {"rank": r, "alpha": a, "dropout": dropout, "init": "kaiming",
                                               "rslora": rslora, "peft": folder})
            for (r, a), ps in sorted(groups.items())]
