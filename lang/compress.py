"""The order rules of the compression statements (E0210), read from a model's edits so far.

A model changes in declaration order: `share` rewrites whole layers, so it comes before
anything that adapts, prunes or quantizes them; pruning zeroes dense weights, so it comes
before quantization fixes their values; a quantized weight is frozen and stored packed,
so an adapter that reads or rewrites the dense weight itself (DoRA's row norms, PaCA's
columns, SVFit's singular vectors) cannot sit on it, and a weight is quantized once. A
tied head shares its matrix with the embedding, which is not a linear layer: it is
neither pruned nor quantized. Each function returns (message, hint) or None; a problem
with one of the technique's arguments adds its code and the argument's name.
"""

from __future__ import annotations

import re

DENSE_READERS = {"dora": "its magnitude is computed from the dense weight's row norms",
                 "paca": "it trains columns of the weight in place",
                 "svfit": "it decomposes the dense weight"}
IN_PLACE = {"paca": DENSE_READERS["paca"], "svfit": "it rewrites the weight from its singular vectors"}


def _touched(model, verb: str) -> dict[str, int]:
    """Paths changed by earlier `verb` statements -> the statement's line."""
    return {p: e.span.line for e in model.edits if e.verb == verb for p in e.paths}


def shared_layers(model) -> dict[str, int]:
    """Layer paths (`layers[3]`) that belong to a recursive share -> its line."""
    return _touched(model, "share")


def _layer_of(path: str) -> str | None:
    m = re.match(r"(layers\[\d+\])", path)
    return m.group(1) if m else None


def edit_problem(model, use) -> tuple[str, str] | None:
    if use.verb == "share":
        return _share_problem(model, use)
    if use.verb == "tie":
        return _tie_problem(model, use)
    tied = model.arch is not None and model.arch.tied and "head" in use.paths
    if tied:
        return (f"the head of '{model.name}' is tied to its embedding, so it cannot be {use.verb}d on its own",
                "select the other linear layers (for example layers[*].**:linear)")
    if use.technique in STRUCTURED:
        return _structure_problem(model, use)
    if use.technique == "drop_sublayers":
        return _drop_problem(model, use)
    quantized = _touched(model, "quantize")
    for p in use.paths:
        if p in quantized:
            what = "quantize it once" if use.verb == "quantize" else "prune before quantizing"
            return (f"'{p}' was quantized at line {quantized[p]}, which froze its values",
                    f"{what}: a quantized weight is stored packed and never changes again")
        for a in model.adapters:
            if use.technique == "qat" and p in a.paths and (a.technique != "lora" or a.args.get("dropout")
                                                           or a.args.get("sparse_delta")):
                return (f"'{p}' has a {a.technique} adapter (line {a.span.line}), and qat folds only plain LoRA "
                        "updates into the weight it quantizes (L4Q)", "adapt it with lora without dropout")
            why = (DENSE_READERS if use.verb == "quantize" else IN_PLACE).get(a.technique)
            if use.verb == "quantize" and a.args.get("sparse_delta"):
                why = "its sparse_delta update reads the dense weight's zeros"
            if why and p in a.paths:
                return (f"'{p}' has a {a.technique} adapter (line {a.span.line}), and {why}",
                        f"{use.verb} the weights without it, or adapt them with lora")
    return None


def _share_problem(model, use) -> tuple[str, str] | None:
    idx = [int(re.fullmatch(r"layers\[(\d+)\]", p).group(1)) for p in use.paths]
    if idx != list(range(idx[0], idx[0] + len(idx))):
        return ("recursive sharing loops consecutive layers, and the selection is not a contiguous range",
                "select a slice such as layers[0:6]")
    shared = shared_layers(model)
    for p in use.paths:
        if p in shared:
            return (f"'{p}' already shares a block (line {shared[p]})", "share each layer once")
        later = [(e.verb, e.span.line) for e in model.edits for q in e.paths if _layer_of(q) == p]
        later += [("adapt", a.span.line) for a in model.adapters for q in a.paths if _layer_of(q) == p]
        if later:
            verb, line = later[0]
            return (f"'{p}' was changed by '{verb}' at line {line}, and sharing replaces whole layers",
                    "share layers before adapting, pruning or quantizing them")
    return None


def adapter_problem(model, technique: str, scope: str, paths: frozenset[str], args: dict | None = None
                    ) -> tuple[str, str] | None:
    if scope == "per_loop":
        shared = shared_layers(model)
        alone = sorted(p for p in paths if _layer_of(p) not in shared)
        if alone:
            return (f"per_loop=true gives each loop of a shared block its own adapter, and '{alone[0]}' is in no "
                    "shared block", "declare share ... as recursive(...) on these layers before this adapt")
    qat = {p: e.span.line for e in model.edits if e.technique == "qat" for p in e.paths}
    for p in sorted(paths):
        if p in qat and (technique != "lora" or (args or {}).get("dropout") or (args or {}).get("sparse_delta")):
            return (f"'{p}' trains quantization-aware (line {qat[p]}), which folds LoRA updates into the weight "
                    "before quantizing it (L4Q)", "adapt it with lora without dropout or sparse_delta")
    why = DENSE_READERS.get(technique)
    quantized = _touched(model, "quantize")
    for p in sorted(paths):
        if why and p in quantized:
            return (f"'{p}' was quantized at line {quantized[p]}, and {technique} cannot sit on a quantized weight: "
                    f"{why}", "adapt quantized weights with lora (QLoRA), or adapt before quantizing")
    pruned = {p: line for e in model.edits if e.verb == "prune" and e.technique in ("magnitude", "nm", "wanda")
              for p, line in [(q, e.span.line) for q in e.paths]}
    if (args or {}).get("sparse_delta"):
        dense = sorted(p for p in paths if p not in pruned)
        packed = sorted(p for p in paths if p in _touched(model, "quantize"))
        if packed:
            return (f"sparse_delta=true reads the pruned weight's zeros, and '{packed[0]}' is quantized",
                    "adapt with sparse_delta before quantizing, or leave it out")
        if dense:
            return (f"sparse_delta=true keeps a pruned weight's zeros, and '{dense[0]}' was not pruned",
                    "prune the weights first (magnitude, nm or wanda), or leave sparse_delta out")
    for p in sorted(paths):
        if technique in IN_PLACE and p in pruned:
            return (f"'{p}' was pruned at line {pruned[p]}, and {technique} cannot keep its zeros: "
                    f"{IN_PLACE[technique]}", "adapt pruned weights with lora, or adapt before pruning")
    return None


STRUCTURED = ("heads", "channels")


def removed_units(arch, technique: str, fraction: float) -> tuple[int, int]:
    """(units removed, units there are) per selected module: kv groups of an attention
    (a head each without grouped-query attention), or intermediate channels of an MLP."""
    units = arch.kv_heads if technique == "heads" else arch.ffn
    return round(fraction * units), units


def _structure_problem(model, use) -> tuple[str, str] | None:
    what = "heads" if use.technique == "heads" else "channels"
    if model.arch is not None:
        n, units = removed_units(model.arch, use.technique, use.args["fraction"])
        unit = "key/value groups" if use.technique == "heads" and model.arch.kv_heads < model.arch.heads else what
        if not 0 < n < units:  # an argument problem: E0309 at fraction=
            return (f"fraction={use.args['fraction']} removes {n} of {units} {unit} per module",
                    f"choose a fraction that removes at least one and keeps at least one of the {units}",
                    "E0309", "fraction")
    earlier = _touched(model, "quantize")
    shared = shared_layers(model)
    tied = tied_paths(model)
    for p in use.paths:
        if _layer_of(p) in shared or any(p == q or p.startswith(q + ".") or q.startswith(p + ".") for q in tied):
            return (f"'{p}' shares its weights with other modules, and removing {what} from one changes them all",
                    f"prune {what} in modules that share no weights")
        inside = [(q, line) for q, line in earlier.items() if q.startswith(p + ".")]
        inside += [(q, a.span.line) for a in model.adapters for q in a.paths if q.startswith(p + ".") or q == p]
        if inside:
            return (f"'{inside[0][0]}' was changed at line {inside[0][1]}, and removing {what} deletes rows "
                    "and columns of every weight in it", f"prune {what} before adapting or quantizing the weights "
                    "inside")
    return None


def _drop_problem(model, use) -> tuple | None:
    if model.arch is not None and model.arch.post_norm:
        return (f"'{model.name}' normalizes after each residual add (post-norm), and dropping a sublayer there "
                "would still leave its norm", "drop sublayers of pre-norm models (Llama, the built-in decoder)",
                "E0309", "kind")
    kind, shared = use.args["kind"], shared_layers(model)
    inside = lambda q, p: q.startswith((f"{p}.{kind}.", f"{p}.{kind}_norm")) or q == f"{p}.{kind}"  # noqa: E731
    for p in use.paths:
        if p in shared:
            return (f"'{p}' belongs to a shared block, and dropping a sublayer of one loop changes them all",
                    "drop sublayers of layers that share no block")
        changed = [(q, e.span.line) for e in model.edits for q in e.paths if inside(q, p)]
        changed += [(q, a.span.line) for a in model.adapters for q in a.paths if inside(q, p)]
        if changed:
            return (f"'{changed[0][0]}' was changed at line {changed[0][1]}, and the sublayer holding it may be "
                    "dropped", "drop sublayers before adapting, pruning or quantizing them")
    return None


def tied_paths(model) -> dict[str, int]:
    """Module paths on either side of an earlier tie -> its line."""
    return {p: e.span.line for e in model.edits if e.verb == "tie" for p in (*e.paths, *e.args["source"])}


def _tie_problem(model, use) -> tuple[str, str] | None:
    """Tying, like sharing, replaces whole modules: it comes before anything changes them,
    and a module is tied (or shared) once."""
    taken = {**shared_layers(model), **tied_paths(model)}
    for p in (*use.paths, *use.args["source"]):
        overlap = [(q, line) for q, line in taken.items() if q == p or q.startswith(p + ".") or p.startswith(q + ".")]
        if overlap:
            return (f"'{p}' already shares its weights (line {overlap[0][1]})", "tie or share each module once")
        changed = [(q, e.span.line) for e in model.edits for q in e.paths if q == p or q.startswith(p + ".")]
        changed += [(q, a.span.line) for a in model.adapters for q in a.paths if q == p or q.startswith(p + ".")]
        if changed:
            return (f"'{changed[0][0]}' was changed at line {changed[0][1]}, and tying replaces whole modules",
                    "tie modules before adapting, pruning or quantizing them")
    return None
