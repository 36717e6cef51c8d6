"""`effc fmt`: exact layout on a messy file, idempotence and AST round trips on every
example and on random programs, and that no comment is ever lost or reordered."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from effc.lang import ast
from effc.lang.format import WIDTH, format_expr, format_program, format_source
from effc.lang.parser import parse

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.eff"))

MESSY = r"""   # leading comment, indented
pipeline   demo# tight comment


param rank=8
param  lr = 3e-4   # learning rate
param   scale=- ( rank + 2 ) * 2/(4-1)
param mix = (1 - 2) - (3 - 4) + 2*(rank+1) - -.5
model tiny=decoder( vocab = 512 , dim=256,  # model shape
    layers = 6 ,heads=4, ffn=704, seq=128 ,
)
data corpus = text( "data/train.txt",seq=128 )
budget  (memory = 4GiB, disk=1.5TB)
stage pretrain :   # warm up
  # train first

  train tiny on corpus(steps=300,batch=32,optimizer=adamw(lr=lr,betas=[0.9,0.999]),schedule=cosine(warmup=30),clip=1.0)


  adapt tiny . layers[ * ].attn.{ q , v } with lora( rank = rank , alpha = 2 * rank )
  share tiny.layers[0:6] as recursive(blocks=2,init=average)
  tie tiny.layers[-1].mlp with tiny.layers[:3].mlp
    # about the stage's end
# about compress
stage compress:
  prune tiny.layers[*].mlp.** with wanda(sparsity=0.5,calibrate=corpus,samples=64)
  quantize tiny.**:linear to int4(group=64)
  eval tiny on corpus.validation (metrics=[perplexity, loss],
      against=tiny@pretrain)   # compare
model soup = ties(tiny@pretrain,tiny@compress,base=tiny@pretrain,density=0.5)
export tiny to "out/\"demo\"\tv1" (format=hf,merge_adapters=true)

# the end
"""

# Reviewed by hand. Note the comment inside `decoder(...)` hoisted above it, the blank
# line after the stage header dropped, two blank lines kept as one, the wrapped train
# options, and "# about compress" (column 1 after a stage) at column 0 before the stage
# it introduces while the indented comment before it stays with the first stage.
MESSY_FORMATTED = r"""# leading comment, indented
pipeline demo  # tight comment

param rank = 8
param lr = 3e-4  # learning rate
param scale = -(rank + 2)*2/(4 - 1)
param mix = 1 - 2 - (3 - 4) + 2*(rank + 1) - -.5
# model shape
model tiny = decoder(vocab=512, dim=256, layers=6, heads=4, ffn=704, seq=128)
data corpus = text("data/train.txt", seq=128)
budget(memory=4GiB, disk=1.5TB)
stage pretrain:  # warm up
    # train first

    train tiny on corpus (steps=300, batch=32,
                          optimizer=adamw(lr=lr, betas=[0.9, 0.999]),
                          schedule=cosine(warmup=30), clip=1.0)

    adapt tiny.layers[*].attn.{q,v} with lora(rank=rank, alpha=2*rank)
    share tiny.layers[0:6] as recursive(blocks=2, init=average)
    tie tiny.layers[-1].mlp with tiny.layers[:3].mlp
    # about the stage's end
# about compress
stage compress:
    prune tiny.layers[*].mlp.** with wanda(sparsity=0.5, calibrate=corpus, samples=64)
    quantize tiny.**:linear to int4(group=64)
    eval tiny on corpus.validation (metrics=[perplexity, loss], against=tiny@pretrain)  # compare
model soup = ties(tiny@pretrain, tiny@compress, base=tiny@pretrain, density=0.5)
export tiny to "out/\"demo\"\tv1" (format=hf, merge_adapters=true)

# the end
"""

# Together these use every statement, declaration, selector form and value form.
PROGRAMS = {
    "quickstart": (Path(__file__).parent / "design_sketch.eff").read_text(encoding="utf-8"),
    "selectors": """model m = decoder(vocab=64, dim=32, layers=4, heads=2, ffn=64, seq=16)
stage s:
   tie m.embed with m.head
   adapt m with ia3()
   adapt m.layers[-1].attn.{q,k,v,} with dora(rank=2)
   prune m.layers[2:].mlp with magnitude(sparsity=.5, scope=global)
   prune m.layers[:3] with nm(n=2, m=4)
   prune m.layers[:] with heads(fraction=0.25)
   quantize m.layers[1].** : linear to nf4(group=64, double_quant=false)
   quantize m.**:embedding to qat(bits=4, group=32)
""",
    "values": """param a = 1 + 2*3 - 4/5
param b = (1 + 2)*3
param c = 1 - (2 - 3)
param d = (1 - 2) - 3
param e = -(a + b)
param f = - - 3e-4 * -2
param g = 2*(b/(c*d))
param h = 1.5E+3 + 10. + .25e-2
param i = "tab\\there \\"quoted\\" back\\\\slash\\nnewline # not a comment"
param j = [1, [2, [3, "x"]], true, false, 512MiB, 1.5GB, 7B]
param k = []
model base = hf("checkpoints/base")
data mixed = jsonl("data/x.jsonl", seq=64, prompt="q", response="a")
""",
    "comments": """# first
   # second, indented

pipeline p   # after the pipeline name
param x = f(1,  # inside a call
# at column one, inside
   2,
   3)  # after the last line
stage one:     # on the header
        # before a statement
        train m on d (steps=1,
            # between options
            batch=2)

        # after a blank line

        eval m on d.validation
    # indented after the stage
# column one after the stage
stage two:
    export m@one to "out" (format=peft)
# trailing at column one
    # trailing, indented
""",
    "long": """model m = decoder(vocab=32000, dim=4096, layers=32, heads=32, kv_heads=8, ffn=11008, seq=4096, tied=false, rope_theta=500000, norm_eps=1e-5)
data c = text("data/a-rather-long-path/that/goes/on/and/on/for/a/while/train.txt", seq=4096, tokenizer=hf("tok"))
budget(memory=80GiB, disk=1TB, time=3600, gpus=8, something_long=averyveryveryverylongname)
stage ft:
    train m on c (steps=1000, batch=8, accumulate=4, optimizer=adamw(lr=1e-4, betas=[0.9, 0.95], weight_decay=0.1), schedule=linear(warmup=100), clip=1.0, seed=0, checkpoint_every=100, eval_every=50)
    eval m on c.validation (metrics=[loss, perplexity, similarity], against=m@ft, samples=128, extra=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25])
    adapt m.layers[*].{attn,mlp}.** with lora(rank=16, alpha=32, dropout=0.05, targets=[q, k, v, o, gate, up, down])
export m to "out" (format=compressed_tensors, merge_adapters=true, name="a very long export name that is long")
""",
    "crlf_and_distill": "pipeline d\r\nmodel student = decoder(vocab=8, dim=8, layers=1, heads=1, ffn=8, seq=4)\r\n"
                        "stage kd:\r\n  train student on data (distill_from=teacher@pre, temperature=2.0)\r\n"
                        "  export student to \"s\"\r\n",
}


def _check(src: str) -> str:
    """Format `src` and check everything fmt promises; returns the formatted text."""
    before = parse(src)
    assert before.program is not None, before.diagnostics
    out, diags = format_source(src)
    assert diags == () and out is not None
    assert format_source(out) == (out, ())
    after = parse(out)
    assert after.program == before.program
    assert [c.text for c in after.program.comments] == [c.text for c in before.program.comments]
    lines = out.split("\n")
    assert lines[-1] == "" and (out == "" or lines[-2] != "")
    assert all(line == line.rstrip() for line in lines)
    assert "\n\n\n" not in out and not out.startswith("\n")
    return out


def test_messy_file_is_formatted_exactly():
    assert _check(MESSY) == MESSY_FORMATTED


@pytest.mark.parametrize("src", [p.read_text(encoding="utf-8") for p in EXAMPLES]
                         + list(PROGRAMS.values()),
                         ids=[p.name for p in EXAMPLES] + list(PROGRAMS))
def test_formatting_is_idempotent_and_keeps_the_program(src):
    _check(src)


def test_comments_keep_their_places():
    out = _check(PROGRAMS["comments"])
    assert out == """# first
# second, indented

pipeline p  # after the pipeline name
# inside a call
# at column one, inside
param x = f(1, 2, 3)  # after the last line
stage one:  # on the header
    # before a statement
    # between options
    train m on d (steps=1, batch=2)

    # after a blank line

    eval m on d.validation
    # indented after the stage
# column one after the stage
stage two:
    export m@one to "out" (format=peft)
# trailing at column one
    # trailing, indented
"""


def test_long_lists_fill_to_the_width_aligned_under_their_bracket():
    out = _check(PROGRAMS["long"])
    lines = out.splitlines()
    assert lines[:3] == [
        "model m = decoder(vocab=32000, dim=4096, layers=32, heads=32, kv_heads=8, ffn=11008,",
        "                  seq=4096, tied=false, rope_theta=500000, norm_eps=1e-5)",
        'data c = text("data/a-rather-long-path/that/goes/on/and/on/for/a/while/train.txt",',
    ]
    assert lines[11:14] == [
        "    eval m on c.validation (metrics=[loss, perplexity, similarity], against=m@ft,",
        "                            samples=128,",
        "                            extra=[" + ", ".join(map(str, range(1, 26))) + "])",
    ]
    # Only an argument wider than the room left overflows, alone on its line.
    assert [line.strip() for line in lines if len(line) > WIDTH] == [lines[13].strip()]


def test_a_line_of_exactly_the_width_stays_whole():
    head = "model m = f("
    args = ["a=1", "b=2"]
    filler = "x" * (WIDTH - len(head) - len(", ".join(args)) - len(", ") - len("=1") - len(")"))
    fits = f"{head}{', '.join(args)}, {filler}=1)"
    assert len(fits) == WIDTH
    assert _check(fits + "\n") == fits + "\n"
    over = fits.replace("=1)", "=12)")
    assert _check(over + "\n") == f"{head}a=1, b=2,\n{' ' * len(head)}{filler}=12)\n"


@pytest.mark.parametrize("src, expected", [
    ("a - (b - c)", "a - (b - c)"),
    ("(a - b) - c", "a - b - c"),
    ("(a + b)*c", "(a + b)*c"),
    ("a*(b*c)", "a*(b*c)"),
    ("a/b/c", "a/b/c"),
    ("a + b*c", "a + b*c"),
    ("-(a*b)", "-(a*b)"),
    ("(-a)*b", "-a*b"),
    ("a - -b", "a - -b"),
    ("--a", "--a"),
    ("(((a)))", "a"),
])
def test_parentheses_only_where_precedence_needs_them(src, expected):
    program = parse(f"param p = {src}\n").program
    assert format_expr(program.items[0].value) == expected


def test_literals_built_without_source_text_still_print():
    program = ast.Program((ast.Param(ast.Ident("x"), ast.List((ast.Float(0.5), ast.Size(1024)))),))
    assert format_program(program) == "param x = [0.5, 1024B]\n"


def test_a_syntax_error_returns_the_diagnostics_and_no_text():
    out, diags = format_source("param x = (1\nmodel m = f(\n", "bad.eff")
    assert out is None
    assert diags and all(d.span.file == "bad.eff" for d in diags)


def test_an_empty_or_comment_only_file():
    assert _check("") == ""
    assert _check("\n\n   # only\n\n\n# comments\n") == "# only\n\n# comments\n"


# ---------------------------------------------------------------- random programs

_NAMES = st.sampled_from(["a", "b", "tiny", "corpus", "rank", "x_1", "Base", "_p", "q", "v"])
_COMMENTS = st.text(alphabet="ab #\"()\\'", max_size=8).map(lambda t: "#" + t)
_FLOATS = st.sampled_from(["3e-4", ".5", "1.", "0.25", "1e5", "2.5E+3", "10.0e-2"])
_SIZES = st.sampled_from(["4GiB", "512MiB", "1.5GB", "8B", "2TiB", "3KB"])
_SPACE = st.sampled_from(["", " "])
_REQUIRED_SPACE = st.sampled_from([" ", "  "])


def _gap(draw, inside: bool) -> str:
    """Room between two tokens. Inside brackets the line may break there, after a comment
    or not (the parser drops newlines inside brackets)."""
    choices = ["", " ", "\n", "\n        ", "comment"] if inside else ["", " "]
    choice = draw(st.sampled_from(choices))
    if choice == "comment":
        return " " + draw(_COMMENTS) + "\n" + " " * draw(st.integers(0, 9))
    return choice


def _join(draw, items: list[str]) -> str:
    """Bracket contents: items with random room around the commas, maybe a trailing comma."""
    if not items:
        return _gap(draw, True)
    text = ",".join(_gap(draw, True) + item + _gap(draw, True) for item in items)
    return text + ("," + _gap(draw, True) if draw(st.booleans()) else "")


@st.composite
def _string(draw) -> str:
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": draw(st.sampled_from(["\\t", "\t"]))}
    value = draw(st.text(alphabet='ab #"\\\n\t/', max_size=6))
    return '"' + "".join(escapes.get(ch, ch) for ch in value) + '"'


@st.composite
def _expr(draw, depth: int, inside: bool) -> str:
    atoms = {
        "int": lambda: str(draw(st.integers(0, 10**6))),
        "float": lambda: draw(_FLOATS),
        "size": lambda: draw(_SIZES),
        "string": lambda: draw(_string()),
        "bool": lambda: draw(st.sampled_from(["true", "false"])),
        "name": lambda: draw(_NAMES),
        "attr": lambda: draw(_NAMES) + draw(_SPACE) + "." + draw(_SPACE) + draw(_NAMES),
        "snapshot": lambda: draw(_NAMES) + draw(_SPACE) + "@" + draw(_SPACE) + draw(_NAMES),
    }
    nested = {
        "call": lambda: draw(_call(depth - 1)),
        "list": lambda: "[" + _join(draw, draw(st.lists(_expr(depth - 1, True), max_size=3))) + "]",
        "binop": lambda: (draw(_expr(depth - 1, inside)) + _gap(draw, inside)
                          + draw(st.sampled_from("+-*/")) + _gap(draw, inside)
                          + draw(_expr(depth - 1, inside))),
        "neg": lambda: "-" + _gap(draw, inside) + draw(_expr(depth - 1, inside)),
        "paren": lambda: ("(" + _gap(draw, True) + draw(_expr(depth - 1, True))
                          + _gap(draw, True) + ")"),
    }
    kinds = {**atoms, **nested} if depth > 0 else atoms
    return kinds[draw(st.sampled_from(sorted(kinds)))]()


@st.composite
def _kwarg(draw, depth: int) -> str:
    return draw(_NAMES) + _gap(draw, True) + "=" + _gap(draw, True) + draw(_expr(depth, True))


@st.composite
def _call(draw, depth: int) -> str:
    args = draw(st.lists(st.one_of(_expr(depth, True), _kwarg(depth)), max_size=4))
    return draw(_NAMES) + draw(_SPACE) + "(" + _join(draw, args) + ")"


@st.composite
def _options(draw) -> str:
    """An optional option list, possibly empty `()`."""
    if draw(st.booleans()):
        return ""
    return draw(_SPACE) + "(" + _join(draw, draw(st.lists(_kwarg(2), max_size=4))) + ")"


@st.composite
def _index(draw) -> str:
    signed = st.integers(-9, 99).map(str)
    optional = st.one_of(st.just(""), signed)
    body = draw(st.one_of(st.just("*"), signed,
                          st.tuples(optional, optional).map(lambda ends: ends[0] + ":" + ends[1])))
    return "[" + _gap(draw, True) + body + _gap(draw, True) + "]"


@st.composite
def _selector(draw) -> str:
    field = st.builds(lambda name, index: name + index, _NAMES, st.one_of(st.just(""), _index()))
    name_set = st.lists(_NAMES, min_size=1, max_size=3)  # a list: its braces are drawn below
    segments = draw(st.lists(st.one_of(field, st.just("**"), name_set), max_size=4))
    text = draw(_NAMES)
    for seg in segments:
        seg = seg if isinstance(seg, str) else "{" + _join(draw, seg) + "}"
        text += draw(_SPACE) + "." + draw(_SPACE) + seg
    if draw(st.booleans()):
        text += draw(_SPACE) + ":" + draw(_SPACE) + draw(_NAMES)
    return text


@st.composite
def _statement(draw) -> str:
    sp = lambda: draw(_REQUIRED_SPACE)  # noqa: E731 - between words
    kind = draw(st.sampled_from(["train", "eval", "adapt", "share", "tie", "prune", "quantize",
                                 "export"]))
    model = draw(_NAMES) + draw(st.one_of(st.just(""), _NAMES.map(lambda s: "@" + s)))
    if kind in ("train", "eval"):
        data = draw(_NAMES) + draw(st.one_of(st.just(""), _NAMES.map(lambda s: "." + s)))
        return f"{kind}{sp()}{model}{sp()}on{sp()}{data}{draw(_options())}"
    if kind == "export":
        return draw(_export())
    if kind == "tie":
        return f"tie{sp()}{draw(_selector())}{sp()}with{sp()}{draw(_selector())}"
    word = {"adapt": "with", "share": "as", "prune": "with", "quantize": "to"}[kind]
    return f"{kind}{sp()}{draw(_selector())}{sp()}{word}{sp()}{draw(_call(2))}"


@st.composite
def _export(draw) -> str:
    sp = lambda: draw(_REQUIRED_SPACE)  # noqa: E731 - between words
    model = draw(_NAMES) + draw(st.one_of(st.just(""), _NAMES.map(lambda s: "@" + s)))
    return f"export{sp()}{model}{sp()}to{sp()}{draw(_string())}{draw(_options())}"


@st.composite
def _item(draw) -> str:
    sp = lambda: draw(_REQUIRED_SPACE)  # noqa: E731 - between words
    kind = draw(st.sampled_from(["pipeline", "param", "model", "data", "budget", "export", "stage"]))
    if kind == "pipeline":
        return f"pipeline{sp()}{draw(_NAMES)}" + draw(_end_of_line())
    if kind in ("param", "model", "data"):
        value = draw(st.one_of(_expr(2, False), _call(2)))
        equals = draw(_SPACE) + "=" + draw(_SPACE)
        return f"{kind}{sp()}{draw(_NAMES)}{equals}{value}" + draw(_end_of_line())
    if kind == "budget":
        options = _join(draw, draw(st.lists(_kwarg(1), max_size=3)))
        return f"budget{draw(_SPACE)}({options})" + draw(_end_of_line())
    if kind == "export":
        return draw(_export()) + draw(_end_of_line())
    indent = " " * draw(st.integers(1, 6))
    body = [draw(_gap_lines()) + indent + draw(_statement()) + draw(_end_of_line())
            for _ in range(draw(st.integers(1, 4)))]
    return f"stage{sp()}{draw(_NAMES)}{draw(_SPACE)}:" + draw(_end_of_line()) + "".join(body)


@st.composite
def _end_of_line(draw) -> str:
    if draw(st.booleans()):
        return "\n"
    return draw(st.sampled_from(["", " ", "   "])) + draw(_COMMENTS) + "\n"


@st.composite
def _gap_lines(draw) -> str:
    """Blank lines (maybe holding spaces) and own-line comments at any indentation."""
    line = st.tuples(st.integers(0, 8), st.one_of(st.just(""), _COMMENTS))
    lines = draw(st.lists(line, max_size=3))
    return "".join(" " * n + text + "\n" for n, text in lines)


@st.composite
def _source(draw) -> str:
    items = draw(st.lists(st.tuples(_gap_lines(), _item()), max_size=5))
    text = "".join(gap + item for gap, item in items) + draw(_gap_lines())
    if draw(st.booleans()):
        text = text.rstrip("\n")
    return text.replace("\n", "\r\n") if draw(st.booleans()) else text


@settings(max_examples=150, deadline=None)
@given(_source())
def test_random_programs_format_stably_and_keep_ast_and_comments(src):
    assume(parse(src).program is not None)
    _check(src)
