"""Graphviz DOT for an IR: `effc show DIR --ir --format dot|svg`.

One DOT node per IR node, in `ir.nodes()` order, labelled with its id, op, output shape and
one line per parameter; the fill says what training touches (trainable, frozen, adapter).
Each `layers[i]` is drawn as a cluster, because a decoder is the same block repeated and
the eye finds the repeats faster in boxes. The text is a pure function of the IR: the same
IR gives the same bytes, so a dump can be diffed and golden-tested.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from effc.compiler.ir import ADAPTERS, IR, Node, ParamRecord

FILL_TRAINABLE = "#c8e6c9"  # green: the optimizer updates it
FILL_FROZEN = "#e0e0e0"  # grey: weights that stay put
FILL_ADAPTER = "#ffe0b2"  # orange: an adapter op (LoRA), whatever its params' flags

RENDER_TIMEOUT_S = 60

_LAYER = re.compile(r"^layers\[(\d+)\](?:\.|$)")


def quote(text: str) -> str:
    """A DOT double-quoted string. Backslash and quote are escaped, and a newline becomes
    `\\n` so that a title can span lines; in a label Graphviz reads `\\\\` as a backslash."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _label_lines(lines: list[str]) -> str:
    """Left-justified lines: each escaped, each ended by Graphviz's `\\l` break."""
    return '"' + "".join(quote(line)[1:-1] + "\\l" for line in lines) + '"'


def _shape(shape: tuple) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _param_line(node: Node, p: ParamRecord) -> str:
    # A param's path is `<node id>.<name>`; the node's first line already shows the id.
    name = p.path[len(node.id) + 1:] if p.path.startswith(node.id + ".") else p.path
    words = [name, _shape(p.shape), "trainable" if p.trainable else "frozen"]
    if p.dtype != "float32":
        words.append(p.dtype)
    if p.storage != "dense":
        words.append(p.storage)
    if p.tied_to:
        words.append(f"tied to {p.tied_to}")
    return " ".join(words)


def _style(node: Node) -> str:
    if node.op in ADAPTERS:
        fill = FILL_ADAPTER
    elif any(p.trainable for p in node.params):
        fill = FILL_TRAINABLE
    elif node.params:
        fill = FILL_FROZEN
    else:
        return ""
    return f', style="rounded,filled", fillcolor="{fill}"'


def _node_stmt(node: Node) -> str:
    lines = [node.id, f"{node.op.value} {_shape(node.shape)}"]
    lines += [_param_line(node, p) for p in node.params]
    return f"{quote(node.id)} [label={_label_lines(lines)}{_style(node)}];"


def to_dot(ir: IR, title: str) -> str:
    """A complete `digraph`: nodes in topological order (each `layers[i]` in a cluster
    placed where its first node falls), then edges ordered by (consumer, port). An edge is
    labelled with its port only when the port is > 0, i.e. on the second and later inputs
    of a multi-input op (attention's k and v, a residual's branch, an adapter's update)."""
    nodes = ir.nodes()
    rank = {n.id: i for i, n in enumerate(nodes)}
    clusters: dict[str, list[Node]] = {}  # "i" of layers[i] -> its nodes, in order
    items: list[Node | str] = []  # a loose node, or a cluster's index where it first appears
    for n in nodes:
        m = _LAYER.match(n.id)
        if m is None:
            items.append(n)
        elif m.group(1) not in clusters:
            items.append(m.group(1))
        if m is not None:
            clusters.setdefault(m.group(1), []).append(n)

    out = [
        "digraph effc {",
        f"  graph [label={quote(title)}, labelloc=t, rankdir=TB, fontname=Helvetica];",
        '  node [shape=box, style=rounded, fontname=Helvetica, fontsize=10];',
        "  edge [fontname=Helvetica, fontsize=9];",
    ]
    for item in items:
        if isinstance(item, Node):
            out.append("  " + _node_stmt(item))
            continue
        out.append(f"  subgraph cluster_layers_{item} {{")
        out.append(f"    graph [label={quote(f'layers[{item}]')}, style=dashed];")
        out.extend("    " + _node_stmt(n) for n in clusters[item])
        out.append("  }")
    for src, dst, port in sorted(ir.edges(), key=lambda e: (rank[e[1]], e[2], rank[e[0]])):
        label = f' [label="{port}"]' if port > 0 else ""
        out.append(f"  {quote(src)} -> {quote(dst)}{label};")
    out.append("}")
    return "\n".join(out) + "\n"


def dot_available() -> bool:
    return shutil.which("dot") is not None


def render_svg(dot_text: str, path: Path) -> None:
    """Lay out `dot_text` with Graphviz and write the SVG to `path` atomically (a failed
    render leaves no half-written file behind)."""
    exe = shutil.which("dot")
    if exe is None:
        raise RuntimeError("Graphviz 'dot' was not found on PATH: install graphviz "
                           "(e.g. `apt-get install graphviz`) or write --format dot instead")
    try:
        proc = subprocess.run([exe, "-Tsvg"], input=dot_text.encode("utf-8"),
                              capture_output=True, timeout=RENDER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"Graphviz 'dot' did not finish within {RENDER_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip() or "no message"
        raise RuntimeError(f"Graphviz 'dot -Tsvg' failed (exit {proc.returncode}): {err}")
    path = Path(path)
    # A sibling temp file (plain open, so the umask applies as for any file we write).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(proc.stdout)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
