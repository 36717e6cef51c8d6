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
from effc.compiler.ir import ADAPTERS, IR, Op
from effc.lang.check import ModelInfo
from effc.runtime.checkpoint import atomic_write_json, write_tensors
from effc.runtime import compressed_tensors as CT
from effc.runtime.hf import CheckpointReader, HFError, copy_tokenizer, decoder_config, hf_state, write_hf
from effc.lang.hf import source as hf_source
from effc.runtime.model import State, dense_ir, dense_state, merged_state, realize_qat


class ExportError(Exception):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


def adapter_records(ir: IR) -> list[dict]:
    """One record per adapter node: its node id, technique and attrs (target included)."""
    return [{"node": n.id, "technique": n.op.value, **dataclasses.asdict(n.attrs)}
            for n in ir.nodes() if n.op in ADAPTERS]


def _note_dropped(adapters: list[dict], dropped: dict[str, float]) -> None:
    """Each adapter merged into a pruned weight records the fraction of its update's norm
    that the weight's mask removed (the merge keeps the zeros)."""
    for a in adapters:
        if f"{a['target']}.weight" in dropped:
            a["masked_norm"] = dropped[f"{a['target']}.weight"]


def adapter_uses(info: ModelInfo, ir: IR) -> list[dict]:
    """The adapt statements behind the IR's adapters, in order (a node's id ends in its
    statement's number): what rebuilds the same adapter nodes from the export alone."""
    count = max((adapter_index(n.id) + 1 for n in ir.nodes() if n.op in ADAPTERS), default=0)
    return [{"technique": u.technique, "scope": u.scope, "paths": sorted(u.paths),
             "args": {k: _jsonable(v) for k, v in u.args.items()}} for u in info.adapters[:count]]


def edit_uses(edits: list, merged: bool) -> list[dict]:
    """The share, prune and quantize statements behind the exported IR (those declared
    before the point it shows), with the run's choices (`dropped`): what rebuilds the same
    IR from the export alone. A merged export is unrolled, so its shares are left out."""
    return [{"verb": e.verb, "technique": e.technique, "paths": list(e.paths),
             "args": {k: _jsonable(v) for k, v in e.args.items()}}
            for e in edits if not (merged and e.verb == "share")]


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


def export_effc(folder: Path, ir: IR, state: State, info: ModelInfo, merge: bool, pipeline: str,
                edits: list = ()) -> list[dict]:
    adapters = adapter_records(ir)
    adapter_keys = adapter_paths(ir)
    if merge:
        dropped: dict[str, float] = {}
        # shared blocks are unrolled first: a per-loop adapter gives each loop its own weight
        merged = merged_state(dense_ir(ir), dense_state(ir, state), dropped)
        _note_dropped(adapters, dropped)
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
        "edits": edit_uses(edits, merge),
        "files": sorted(p.name for p in folder.iterdir())})
    return adapters


def export_hf(folder: Path, ir: IR, state: State, info: ModelInfo, source: CheckpointReader | None) -> list[dict]:
    """A transformers folder. For an `hf(...)` model the source config.json is kept (with
    tie_word_embeddings updated) and tensors effc does not use (BERT's pooler) are copied
    through; the built-in decoder is written as a LlamaForCausalLM."""
    adapters = adapter_records(ir)
    dropped: dict[str, float] = {}
    # packed and shared tensors undone first; QAT weights take their quantized values once merged (L4Q)
    merged = realize_qat(ir, merged_state(dense_ir(ir), dense_state(ir, state), dropped))
    _note_dropped(adapters, dropped)
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


def export_compressed_tensors(folder: Path, ir: IR, state: State, info: ModelInfo,
                              source: CheckpointReader | None) -> list[dict]:
    """A transformers folder whose int8 and int4 linears stay quantized, in the
    compressed-tensors format (`effc.runtime.compressed_tensors`); everything else as
    format=hf writes it (adapters merged, shared blocks unrolled). The checker has refused
    NF4 weights and adapters on quantized weights, which the format cannot hold."""
    adapters = adapter_records(ir)
    merged = realize_qat(ir, merged_state(dense_ir(ir), dense_state(ir, state)))
    arch = dataclasses.replace(info.arch, tied=info.arch.tied and "head.weight" not in merged)
    if info.family == "hf":
        family, config = info.args["hf_family"], source.model.config
        source_folder, extra = source.model.folder, source.extra()
    else:
        family, config, source_folder, extra = "llama", decoder_config(arch), None, {}
    quantized = {}
    for n in ir.nodes():
        if n.op is not Op.LINEAR or not n.attrs.quant:
            continue
        where = hf_source(family, f"{n.id}.weight")
        if where.parts > 1 or where.transposed:
            raise ExportError(f"'{n.id}' is stored fused or transposed in {family} checkpoints, which "
                              "compressed-tensors cannot hold quantized", "export with format=hf or format=effc")
        w = n.params[0]
        owner = (w.tied_to or w.path).rsplit(".", 1)[0]  # a loop of a shared block: its block's tensors
        quantized[where.name.removesuffix(".weight")] = CT.Quantized.from_state(state, owner, n.attrs.quant,
                                                                              n.attrs.group or None)
        del merged[f"{n.id}.weight"]
    try:
        tensors, qconfig = CT.convert({**hf_state(family, merged, arch), **extra}, quantized)
        cfg = {**config, "tie_word_embeddings": arch.tied, "torch_dtype": "float32"}
        cfg.pop("dtype", None)
        CT.write_folder(folder, tensors, cfg, qconfig)
    except CT.CompressedTensorsError as e:
        raise ExportError(e.message, e.hint) from None
    if source_folder:
        copy_tokenizer(source_folder, folder)
    return adapters
