"""Export formats: what `export M to "path" (format=...)` writes into a fresh folder.

- effc: `model.safetensors` keyed by canonical paths, `adapters.safetensors` when adapters
  are kept apart, and `effc.json` (family, configuration, adapters).
- hf: a folder transformers' Auto classes load (config.json, safetensors, the source
  checkpoint's tokenizer files); adapters are merged into the base weights, since a plain
  transformers model has no place for them (the checker requires merge_adapters=true).
- peft: the adapters apart, in PEFT's own format (`effc.runtime.peft`).

Each writer returns the adapters it wrote or merged, as records for the run summary.
The caller (runtime/run.py) owns the folder: it is written in a temporary folder and
renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from effc import __version__
from effc.compiler.adapters import adapter_index
from effc.compiler.ir import ADAPTERS, IR
from effc.lang.check import ModelInfo
from effc.runtime.checkpoint import atomic_write_json, write_tensors
from effc.runtime.hf import CheckpointReader, HFError, decoder_config, write_hf
from effc.runtime.model import State, merged_state


class ExportError(Exception):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


def adapter_records(ir: IR) -> list[dict]:
    """One record per adapter node: its node id, technique and attrs (target included)."""
    return [{"node": n.id, "technique": n.op.value, **dataclasses.asdict(n.attrs)}
            for n in ir.nodes() if n.op in ADAPTERS]


def adapter_uses(info: ModelInfo, ir: IR) -> list[dict]:
    """The adapt statements behind the IR's adapters, in order (a node's id ends in its
    statement's number): what rebuilds the same adapter nodes from the export alone."""
    count = max((adapter_index(n.id) + 1 for n in ir.nodes() if n.op in ADAPTERS), default=0)
    return [{"technique": u.technique, "paths": sorted(u.paths), "args": {k: _jsonable(v) for k, v in u.args.items()}}
            for u in info.adapters[:count]]


def _jsonable(v):
    """An adapter argument as JSON: sets become sorted lists, a data reference its name."""
    if isinstance(v, (frozenset, set)):
        return sorted(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return getattr(v, "name", str(v))


def adapter_paths(ir: IR) -> set[str]:
    """The canonical paths of the adapters' stored tensors (tied copies and generated
    tensors are not stored)."""
    return {p.path for n in ir.nodes() if n.op in ADAPTERS for p in n.params
            if p.tied_to is None and p.storage != "generated"}


def export_effc(folder: Path, ir: IR, state: State, info: ModelInfo, merge: bool, pipeline: str) -> list[dict]:
    adapters = adapter_records(ir)
    adapter_keys = adapter_paths(ir)
    if merge:
        merged = merged_state(ir, state)
        write_tensors(folder / "model.safetensors", merged)
    else:
        write_tensors(folder / "model.safetensors", {k: v for k, v in state.items() if k not in adapter_keys})
        if adapter_keys:
            write_tensors(folder / "adapters.safetensors", {k: state[k] for k in sorted(adapter_keys)})
    config = dict(info.args)
    if merge and "head.weight" in merged and any(ir.node(a["target"]).params[0].tied_to for a in adapters):
        config["tied"] = False  # the head got its own update: it is stored as its own tensor
    atomic_write_json(folder / "effc.json", {
        "format": "effc", "format_version": 1, "effc": __version__, "pipeline": pipeline,
        "model": info.name, "family": info.family, "config": config, "merged": merge,
        "adapters": [] if merge else adapters, "merged_adapters": adapters if merge else [],
        "uses": [] if merge else adapter_uses(info, ir),
        "files": sorted(p.name for p in folder.iterdir())})
    return adapters


def export_hf(folder: Path, ir: IR, state: State, info: ModelInfo, source: CheckpointReader | None) -> list[dict]:
    """A transformers folder. For an `hf(...)` model the source config.json is kept (with
    tie_word_embeddings updated) and tensors effc does not use (BERT's pooler) are copied
    through; the built-in decoder is written as a LlamaForCausalLM."""
    adapters = adapter_records(ir)
    merged = merged_state(ir, state)
    arch = info.arch
    # A merged update on a tied head gives the head its own tensor: the export unties it.
    arch = dataclasses.replace(arch, tied=arch.tied and "head.weight" not in merged)
    if info.family == "hf":
        family, config = info.args["hf_family"], source.model.config
        source_folder, extra = source.model.folder, source.extra()
    else:
        family, config, source_folder, extra = "llama", decoder_config(arch), None, {}
    try:
        write_hf(folder, family, config, merged, arch, source_folder, extra)
    except HFError as e:
        raise ExportError(e.message, e.hint) from None
    return adapters
