"""The front end never crashes: arbitrary text, arbitrary bytes, mutated valid programs and
pathologically deep inputs all come back as a CheckResult whose diagnostics are
well-formed (a location, a known code), and rendering them never raises. DESIGN.md: "Bad
input gets a diagnostic with a location and a hint, never a Python traceback"."""

from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effc.lang.check import CheckResult, check_file, check_source
from effc.lang.codes import CODES
from effc.lang.diagnostics import Diagnostic, Severity, has_errors, render_all, to_json
from effc.lang.parser import keywords

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------- valid programs

QUICK = """\
# pretrain a tiny decoder on synthetic text, tune it with LoRA, compare, export
pipeline quick

param rank = 8

model tiny = decoder(vocab=512, dim=256, layers=4, heads=4, ffn=704, seq=128)
data corpus = markov(seq=128, seed=1)  # known entropy rate

budget(memory=4GiB)

stage pretrain:
    train tiny on corpus (steps=300, batch=32, optimizer=adamw(lr=3e-3),
                          schedule=cosine(warmup=30))

stage tune:
    adapt tiny.layers[*].attn.{q,v} with lora(rank=rank, alpha=2*rank)
    train tiny on corpus (steps=200, optimizer=adamw(lr=1e-3))
    eval tiny on corpus.validation (metrics=[loss, perplexity], against=tiny@pretrain)

export tiny to "out/quick" (format=effc, merge_adapters=true)
"""

DOCS = """\
pipeline docs_lora

param rank = 16
param warm = 10

model base = decoder(vocab=256, dim=384, layers=4, heads=6, kv_heads=2, ffn=1024,
                     seq=256, tied=true)
data docs = stdlib_text(seq=256)

stage tune:
    adapt base.layers[*].**:linear with lora(rank=rank, alpha=rank, dropout=0.05)
    train base on docs (steps=100, batch=8, accumulate=2, clip=1.0, seed=7,
                        optimizer=adamw(lr=2e-4, betas=[0.9, 0.95], weight_decay=0.01),
                        schedule=linear(warmup=warm), eval_every=25)
    eval base on docs.validation (metrics=[loss, perplexity], samples=64)

export base to "out/docs" (format=effc)
"""

TWO = """\
pipeline two_models  # two models, two data sets, several stages

param r = 4
param steps = 20 * 5
param lr = 3e-4

model small = decoder(vocab=128, dim=64, layers=2, heads=2, ffn=128, seq=64)
model wide = decoder(vocab=256, dim=128, layers=3, heads=4, kv_heads=1,
                     ffn=256, seq=64, rope_theta=500000.0, norm_eps=1e-6)
data syn = markov(seq=64)
data text = stdlib_text(seq=32)

budget(memory=512MiB)

stage base:
    train small on syn (steps=steps, batch=4)
    train wide on text (steps=steps / 2, schedule=constant,  # comment in brackets
                        optimizer=adamw(lr=lr))

stage adapters:

    # LoRA on the first and the last blocks
    adapt small.layers[0].mlp.{up,down} with lora(rank=r)
    adapt small.layers[-1].attn with lora(rank=r, init=gaussian)
    adapt wide.layers[1:].attn.{q,k,v,o} with lora(rank=2*r)
    adapt wide.head with lora(rank=r + 4)
    train small on syn (steps=10, checkpoint_every=5)
    train wide on text (steps=10)
    eval small on syn.validation (metrics=[similarity], against=small@base)
    eval wide on text.validation (metrics=[perplexity], against=wide@base, samples=8)
    export wide to "out/wide"

export small to "out/small" (merge_adapters=false)
"""

VALID = [QUICK, DOCS, TWO]


def errors(r: CheckResult) -> list[tuple]:
    return [(d.code, d.span.line, d.span.col, d.message) for d in r.diagnostics if d.severity is Severity.ERROR]


@pytest.mark.parametrize("src", VALID, ids=["quick", "docs", "two"])
def test_valid_programs_check_cleanly(src):
    r = check_source(src)
    assert r.ok, errors(r)
    assert r.diagnostics == [], r.diagnostics  # not even a warning
    assert_well_formed(r, src)


@pytest.mark.parametrize("src", VALID, ids=["quick", "docs", "two"])
def test_valid_programs_check_cleanly_with_crlf_and_no_final_newline(src):
    for variant in (src.replace("\n", "\r\n"), src.rstrip("\n")):
        r = check_source(variant)
        assert r.ok and r.diagnostics == [], errors(r)


# ---------------------------------------------------------------- well-formedness


def assert_well_formed(r, text: str | None = None, path: str = "<input>") -> None:
    assert isinstance(r, CheckResult)
    assert isinstance(r.diagnostics, list)
    for d in r.diagnostics:
        assert isinstance(d, Diagnostic)
        assert isinstance(d.severity, Severity)
        assert d.code in CODES, d
        assert d.code != "E9001", d  # the checker caught a crash of its own: a bug
        assert isinstance(d.message, str) and d.message, d
        assert d.span.line >= 1 and d.span.col >= 1, d
        assert d.span.end_line >= 1 and d.span.end_col >= 1, d
    if r.program is None:
        assert has_errors(r.diagnostics), "no program, yet no error says why"
    assert r.ok == (r.program is not None and not has_errors(r.diagnostics))
    # rendering never raises, with or without the source, in colour or not
    rendered = render_all(r.diagnostics, {path: r.source})
    assert isinstance(rendered, str)
    render_all(r.diagnostics, {}, colour=True)
    to_json(r.diagnostics)
    if r.diagnostics:
        assert rendered


# ---------------------------------------------------------------- (a) arbitrary text

SPECIAL = '\t\r\n#"([{}])@:.*=,-+/\\ '
TOKENS = sorted(set(keywords())) + [
    " ", "  ", "    ", "\n", "\r\n", "\n    ", "\n\t", "\t", "#", "# c\n", '"', '"s"', '"a\\"b"',
    "(", ")", "[", "]", "{", "}", "@", ":", ".", "**", "*", "=", ",", "-", "+", "/", "\\",
    "x", "m", "tiny", "corpus", "rank", "lora", "decoder", "markov", "adamw", "f", "layers", "attn",
    "0", "1", "-1", "1.5", ".5", "1.", "3e-4", "4GiB", "1.5GB", "4B", "[*]", "[0:6]", "[:3]",
    ":linear", ".{q,v}", ".**", "\ufeff", "\x00", "\x0c", "\u2028", "é", "\U0001f600",
]

special_text = st.text(alphabet=st.sampled_from(SPECIAL + "ax1_"), max_size=80)
token_text = st.lists(st.sampled_from(TOKENS), max_size=60).map("".join)
mixed_text = st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=4)), max_size=40).map("".join)
any_text = st.one_of(st.text(), special_text, token_text, mixed_text)


@SETTINGS
@given(any_text)
def test_arbitrary_text_never_raises(text):
    r = check_source(text)
    assert_well_formed(r, text)


@SETTINGS
@given(st.sampled_from(VALID), any_text)
def test_text_appended_to_a_valid_program_never_raises(src, tail):
    assert_well_formed(check_source(src + tail))


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(VALID), st.text(max_size=30))
def test_overrides_never_raise(src, text):
    name = {QUICK: "rank", DOCS: "warm", TWO: "r"}[src]
    r = check_source(src, overrides={name: text, "nope": text})
    assert_well_formed(r)
    assert "E0111" in [d.code for d in r.diagnostics]  # at least the unknown 'nope'


# ---------------------------------------------------------------- (b) arbitrary bytes


@SETTINGS
@given(st.one_of(st.binary(max_size=200),
                 st.sampled_from(VALID).map(lambda s: s.encode()),
                 st.tuples(st.sampled_from(VALID), st.binary(max_size=8), st.integers(0, 2000)).map(
                     lambda t: t[0].encode()[:t[2]] + t[1] + t[0].encode()[t[2]:])))
def test_arbitrary_bytes_in_a_file_never_raise(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "recipe.eff")
        with open(path, "wb") as f:
            f.write(data)
        r = check_file(path)
        assert_well_formed(r, path=path)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            assert [d.code for d in r.diagnostics] == ["E0010"]
            assert r.program is None
            assert r.diagnostics[0].span.file == path
        else:
            assert "E0010" not in [d.code for d in r.diagnostics]
            assert r.diagnostics == check_source(text, path).diagnostics


def test_unreadable_paths_are_diagnostics():
    with tempfile.TemporaryDirectory() as tmp:
        for path in (os.path.join(tmp, "missing.eff"), tmp):
            r = check_file(path)
            assert [d.code for d in r.diagnostics] == ["E0010"]
            assert_well_formed(r, path=path)


# ---------------------------------------------------------------- (c) mutations of valid programs

INSERTS = st.one_of(
    st.sampled_from(TOKENS),
    st.sampled_from(keywords()).map(lambda k: f" {k} "),
    st.sampled_from(["(", ")", "[", "]", "{", "}", "((", "]]", "{}", "()", "[]", '"', "#"]),
    st.text(alphabet=st.sampled_from(SPECIAL), min_size=1, max_size=5),
    st.text(min_size=1, max_size=3),
)


@st.composite
def mutated_program(draw):
    src = draw(st.sampled_from(VALID))
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "dup_line", "swap_lines",
                                     "indent", "del_line", "join_lines"]))
        lines = src.split("\n")
        if kind == "delete" and src:
            i = draw(st.integers(0, len(src) - 1))
            j = draw(st.integers(i + 1, min(len(src), i + 40)))
            src = src[:i] + src[j:]
        elif kind == "insert":
            i = draw(st.integers(0, len(src)))
            src = src[:i] + draw(INSERTS) + src[i:]
        elif kind == "replace" and src:
            i = draw(st.integers(0, len(src) - 1))
            src = src[:i] + draw(INSERTS) + src[i + 1:]
        elif kind == "dup_line":
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            src = "\n".join(lines)
        elif kind == "swap_lines":
            i = draw(st.integers(0, len(lines) - 1))
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            src = "\n".join(lines)
        elif kind == "indent":
            i = draw(st.integers(0, len(lines) - 1))
            lead = draw(st.sampled_from(["", " ", "  ", "   ", "    ", "      ", "        ", "\t", "  \t", "\t    "]))
            lines[i] = lead + lines[i].lstrip(" ")
            src = "\n".join(lines)
        elif kind == "del_line":
            i = draw(st.integers(0, len(lines) - 1))
            del lines[i]
            src = "\n".join(lines)
        elif kind == "join_lines" and len(lines) > 1:
            i = draw(st.integers(0, len(lines) - 2))
            lines[i:i + 2] = [lines[i] + draw(st.sampled_from([" ", "", ", "])) + lines[i + 1].lstrip()]
            src = "\n".join(lines)
    return src


@SETTINGS
@given(mutated_program())
def test_mutated_valid_programs_never_raise(src):
    assert_well_formed(check_source(src), src)


@SETTINGS
@given(mutated_program())
def test_mutated_programs_with_crlf_give_the_same_diagnostics(src):
    lf = check_source(src.replace("\r\n", "\n").replace("\r", "\n"))
    crlf = check_source(src.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n"))
    assert_well_formed(crlf)
    assert [(d.code, d.span.key(), d.message) for d in lf.diagnostics] == \
           [(d.code, d.span.key(), d.message) for d in crlf.diagnostics]


# ---------------------------------------------------------------- deep nesting and size

DEEP = {
    "nested lists": "param x = " + "[" * 5000 + "]" * 5000,
    "negations": "param x = " + "-" * 5000 + "1",
    "parentheses": "param x = " + "(" * 5000 + "1" + ")" * 5000,
    "long sum": "param x = 1" + "+1" * 3000,
    "long product": "param x = 2" + "*2" * 3000,
    "long difference": "param x = 1" + " - 1" * 3000,
    "nested calls": "param x = " + "f(" * 3000 + ")" * 3000,
    "nested keyword calls": "model m = " + "f(a=" * 2000 + "1" + ")" * 2000,
    "nested lists in a stage": "stage s:\n    train m on d (steps=" + "[" * 3000 + "]" * 3000 + ")\n",
    "unclosed lists": "param x = " + "[" * 5000,
    "unclosed parentheses": "param x = " + "(" * 5000 + "1",
    "unclosed braces": "stage s:\n    adapt m." + "{" * 3000 + " with f()\n",
    "closers only": ")]}" * 2000,
    "parentheses at top level": "(" * 5000 + "1" + ")" * 5000,
    "negations just under the limit": "param x = " + "-" * 90 + "1",
    "long selector": "stage s:\n    adapt m" + ".a" * 1000 + " with f()\n",
    "many statements": "stage s:\n" + "    train m on d\n" * 1000,
    "many stages": "".join(f"stage s{i}:\n    train m on d\n" for i in range(300)),
    "staircase indentation": "stage s:\n" + "".join(" " * (4 + i) + "train m on d\n" for i in range(300)),
    "many syntax errors": "param = 1\n" * 1000,
    "many tabs": "stage s:\n" + "\ttrain m on d\n" * 500,
    "many unclosed strings": 'param x = "\n' * 500,
    "long string": 'param x = "' + "a" * 100000 + '"',
    "long comment": "#" * 100000,
    "long name": "param " + "x" * 100000 + " = 1",
}


@pytest.mark.parametrize("name", list(DEEP))
def test_deep_and_large_inputs_never_raise(name):
    src = DEEP[name]
    r = check_source(src)
    assert_well_formed(r, src)
    assert r.ok or r.diagnostics  # a valid result, or a diagnostic saying why not


@pytest.mark.parametrize("name", ["nested lists", "negations", "long sum", "nested calls"])
def test_too_deep_nesting_is_e0006(name):
    r = check_source(DEEP[name])
    assert [d.code for d in r.diagnostics] == ["E0006"]


@pytest.mark.parametrize("name", ["nested lists", "negations", "long sum"])
def test_deep_nesting_in_an_override_never_raises(name):
    value = DEEP[name].removeprefix("param x = ")
    r = check_source(QUICK, overrides={"rank": value})
    assert_well_formed(r)
    assert "E0111" in [d.code for d in r.diagnostics]


# ---------------------------------------------------------------- rendering


@SETTINGS
@given(st.one_of(mutated_program(), any_text), st.booleans())
def test_render_all_never_raises(src, colour):
    r = check_source(src, "recipe.eff")
    out = render_all(r.diagnostics, {"recipe.eff": r.source}, colour=colour)
    assert isinstance(out, str)
    if r.diagnostics:
        assert f"[{r.diagnostics[0].code}]" in out
    for d in r.diagnostics:  # each diagnostic also renders against a source it does not match
        render_all([d], {"recipe.eff": ""})
        render_all([d], {"recipe.eff": "x"}, colour=not colour)


def test_render_quotes_the_line_the_parser_counted():
    src = 'param x = "a\x0cb"  # form feed in a string\nparam y = zzz\n'
    r = check_source(src)
    (d,) = [d for d in r.diagnostics if d.code == "E0101"]
    assert (d.span.line, d.span.col) == (2, 11)
    out = render_all([d], {"<input>": r.source})
    assert "   2 | param y = zzz" in out


# ---------------------------------------------------------------- numbers at the limits

_BIG = "9" * 2200  # parses (under Python's 4300-digit int/str limit); its square does not print
_CHECK_HEAD = ("model m = decoder(vocab=8, dim=8, layers=1, heads=1, ffn=8, seq=8)\n"
               "data d = markov(seq=8)\n")

HUGE_LITERALS = {
    "size beyond the float range": "param x = " + "9" * 400 + "B\n",
    "size beyond the float range in budget": "budget(memory=" + "9" * 310 + "TiB)\n",
    "integer of 5000 digits": "param x = " + "9" * 5000 + "\n",
    "selector index of 5000 digits": "stage s:\n    adapt m.layers[" + "9" * 5000 + "] with f()\n",
}


@pytest.mark.parametrize("name", list(HUGE_LITERALS))
def test_huge_number_literals_never_raise(name):
    src = HUGE_LITERALS[name]
    r = check_source(src)
    assert_well_formed(r, src)
    assert r.ok or r.diagnostics


@pytest.mark.parametrize("value", ["9" * 5000, "9" * 400 + "B"], ids=["int", "size"])
def test_huge_number_override_never_raises(value):
    r = check_source(QUICK, overrides={"rank": value})
    assert_well_formed(r)
    assert has_errors(r.diagnostics)


INTERNAL_ERRORS = {
    "size times an infinite number": "budget(memory=4GiB * 1e400)\n",
    "size divided by a denormal": "budget(memory=4GiB / 1e-320)\n",
    "size times not-a-number": "budget(memory=4GiB * (1e400 - 1e400))\n",
    "message quoting an integer of 4400 digits": f"param x = {_BIG} * {_BIG}\nparam y = x + \"s\"\n",
    "range error on an integer of 4400 digits":
        _CHECK_HEAD + f"stage s:\n    train m on d (steps=0 - {_BIG} * {_BIG})\n",
}


@pytest.mark.parametrize("name", list(INTERNAL_ERRORS))
def test_arithmetic_at_the_limits_gives_a_diagnostic_not_an_internal_error(name):
    src = INTERNAL_ERRORS[name]
    r = check_source(src)
    assert_well_formed(r, src)  # fails on E9001
    assert has_errors(r.diagnostics)


def test_infinite_learning_rate_is_refused():
    r = check_source(_CHECK_HEAD + "stage s:\n    train m on d (steps=1, optimizer=adamw(lr=1e400))\n")
    assert [(d.code, d.span.line, d.span.col) for d in r.diagnostics] == [("E0012", 4, 47)]
