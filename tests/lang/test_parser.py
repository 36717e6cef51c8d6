"""The parser: `.eff` text -> the exact typed AST (effc.lang.ast), for every construct of
the language, version 1 (shared/DESIGN.md), plus the source spans that diagnostics and
the formatter rely on. AST equality ignores spans; `Span.key()` is used where positions
matter (lines and columns are 1-based, the end column is exclusive)."""

from __future__ import annotations

from pathlib import Path

import pytest

from effc.lang import ast as A
from effc.lang.parser import keywords, parse

# ---------------------------------------------------------------- helpers


def prog(src: str, path: str = "<input>") -> A.Program:
    r = parse(src, path)
    assert r.diagnostics == (), [(d.code, d.span.line, d.span.col, d.message) for d in r.diagnostics]
    assert r.program is not None
    return r.program


def one(src: str):
    (item,) = prog(src).items
    return item


def value(expr: str) -> A.Expr:
    item = one(f"param x = {expr}\n")
    assert isinstance(item, A.Param) and item.name == I("x")
    return item.value


def stmt(line: str) -> A.Stmt:
    stage = one(f"stage s:\n    {line}\n")
    assert isinstance(stage, A.Stage)
    (st,) = stage.body
    return st


def sel(text: str) -> A.Selector:
    st = stmt(f"adapt {text} with f()")
    assert isinstance(st, A.Adapt) and st.technique == call("f")
    return st.target


def key(node) -> tuple:
    """(line, col, end_line, end_col) of a node."""
    return node.span.key()[1:]


def I(name: str) -> A.Ident:  # noqa: E743 - short on purpose
    return A.Ident(name)


def N(name: str) -> A.Name:
    return A.Name(name)


def kw(name: str, v) -> A.KwArg:
    return A.KwArg(I(name), v)


def call(func: str, *args) -> A.Call:
    return A.Call(I(func), tuple(args))


def ints(*vs: int) -> tuple[A.Int, ...]:
    return tuple(A.Int(v) for v in vs)


def field(name: str, index=None) -> A.Field:
    return A.Field(I(name), index)


def selector(model: str, *path, kind: str | None = None) -> A.Selector:
    return A.Selector(I(model), tuple(path), None if kind is None else I(kind))


def mref(model: str, stage: str | None = None) -> A.ModelRef:
    return A.ModelRef(I(model), None if stage is None else I(stage))


def dref(data: str, split: str | None = None) -> A.DataRef:
    return A.DataRef(I(data), None if split is None else I(split))


def binop(op, left, right) -> A.BinOp:
    return A.BinOp(op, left, right)


GiB, MiB = 2**30, 2**20


# ---------------------------------------------------------------- declarations


def test_pipeline():
    assert one("pipeline quickstart\n") == A.Pipeline(I("quickstart"))


def test_param_literal():
    assert one("param rank = 8\n") == A.Param(I("rank"), A.Int(8))


@pytest.mark.parametrize("text, expected", [
    ("2*rank + 1", binop("+", binop("*", A.Int(2), N("rank")), A.Int(1))),
    ("1 + 2*3", binop("+", A.Int(1), binop("*", A.Int(2), A.Int(3)))),
    ("(1 + 2) * 3", binop("*", binop("+", A.Int(1), A.Int(2)), A.Int(3))),
    ("-(a - b)", A.Neg(binop("-", N("a"), N("b")))),
    ("a / b", binop("/", N("a"), N("b"))),
    ("a - b - c", binop("-", binop("-", N("a"), N("b")), N("c"))),  # left-associative
    ("a / b * c", binop("*", binop("/", N("a"), N("b")), N("c"))),
    ("a - b + c", binop("+", binop("-", N("a"), N("b")), N("c"))),
    ("-a * b", binop("*", A.Neg(N("a")), N("b"))),  # unary minus binds tighter than *
    ("2 * -3", binop("*", A.Int(2), A.Neg(A.Int(3)))),
    ("--1", A.Neg(A.Neg(A.Int(1)))),
    ("-1", A.Neg(A.Int(1))),
    ("((rank))", N("rank")),  # parentheses leave no node
    ("rank*10/4", binop("/", binop("*", N("rank"), A.Int(10)), A.Int(4))),
    ("4GiB / 2 + 1MiB", binop("+", binop("/", A.Size(4 * GiB), A.Int(2)), A.Size(MiB))),
    ("1.5 * x", binop("*", A.Float(1.5), N("x"))),
])
def test_arithmetic_and_precedence(text, expected):
    assert value(text) == expected


def test_model_declaration_with_keyword_args():
    item = one("model tiny = decoder(vocab=512, dim=256, layers=6, heads=4, ffn=704, seq=128)\n")
    assert item == A.ModelDecl(I("tiny"), call(
        "decoder", kw("vocab", A.Int(512)), kw("dim", A.Int(256)), kw("layers", A.Int(6)),
        kw("heads", A.Int(4)), kw("ffn", A.Int(704)), kw("seq", A.Int(128))))


def test_data_declaration_with_positional_and_keyword_args():
    item = one('data corpus = text("data/train.txt", seq=128)\n')
    assert item == A.DataDecl(I("corpus"), call("text", A.Str("data/train.txt"), kw("seq", A.Int(128))))
    assert item.value.positional == (A.Str("data/train.txt"),)
    assert item.value.keywords == (kw("seq", A.Int(128)),)


def test_declarations_with_synthetic_data_and_hf_models():
    items = prog('data d = markov(seq=64, seed=1)\ndata e = stdlib_text(seq=32)\n'
                 'model base = hf("checkpoints/my-llama")\n').items
    assert items == (
        A.DataDecl(I("d"), call("markov", kw("seq", A.Int(64)), kw("seed", A.Int(1)))),
        A.DataDecl(I("e"), call("stdlib_text", kw("seq", A.Int(32)))),
        A.ModelDecl(I("base"), call("hf", A.Str("checkpoints/my-llama"))),
    )


@pytest.mark.parametrize("text, expected", [
    ("f()", call("f")),
    ("f(1)", call("f", A.Int(1))),
    ("f(1,)", call("f", A.Int(1))),
    ("f(a=1,)", call("f", kw("a", A.Int(1)))),
    ("f(1, a=2, b=g(c=[3]))", call("f", A.Int(1), kw("a", A.Int(2)), kw("b", call("g", kw("c", A.List(ints(3))))))),
    # written order is kept, even where the checker will refuse it
    ("f(a=1, 2)", call("f", kw("a", A.Int(1)), A.Int(2))),
])
def test_calls(text, expected):
    assert value(text) == expected


def test_merges_are_model_constructors():
    item = one("model soup = ties(tiny@recurse, tiny@compress, base=tiny@pretrain, density=0.5)\n")
    snap = lambda m, s: A.Snapshot(I(m), I(s))  # noqa: E731
    assert item == A.ModelDecl(I("soup"), call(
        "ties", snap("tiny", "recurse"), snap("tiny", "compress"),
        kw("base", snap("tiny", "pretrain")), kw("density", A.Float(0.5))))
    assert one("model m = linear(a@s, b@t)\n").value == call("linear", snap("a", "s"), snap("b", "t"))


def test_budget():
    assert one("budget(memory=4GiB)\n") == A.Budget((kw("memory", A.Size(4 * GiB)),))
    assert one("budget(memory=512MiB, devices=2,)\n") == A.Budget(
        (kw("memory", A.Size(512 * MiB)), kw("devices", A.Int(2))))
    assert one("budget()\n") == A.Budget(())
    assert one("budget(\n    memory=1GB,\n)\n") == A.Budget((kw("memory", A.Size(10**9)),))


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("text, nbytes", [
    ("4GiB", 4 * 2**30),
    ("512MiB", 512 * 2**20),
    ("1.5GB", 1_500_000_000),
    ("4B", 4),
    ("8KiB", 8 * 1024),
    ("2KB", 2000),
    ("3MB", 3_000_000),
    ("1TB", 10**12),
    ("2TiB", 2 * 2**40),
    ("0.5KiB", 512),
    ("1.GB", 10**9),
])
def test_sizes_are_bytes(text, nbytes):
    v = value(text)
    assert v == A.Size(nbytes)
    assert isinstance(v.value, int) and v.value == nbytes
    assert v.text == text  # kept for the formatter


@pytest.mark.parametrize("text, number", [
    ("3e-4", 3e-4),
    (".5", 0.5),
    ("1.", 1.0),
    ("1.5", 1.5),
    ("1e5", 1e5),
    ("2.5E+3", 2500.0),
    ("1e-5", 1e-5),
    ("0.0", 0.0),
    (".25e1", 2.5),
])
def test_floats(text, number):
    v = value(text)
    assert v == A.Float(number) and isinstance(v.value, float)
    assert v.text == text


@pytest.mark.parametrize("text, number", [("0", 0), ("8", 8), ("10000", 10000), ("007", 7)])
def test_integers(text, number):
    v = value(text)
    assert v == A.Int(number) and type(v.value) is int


@pytest.mark.parametrize("text, expected", [
    (r'"a\"b\\c"', 'a"b\\c'),
    ('""', ""),
    ('"out/quickstart"', "out/quickstart"),
    ('"x # not a comment"', "x # not a comment"),
    (r'"tab\there"', "tab\there"),
    (r'"line\nbreak"', "line\nbreak"),
    ('"héllo ✓"', "héllo ✓"),
])
def test_strings_with_escapes(text, expected):
    assert value(text) == A.Str(expected)


def test_string_with_hash_makes_no_comment():
    p = prog('param x = "a#b"\n')
    assert p.items[0].value == A.Str("a#b")
    assert p.comments == ()


def test_booleans_and_names():
    assert value("true") == A.Bool(True)
    assert value("false") == A.Bool(False)
    assert value("average") == N("average")
    assert value("true_ish") == N("true_ish")  # a keyword prefix does not split a name
    assert value("_x1") == N("_x1")


def test_attr_and_snapshot_values():
    assert value("corpus.validation") == A.Attr(I("corpus"), I("validation"))
    assert value("tiny@pretrain") == A.Snapshot(I("tiny"), I("pretrain"))


@pytest.mark.parametrize("text, expected", [
    ("[]", A.List(())),
    ("[1]", A.List(ints(1))),
    ("[1, 2,]", A.List(ints(1, 2))),
    ("[0.9, 0.999]", A.List((A.Float(0.9), A.Float(0.999)))),
    ("[[1, 2], [3], []]", A.List((A.List(ints(1, 2)), A.List(ints(3)), A.List(())))),
    ("[loss, perplexity]", A.List((N("loss"), N("perplexity")))),
    ('[true, "s", 4GiB, f(a=1), m@s, d.validation, -1, 1+2]', A.List((
        A.Bool(True), A.Str("s"), A.Size(4 * GiB), call("f", kw("a", A.Int(1))),
        A.Snapshot(I("m"), I("s")), A.Attr(I("d"), I("validation")), A.Neg(A.Int(1)),
        binop("+", A.Int(1), A.Int(2))))),
    ("[\n    1,  # one\n\n    # own line\n    [2,\n     3],\n]", A.List((A.Int(1), A.List(ints(2, 3))))),
])
def test_lists(text, expected):
    assert value(text) == expected


# ---------------------------------------------------------------- statements


def test_train_with_options_spanning_lines():
    st = stmt("train tiny on corpus (steps=300, batch=32,\n"
              "                          optimizer=adamw(lr=3e-3), schedule=cosine(warmup=30))")
    assert st == A.Train(mref("tiny"), dref("corpus"), (
        kw("steps", A.Int(300)), kw("batch", A.Int(32)),
        kw("optimizer", call("adamw", kw("lr", A.Float(3e-3)))),
        kw("schedule", call("cosine", kw("warmup", A.Int(30))))))


def test_train_and_eval_without_options():
    assert stmt("train m on d") == A.Train(mref("m"), dref("d"), ())
    assert stmt("train m on d ()") == A.Train(mref("m"), dref("d"), ())
    assert stmt("eval m on d") == A.Eval(mref("m"), dref("d"), ())


def test_eval_with_split_snapshot_and_options():
    st = stmt("eval tiny on corpus.validation (metrics=[perplexity], against=tiny@pretrain)")
    assert st == A.Eval(mref("tiny"), dref("corpus", "validation"), (
        kw("metrics", A.List((N("perplexity"),))), kw("against", A.Snapshot(I("tiny"), I("pretrain")))))
    assert stmt("eval m@s on d") == A.Eval(mref("m", "s"), dref("d"), ())


def test_options_with_a_newline_after_every_bracket():
    st = stmt("train m on d (\n        steps=1,\n        optimizer=adamw(\n            lr=1e-3,\n        ),\n    )")
    assert st == A.Train(mref("m"), dref("d"), (kw("steps", A.Int(1)), kw("optimizer", call("adamw", kw("lr", A.Float(1e-3))))))


def test_adapt():
    st = stmt("adapt tiny.layers[*].attn.{q,v} with lora(rank=rank, alpha=2*rank)")
    assert st == A.Adapt(
        selector("tiny", field("layers", A.IndexAll()), field("attn"), A.NameSet((I("q"), I("v")))),
        call("lora", kw("rank", N("rank")), kw("alpha", binop("*", A.Int(2), N("rank")))))


def test_share():
    st = stmt("share tiny.layers[0:6] as recursive(blocks=2, init=average)")
    assert st == A.Share(selector("tiny", field("layers", A.IndexSlice(0, 6))),
                         call("recursive", kw("blocks", A.Int(2)), kw("init", N("average"))))


def test_tie():
    st = stmt("tie m.head with m.embed")
    assert st == A.Tie(selector("m", field("head")), selector("m", field("embed")))


def test_prune():
    st = stmt("prune tiny.layers[*].mlp.** with wanda(sparsity=0.5, calibrate=corpus, samples=64)")
    assert st == A.Prune(selector("tiny", field("layers", A.IndexAll()), field("mlp"), A.AnyDepth()),
                         call("wanda", kw("sparsity", A.Float(0.5)), kw("calibrate", N("corpus")),
                              kw("samples", A.Int(64))))


def test_quantize():
    st = stmt("quantize tiny.**:linear to int4(group=64)")
    assert st == A.Quantize(selector("tiny", A.AnyDepth(), kind="linear"), call("int4", kw("group", A.Int(64))))
    assert stmt("quantize m to int8()") == A.Quantize(selector("m"), call("int8"))


def test_export_in_a_stage():
    st = stmt('export tiny to "out/x" (format=hf, merge_adapters=true)')
    assert st == A.Export(mref("tiny"), A.Str("out/x"), (kw("format", N("hf")), kw("merge_adapters", A.Bool(True))))
    assert stmt('export m@s to "o"') == A.Export(mref("m", "s"), A.Str("o"), ())


def test_top_level_export():
    assert one('export tiny to "out/quickstart" (format=hf, merge_adapters=true)\n') == A.Export(
        mref("tiny"), A.Str("out/quickstart"), (kw("format", N("hf")), kw("merge_adapters", A.Bool(True))))
    assert one('export tiny to "out"\n') == A.Export(mref("tiny"), A.Str("out"), ())


def test_stage_with_every_statement_kind():
    src = """stage all:
    train m on d (steps=3,
                  batch=2)
    eval m on d.validation (metrics=[loss],
        samples=4)
    adapt m.layers[*].attn.{q,k,v} with lora(rank=4)
    share m.layers[0:2] as recursive(blocks=1)
    tie m.head with m.embed
    prune m.layers[*].mlp.** with magnitude(sparsity=0.5)
    quantize m.**:linear to int4(group=64)
    export m to "out" (format=effc)
"""
    assert one(src) == A.Stage(I("all"), (
        A.Train(mref("m"), dref("d"), (kw("steps", A.Int(3)), kw("batch", A.Int(2)))),
        A.Eval(mref("m"), dref("d", "validation"), (kw("metrics", A.List((N("loss"),))), kw("samples", A.Int(4)))),
        A.Adapt(selector("m", field("layers", A.IndexAll()), field("attn"), A.NameSet((I("q"), I("k"), I("v")))),
                call("lora", kw("rank", A.Int(4)))),
        A.Share(selector("m", field("layers", A.IndexSlice(0, 2))), call("recursive", kw("blocks", A.Int(1)))),
        A.Tie(selector("m", field("head")), selector("m", field("embed"))),
        A.Prune(selector("m", field("layers", A.IndexAll()), field("mlp"), A.AnyDepth()),
                call("magnitude", kw("sparsity", A.Float(0.5)))),
        A.Quantize(selector("m", A.AnyDepth(), kind="linear"), call("int4", kw("group", A.Int(64)))),
        A.Export(mref("m"), A.Str("out"), (kw("format", N("effc")),)),
    ))


def test_several_stages_and_dedent_to_top_level():
    items = prog("stage a:\n    train m on d\nstage b:\n    eval m on d\nexport m to \"o\"\n").items
    assert items == (
        A.Stage(I("a"), (A.Train(mref("m"), dref("d")),)),
        A.Stage(I("b"), (A.Eval(mref("m"), dref("d")),)),
        A.Export(mref("m"), A.Str("o")),
    )


def test_stage_indented_by_any_consistent_amount():
    a = one("stage s:\n  train m on d\n  eval m on d\n")
    b = one("stage s:\n        train m on d\n        eval m on d\n")
    assert a == b == A.Stage(I("s"), (A.Train(mref("m"), dref("d")), A.Eval(mref("m"), dref("d"))))


# ---------------------------------------------------------------- selectors


@pytest.mark.parametrize("text, expected", [
    ("m", selector("m")),
    ("m.head", selector("m", field("head"))),
    ("m.layers[0:6]", selector("m", field("layers", A.IndexSlice(0, 6)))),
    ("m.layers[:3]", selector("m", field("layers", A.IndexSlice(None, 3)))),
    ("m.layers[2:]", selector("m", field("layers", A.IndexSlice(2, None)))),
    ("m.layers[:]", selector("m", field("layers", A.IndexSlice(None, None)))),
    ("m.layers[-2:-1]", selector("m", field("layers", A.IndexSlice(-2, -1)))),
    ("m.layers[*]", selector("m", field("layers", A.IndexAll()))),
    ("m.layers[-1]", selector("m", field("layers", A.IndexAt(-1)))),
    ("m.layers[0]", selector("m", field("layers", A.IndexAt(0)))),
    ("m.layers[12]", selector("m", field("layers", A.IndexAt(12)))),
    ("m.layers[*].attn.{q,k,v}",
     selector("m", field("layers", A.IndexAll()), field("attn"), A.NameSet((I("q"), I("k"), I("v"))))),
    ("m.layers[*].attn.{ q , v , }",
     selector("m", field("layers", A.IndexAll()), field("attn"), A.NameSet((I("q"), I("v"))))),
    ("m.**", selector("m", A.AnyDepth())),
    ("m.**:linear", selector("m", A.AnyDepth(), kind="linear")),
    ("m:linear", selector("m", kind="linear")),
    ("m.layers[*].mlp.**", selector("m", field("layers", A.IndexAll()), field("mlp"), A.AnyDepth())),
    ("m.layers[*].**:norm", selector("m", field("layers", A.IndexAll()), A.AnyDepth(), kind="norm")),
    ("m.layers[1:].mlp.{up,down}",
     selector("m", field("layers", A.IndexSlice(1, None)), field("mlp"), A.NameSet((I("up"), I("down"))))),
])
def test_selectors(text, expected):
    assert sel(text) == expected


def test_selector_index_kinds_differ():
    assert sel("m.layers[0]") != sel("m.layers[0:1]")
    assert sel("m.layers[*]") != sel("m.layers[:]")
    assert sel("m.layers[1]") != sel("m.layers[-1]")


# ---------------------------------------------------------------- keywords as names


def test_keywords_usable_as_option_and_argument_names():
    assert stmt("train m on d (model=1, on=2)") == A.Train(mref("m"), dref("d"), (kw("model", A.Int(1)), kw("on", A.Int(2))))
    assert one("budget(model=1, on=2, stage=3, with=4)\n") == A.Budget(
        (kw("model", A.Int(1)), kw("on", A.Int(2)), kw("stage", A.Int(3)), kw("with", A.Int(4))))
    assert value("f(train=1, to=2, as=3)") == call("f", kw("train", A.Int(1)), kw("to", A.Int(2)), kw("as", A.Int(3)))


def test_keywords_usable_as_split_and_kind_names():
    assert stmt("eval m on d.train") == A.Eval(mref("m"), dref("d", "train"))
    assert sel("m.**:model") == selector("m", A.AnyDepth(), kind="model")


def test_keywords_function_lists_the_statement_keywords():
    kws = keywords()
    assert kws == sorted(kws)
    for k in ("pipeline", "param", "model", "data", "budget", "stage", "train", "eval", "adapt",
              "share", "tie", "prune", "quantize", "export", "on", "with", "as", "to", "true", "false"):
        assert k in kws, k
    assert "lora" not in kws and "decoder" not in kws  # registry names are not reserved


# ---------------------------------------------------------------- the design sketch

SKETCH = (Path(__file__).parent / "design_sketch.eff").read_text(encoding="utf-8")  # DESIGN.md's sketch


def _sketch_ast() -> tuple:
    qv = (field("layers", A.IndexAll()), field("attn"), A.NameSet((I("q"), I("v"))))
    snap = lambda m, s: A.Snapshot(I(m), I(s))  # noqa: E731
    return (
        A.Pipeline(I("quickstart")),
        A.Param(I("rank"), A.Int(8)),
        A.ModelDecl(I("tiny"), call("decoder", kw("vocab", A.Int(512)), kw("dim", A.Int(256)),
                                    kw("layers", A.Int(6)), kw("heads", A.Int(4)), kw("ffn", A.Int(704)),
                                    kw("seq", A.Int(128)))),
        A.DataDecl(I("corpus"), call("text", A.Str("data/train.txt"), kw("seq", A.Int(128)))),
        A.Budget((kw("memory", A.Size(4 * GiB)),)),
        A.Stage(I("pretrain"), (
            A.Train(mref("tiny"), dref("corpus"), (
                kw("steps", A.Int(300)), kw("batch", A.Int(32)),
                kw("optimizer", call("adamw", kw("lr", A.Float(3e-3)))),
                kw("schedule", call("cosine", kw("warmup", A.Int(30)))))),
        )),
        A.Stage(I("recurse"), (
            A.Share(selector("tiny", field("layers", A.IndexSlice(0, 6))),
                    call("recursive", kw("blocks", A.Int(2)), kw("init", N("average")))),
            A.Adapt(selector("tiny", *qv),
                    call("lora", kw("rank", N("rank")), kw("alpha", binop("*", A.Int(2), N("rank"))))),
            A.Adapt(selector("tiny", *qv), call("lora", kw("rank", A.Int(4)), kw("per_loop", A.Bool(True)))),
            A.Train(mref("tiny"), dref("corpus"), (
                kw("steps", A.Int(200)), kw("optimizer", call("adamw", kw("lr", A.Float(1e-3)))))),
        )),
        A.Stage(I("compress"), (
            A.Prune(selector("tiny", field("layers", A.IndexAll()), field("mlp"), A.AnyDepth()),
                    call("wanda", kw("sparsity", A.Float(0.5)), kw("calibrate", N("corpus")),
                         kw("samples", A.Int(64)))),
            A.Quantize(selector("tiny", A.AnyDepth(), kind="linear"), call("int4", kw("group", A.Int(64)))),
            A.Eval(mref("tiny"), dref("corpus", "validation"), (
                kw("metrics", A.List((N("perplexity"),))), kw("against", snap("tiny", "pretrain")))),
        )),
        A.ModelDecl(I("soup"), call("ties", snap("tiny", "recurse"), snap("tiny", "compress"),
                                    kw("base", snap("tiny", "pretrain")), kw("density", A.Float(0.5)))),
        A.Export(mref("tiny"), A.Str("out/quickstart"), (kw("format", N("hf")), kw("merge_adapters", A.Bool(True)))),
    )


def test_design_sketch_parses_to_the_expected_ast():
    p = prog(SKETCH)
    assert p.items == _sketch_ast()
    assert p == A.Program(_sketch_ast())


def test_design_sketch_comments():
    p = prog(SKETCH)
    got = [(c.text, c.own_line, c.span.line) for c in p.comments]
    assert got == [
        ("# overridable: effc run --set rank=16", False, 3),
        ("# model base = hf(\"checkpoints/my-llama\")         # local Hugging Face checkpoint; paths are", True, 6),
        ("# relative to this file", True, 7),
        ("# also jsonl(...), markov(...), stdlib_text(...)", False, 8),
    ]


# ---------------------------------------------------------------- comments and layout


def test_comments_text_own_line_and_position():
    src = ("# header\n"
           "pipeline p  # trailing   \n"
           "\n"
           "stage s:\n"
           "    # inside the block\n"
           "    train m on d (steps=1,  # in brackets\n"
           "        # own line in brackets\n"
           "        batch=2)\n"
           "  # odd indentation, still a comment\n"
           "    eval m on d\n")
    p = prog(src)
    assert p.items == (A.Pipeline(I("p")), A.Stage(I("s"), (
        A.Train(mref("m"), dref("d"), (kw("steps", A.Int(1)), kw("batch", A.Int(2)))),
        A.Eval(mref("m"), dref("d")))))
    got = [(c.text, c.own_line, c.span.line, c.span.col) for c in p.comments]
    assert got == [
        ("# header", True, 1, 1),
        ("# trailing", False, 2, 13),  # trailing spaces are not part of the text
        ("# inside the block", True, 5, 5),
        ("# in brackets", False, 6, 29),
        ("# own line in brackets", True, 7, 9),
        ("# odd indentation, still a comment", True, 9, 3),
    ]
    trailing = p.comments[1]
    assert key(trailing) == (2, 13, 2, 23)


def test_comments_do_not_change_the_ast():
    plain = prog("pipeline p\nparam x = [1, 2]\nstage s:\n    train m on d (steps=1)\n")
    noisy = prog("# c\npipeline p # c\n\n# c\nparam x = [ # c\n  1, # c\n  # c\n  2 # c\n] # c\n"
                 "stage s: # c\n\n  # c\n    # c\n    train m on d (steps=1) # c\n# c\n")
    assert plain == noisy
    assert plain.items == noisy.items
    assert len(noisy.comments) == 13 and len(plain.comments) == 0


def test_blank_lines_and_comments_inside_a_stage_block():
    src = ("stage s:\n\n    # first\n    train m on d\n\n\n    # between\n\n    eval m on d\n"
           "    # last, at block depth\n\n# top level again\nexport m to \"o\"\n")
    assert prog(src).items == (
        A.Stage(I("s"), (A.Train(mref("m"), dref("d")), A.Eval(mref("m"), dref("d")))),
        A.Export(mref("m"), A.Str("o")),
    )


def test_blank_lines_and_comments_inside_brackets():
    src = ("model m = decoder(\n\n    vocab=1,   # a\n\n    # b\n        dim=2,\n"
           "  layers=[\n\n 1,\n\n ],\n)\n")
    assert one(src) == A.ModelDecl(I("m"), call("decoder", kw("vocab", A.Int(1)), kw("dim", A.Int(2)),
                                                kw("layers", A.List(ints(1)))))


def test_crlf_input_equals_lf_input():
    lf = SKETCH
    crlf = lf.replace("\n", "\r\n")
    a, b = prog(lf), prog(crlf)
    assert a == b and a.items == b.items
    assert [(c.text, c.own_line, c.span.key()) for c in a.comments] == \
           [(c.text, c.own_line, c.span.key()) for c in b.comments]
    # positions agree too
    sa, sb = a.items[6].body[1], b.items[6].body[1]
    assert sa.span.key() == sb.span.key() and sa.target.span.key() == sb.target.span.key()
    assert parse(crlf).source == parse(lf).source == lf
    assert "\r" not in parse(crlf).source


def test_file_without_trailing_newline():
    for src in ("pipeline p", "param x = 1", 'export m to "o"', "stage s:\n    train m on d",
                "stage s:\n    train m on d (steps=1,\n        batch=2)", "pipeline p  # comment",
                "stage s:\n    train m on d\n# comment", "param x = [1,\n 2]"):
        with_nl = prog(src + "\n")
        without = prog(src)
        assert without == with_nl, src
        assert [c.text for c in without.comments] == [c.text for c in with_nl.comments]
        assert parse(src).source == src + "\n"


def test_trailing_whitespace_at_end_of_file():
    assert prog("stage s:\n    train m on d\n    ") == prog("stage s:\n    train m on d\n")
    assert prog("pipeline p\n   \n\n") == prog("pipeline p\n")


def test_empty_and_comment_only_files():
    for src in ("", "\n", "\n\n\n", "   \n", "# only a comment\n", "# a\n\n# b", "\r\n"):
        p = prog(src)
        assert p.items == ()
    assert [c.text for c in prog("# a\n\n   # b").comments] == ["# a", "# b"]


def test_byte_order_mark_is_ignored():
    assert prog("\ufeffpipeline p\n") == prog("pipeline p\n")


def test_syntax_error_gives_no_program_and_a_diagnostic():
    r = parse("param = 1\n")
    assert r.program is None
    assert [d.code for d in r.diagnostics] == ["E0001"]
    assert r.diagnostics[0].span.line == 1


def test_path_is_recorded():
    p = prog("pipeline p\n", "dir/recipe.eff")
    assert p.path == "dir/recipe.eff"
    assert p.items[0].span.file == "dir/recipe.eff"
    assert p.items[0].name.span.file == "dir/recipe.eff"


# ---------------------------------------------------------------- spans


def test_span_of_a_multi_line_statement_ends_at_its_last_character():
    src = ("stage s:  # c0\n"
           "    train m on d (steps=1,  # c1\n"
           "                  batch=2)  # trailing\n"
           "\n"
           "    # own\n"
           "    adapt m.layers[*].attn.{q,v} with lora(rank=4)   \n")
    stage = one(src)
    train, adapt = stage.body
    assert key(train) == (2, 5, 3, 27)  # ends after ')' on line 3, not at the comment or newline
    assert key(adapt) == (6, 5, 6, 51)  # trailing spaces are not part of it
    assert key(stage) == (1, 1, 6, 51)
    assert key(stage.name) == (1, 7, 1, 8)
    # the parts of the train statement
    assert key(train.model) == (2, 11, 2, 12)
    assert key(train.model.model) == (2, 11, 2, 12)
    assert key(train.data) == (2, 16, 2, 17)
    steps, batch = train.options
    assert key(steps) == (2, 19, 2, 26)
    assert key(steps.name) == (2, 19, 2, 24)
    assert key(steps.value) == (2, 25, 2, 26)
    assert key(batch) == (3, 19, 3, 26)


def test_selector_spans():
    adapt = one("stage s:\n    adapt m.layers[*].attn.{q,v} with lora(rank=4)  # c\n").body[0]
    t = adapt.target
    assert key(t) == (2, 11, 2, 33)
    assert key(t.model) == (2, 11, 2, 12)
    layers, attn, qv = t.path
    assert key(layers) == (2, 13, 2, 22)
    assert key(layers.name) == (2, 13, 2, 19)
    assert key(layers.index) == (2, 19, 2, 22)
    assert key(attn) == (2, 23, 2, 27)
    assert key(qv) == (2, 28, 2, 33)
    assert [key(n) for n in qv.names] == [(2, 29, 2, 30), (2, 31, 2, 32)]
    assert key(adapt.technique) == (2, 39, 2, 51)
    assert key(adapt.technique.func) == (2, 39, 2, 43)
    assert key(adapt) == (2, 5, 2, 51)


def test_selector_span_with_kind_filter_and_negative_index():
    q = one("stage s:\n    quantize m.**:linear to int8()\n").body[0]
    assert key(q.target) == (2, 14, 2, 25)
    assert key(q.target.path[0]) == (2, 16, 2, 18)
    assert key(q.target.kind) == (2, 19, 2, 25)
    a = one("stage s:\n    adapt m.layers[-1] with f()\n").body[0]
    assert key(a.target.path[0].index) == (2, 19, 2, 23)
    assert key(a.target) == (2, 11, 2, 23)


def test_expression_spans():
    p = one("param x = -(a - b) * 2  # c\n")
    assert key(p) == (1, 1, 1, 23)
    assert key(p.name) == (1, 7, 1, 8)
    mul = p.value
    assert key(mul) == (1, 11, 1, 23)
    assert key(mul.left) == (1, 11, 1, 19)  # the negation includes its parentheses
    assert key(mul.left.operand) == (1, 13, 1, 18)  # parentheses are not part of the inner node
    assert key(mul.right) == (1, 22, 1, 23)


def test_value_spans():
    m = one('model soup = ties(a@s, "str", 4GiB, 1.5e-3, [1, 2], d.validation)\n')
    snap, s, size, f, lst, attr = m.value.args
    assert key(snap) == (1, 19, 1, 22)
    assert key(snap.model) == (1, 19, 1, 20) and key(snap.stage) == (1, 21, 1, 22)
    assert key(s) == (1, 24, 1, 29)  # quotes included
    assert key(size) == (1, 31, 1, 35)
    assert key(f) == (1, 37, 1, 43)
    assert key(lst) == (1, 45, 1, 51)
    assert key(attr) == (1, 53, 1, 65)
    assert key(m.value) == (1, 14, 1, 66)


def test_multi_line_value_span():
    p = one("param x = [1,  # one\n   2]  # two\n")
    assert key(p.value) == (1, 11, 2, 6)
    assert key(p) == (1, 1, 2, 6)


def test_stage_span_ends_at_its_last_statement_before_trailing_comments():
    src = "stage s:\n    train m on d (steps=1,\n    )\n    # trailing comment\n\n\nexport m to \"o\"\n"
    stage, export = prog(src).items
    assert key(stage) == (1, 1, 3, 6)
    assert key(stage.body[0]) == (2, 5, 3, 6)
    assert key(export) == (7, 1, 7, 16)
    assert key(export.path) == (7, 13, 7, 16)


def test_span_of_a_statement_in_a_file_without_trailing_newline():
    stage = one("stage s:\n    eval m on d.validation")
    assert key(stage.body[0]) == (2, 5, 2, 27)
    assert key(stage.body[0].data) == (2, 15, 2, 27)
    assert key(stage.body[0].data.split) == (2, 17, 2, 27)


def test_program_span():
    p = prog("pipeline p\nparam x = 1\n")
    assert key(p) == (1, 1, 3, 1)


# ---------------------------------------------------------------- known problems


def test_indented_first_line_is_an_error_like_any_indented_top_level_line():
    for src in ("  param x = 1\n", "\n  param x = 1\n", "# c\n  param x = 1\n"):
        r = parse(src)
        assert r.program is None
        assert [d.code for d in r.diagnostics] == ["E0005"], src
    (d,) = parse("  param x = 1\n").diagnostics
    assert d.span.key()[1:] == (1, 1, 1, 3)
