"""The DOT view of an IR, read back with an independent line parser: one node statement
per IR node, one edge statement per IR edge with its port, labels, fills, a cluster per
layer, escaping, determinism; and, where Graphviz is installed, the rendered SVG."""

import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter

import pytest

import effc.compiler.dot as dot
from effc.compiler.dot import FILL_ADAPTER, FILL_FROZEN, FILL_TRAINABLE, render_svg, to_dot
from effc.compiler.ir import IR, Node, Op, ResidualAttrs
from effc.compiler.lower import lower_model
from effc.compiler.passes import PassContext, run_passes

TWO_LAYERS = "decoder(vocab=32, dim=8, layers=2, heads=2, ffn=16, seq=8, tied=true)"
ADAPT_QV = "    adapt m.layers[0].attn.{q,v} with lora(rank=2, alpha=4, dropout=0.1)\n"

_Q = r'"((?:[^"\\]|\\.)*)"'  # a DOT double-quoted string; group 1 is its escaped body
NODE = re.compile(rf"^\s*{_Q} \[label={_Q}(.*)\];$")
EDGE = re.compile(rf"^\s*{_Q} -> {_Q}(?: \[label=\"(\d+)\"\])?;$")
CLUSTER = re.compile(r"^\s*subgraph cluster_layers_(\d+) \{$")
HAS_DOT = shutil.which("dot") is not None


def unescape(body: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), body)


def label_lines(body: str) -> list[str]:
    """A label written as left-justified lines: each ends in the `\\l` break."""
    lines, line = [], ""
    for token in re.findall(r"\\.|[^\\]", body):  # one escape or one plain character
        if token == "\\l":
            lines.append(unescape(line))
            line = ""
        else:
            line += token
    assert line == "", f"label does not end in a line break: {body!r}"
    return lines


def parse(text: str):
    """Node statements {id: (label body, rest)} in order, edges as (src, dst, label or
    None), and the cluster each node sits in (None outside any)."""
    nodes, edges, cluster_of = {}, [], {}
    cluster = None
    for line in text.splitlines():
        if m := CLUSTER.match(line):
            cluster = int(m.group(1))
        elif line.strip() == "}" and line.startswith("  "):
            cluster = None
        elif m := NODE.match(line):
            id = unescape(m.group(1))
            assert id not in nodes, f"node '{id}' stated twice"
            nodes[id] = (m.group(2), m.group(3))
            cluster_of[id] = cluster
        elif m := EDGE.match(line):
            edges.append((unescape(m.group(1)), unescape(m.group(2)), m.group(3)))
    return nodes, edges, cluster_of


def adapted_ir(make_model, body=ADAPT_QV):
    info = make_model(TWO_LAYERS, body)
    ir, _ = run_passes(lower_model(info), ["apply_lora", "assign_roles"], PassContext(tuple(info.adapters)))
    return ir


def test_every_node_once_in_topological_order_and_every_edge_once_with_its_port(make_model):
    ir = adapted_ir(make_model)
    text = to_dot(ir, "tiny")
    assert text.startswith("digraph effc {\n") and text.endswith("}\n")
    assert text.count("{") == text.count("}")
    nodes, edges, _ = parse(text)
    # Layers are contiguous in topological order, so clustering keeps the order exactly.
    assert list(nodes) == [n.id for n in ir.nodes()]
    parsed = Counter((s, d, int(p) if p else 0) for s, d, p in edges)
    assert parsed == Counter(ir.edges()) and max(parsed.values()) == 1
    assert all(p != "0" for _, _, p in edges), "port 0 is never labelled"
    assert ("layers[0].attn.q.lora0", "layers[0].attn.q", "1") in edges
    assert ("layers[0].attn.v", "layers[0].attn.core", "2") in edges
    assert ("layers[0].attn_norm", "layers[0].attn.q", None) in edges


def test_labels_and_fills_say_what_trains(make_model):
    nodes, _, _ = parse(to_dot(adapted_ir(make_model), "tiny"))
    lora, lora_rest = nodes["layers[0].attn.q.lora0"]
    assert label_lines(lora) == ["layers[0].attn.q.lora0", "lora (B, T, 8)",
                                 "A (2, 8) trainable", "B (8, 2) trainable"]
    assert f'fillcolor="{FILL_ADAPTER}"' in lora_rest
    q, q_rest = nodes["layers[0].attn.q"]
    assert label_lines(q) == ["layers[0].attn.q", "linear (B, T, 8)", "weight (8, 8) frozen"]
    assert f'fillcolor="{FILL_FROZEN}"' in q_rest
    head, _ = nodes["head"]
    assert label_lines(head)[2] == "weight (32, 8) frozen tied to embed.weight"
    rope, rope_rest = nodes["layers[1].attn.rope_q"]
    assert label_lines(rope) == ["layers[1].attn.rope_q", "rotary (B, T, 8)"]
    assert "fillcolor" not in rope_rest
    assert label_lines(nodes["loss"][0]) == ["loss", "loss ()"]

    trained, _, _ = parse(to_dot(adapted_ir(make_model, body=""), "tiny"))
    assert f'fillcolor="{FILL_TRAINABLE}"' in trained["layers[0].attn.q"][1]
    assert label_lines(trained["layers[0].attn.q"][0])[2] == "weight (8, 8) trainable"


def test_each_layer_is_a_cluster(make_model):
    ir = adapted_ir(make_model)
    text = to_dot(ir, "tiny")
    nodes, _, cluster_of = parse(text)
    for id in nodes:
        m = re.match(r"layers\[(\d+)\]\.", id)
        assert cluster_of[id] == (int(m.group(1)) if m else None), id
    assert [id for id, c in cluster_of.items() if c is None] == ["embed", "norm", "head", "loss"]
    assert re.findall(r"subgraph (\w+) \{", text) == ["cluster_layers_0", "cluster_layers_1"]
    assert re.findall(r'graph \[label="(layers\[\d+\])"', text) == ["layers[0]", "layers[1]"]


def test_title_and_ids_are_escaped():
    odd = 'we"ird\\id'
    n = Node(odd, Op.RESIDUAL_ADD, ResidualAttrs(4), (), None, ("B", "T", 4))
    m = Node("plain", Op.RESIDUAL_ADD, ResidualAttrs(4), (), None, ("B", "T", 4))
    title = 'run "a"\\b\nsecond line'
    text = to_dot(IR.build([n, m], [(odd, "plain", 0)]), title)
    assert text.splitlines()[1] == (
        '  graph [label="run \\"a\\"\\\\b\\nsecond line", labelloc=t, rankdir=TB, fontname=Helvetica];')
    assert unescape(re.search(rf"label={_Q}", text).group(1)) == title
    nodes, edges, _ = parse(text)
    assert list(nodes) == [odd, "plain"] and edges == [(odd, "plain", None)]
    assert label_lines(nodes[odd][0])[0] == odd


def test_same_ir_same_bytes(make_model):
    a = adapted_ir(make_model)
    b = adapted_ir(make_model)
    # Equal IRs built with their edges in another order: the text must not change.
    c = IR.build(a.nodes(), list(reversed(a.edges())))
    assert a == c
    assert to_dot(a, "t") == to_dot(b, "t") == to_dot(c, "t")


def test_render_svg_without_dot_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(dot.shutil, "which", lambda name: None)
    assert not dot.dot_available()
    with pytest.raises(RuntimeError, match="install graphviz"):
        render_svg("digraph { a }", tmp_path / "g.svg")
    assert not (tmp_path / "g.svg").exists()


@pytest.mark.skipif(not HAS_DOT, reason="Graphviz `dot` is not installed (apt-get install graphviz)")
def test_render_svg_draws_every_node(make_model, tmp_path):
    ir = adapted_ir(make_model)
    out = tmp_path / "ir.svg"
    render_svg(to_dot(ir, "tiny"), out)
    root = ET.parse(out).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert {n.id for n in ir.nodes()} <= texts
    assert "tiny" in texts
    groups = Counter(g.get("class") for g in root.iter("{http://www.w3.org/2000/svg}g"))
    assert groups["node"] == len(ir.nodes()) and groups["edge"] == len(ir.edges())
    assert groups["cluster"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ir.svg"]


@pytest.mark.skipif(not HAS_DOT, reason="Graphviz `dot` is not installed (apt-get install graphviz)")
def test_render_svg_reports_a_dot_failure(tmp_path):
    with pytest.raises(RuntimeError, match=r"dot -Tsvg' failed \(exit \d+\): .*syntax error"):
        render_svg("digraph { a -> }", tmp_path / "bad.svg")
    assert list(tmp_path.iterdir()) == []
