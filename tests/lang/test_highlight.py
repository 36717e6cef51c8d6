"""The Pygments lexer for .eff (effc.lang.highlight): it reads every example without an
error token and gives back the text it read; its keywords are the grammar's and its names
the registries' (the sync tests: a keyword or technique added to the language and missing
here fails them); it is found by name and file name through its entry point; and `effc
show` / `effc fmt --diff` colour only when told to, printing the same bytes as ever when
piped."""

import difflib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pygments.token import Comment, Error, Keyword, Name, Number, Operator, Punctuation, String, Whitespace
from typer.testing import CliRunner

from effc.cli import app
from effc.lang import registry
from effc.lang.highlight import EffLexer, highlight, keyword_classes
from effc.lang.parser import UNITS, keywords

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.eff")) + [ROOT / "tests" / "lang" / "design_sketch.eff"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def tokens(text: str) -> list[tuple]:
    """(token type, text) of every token but whitespace."""
    return [(t, v) for _, t, v in EffLexer().get_tokens_unprocessed(text) if t is not Whitespace]


def type_of(text: str, value: str, nth: int = 0):
    """The token type of the nth token whose text is `value`."""
    return [t for t, v in tokens(text) if v == value][nth]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_lexes_without_errors_and_round_trips(path):
    text = path.read_text(encoding="utf-8")
    toks = list(EffLexer().get_tokens_unprocessed(text))
    assert "".join(v for _, _, v in toks) == text
    assert [(i, v) for i, t, v in toks if t in Error] == []


def test_quickstart_tokens():
    src = (ROOT / "examples" / "quickstart.eff").read_text(encoding="utf-8")
    toks = tokens(src)
    assert toks[0] == (Comment.Single, src.splitlines()[0]) and src.startswith("# effc quickstart")
    assert type_of(src, "train") is Keyword
    assert type_of(src, "pipeline") is Keyword.Declaration and type_of(src, "quickstart") is Name.Class
    assert type_of(src, "model") is Keyword.Declaration and type_of(src, "tiny") is Name.Class
    assert type_of(src, "stage") is Keyword.Declaration and type_of(src, "pretrain") is Name.Class
    assert type_of(src, "on") is Operator.Word and type_of(src, "with") is Operator.Word
    assert type_of(src, "lora") is Name.Function and type_of(src, "decoder") is Name.Function
    assert type_of(src, "adamw") is Name.Function and type_of(src, "cosine") is Name.Function
    assert type_of(src, "steps") is Name.Property
    assert type_of(src, "3e-3") is Number.Float and type_of(src, "300") is Number.Integer
    i = toks.index((Keyword.Type, "GiB"))
    assert toks[i - 1] == (Number, "4")  # budget(memory=4GiB)
    assert type_of(src, "../docs/language.md") in String
    assert type_of(src, "true") is Keyword.Constant
    assert type_of(src, "perplexity") is Name.Constant  # metrics=[loss, perplexity]
    # adapt tiny.layers[*].attn.{q,v}: the root is the model, every segment an attribute
    line = tokens("    adapt tiny.layers[*].attn.{q,v} with lora(rank=rank)\n")
    assert line[:2] == [(Keyword, "adapt"), (Name, "tiny")]
    assert [v for t, v in line if t is Name.Attribute] == ["layers", "attn", "q", "v"]
    assert (Operator, "*") in line
    i = toks.index((Operator, "@"))  # against=tiny@pretrain
    assert toks[i - 1] == (Name, "tiny") and toks[i + 1] == (Name.Label, "pretrain")
    assert type_of(src, "validation") is Name.Attribute  # reference.validation


def test_selectors_any_depth_and_kind_filters():
    line = tokens("    quantize tiny.**:linear to int4(group=64)\n")
    assert line == [(Keyword, "quantize"), (Name, "tiny"), (Punctuation, "."), (Operator, "**"),
                    (Punctuation, ":"), (Name.Attribute, "linear"), (Operator.Word, "to"), (Name.Function, "int4"),
                    (Punctuation, "("), (Name.Property, "group"), (Operator, "="), (Number.Integer, "64"),
                    (Punctuation, ")")]
    assert type_of("    share tiny.layers[0:6] as recursive(blocks=2)\n", "recursive") is Name.Function
    assert type_of("    prune tiny.layers[-1].mlp.** with heads(fraction=0.25)\n", "mlp") is Name.Attribute


def test_keywords_are_the_grammars():
    # the lexer reads the grammar text; the parser's list comes from the built Lark parser
    assert sorted(keyword_classes()) == keywords()


def test_every_keyword_is_recognised_where_the_grammar_puts_it():
    expected = {"declaration": Keyword.Declaration, "statement": Keyword, "connective": Operator.Word,
                "constant": Keyword.Constant}
    lines = {"declaration": "{} x = y\n", "statement": "    {} x\n", "connective": "    tie m.a {} m.b\n",
             "constant": "param p = {}\n"}
    for word, kind in keyword_classes().items():
        assert type_of(lines[kind].format(word), word) is expected[kind], (word, kind)
        # where only a name can stand, a keyword is a name (the contextual lexer's rule)
        assert type_of(f"stage {word}:\n", word, -1) is Name.Class, word
        assert type_of(f"budget({word}=1)\n", word, -1) is Name.Property, word
    assert {w for w, k in keyword_classes().items() if k == "constant"} == {"true", "false"}
    assert {w for w, k in keyword_classes().items() if k == "connective"} == {"on", "with", "as", "to"}


def test_every_registered_name_is_a_function_when_called():
    names = [(key, n) for key, reg in registry.all_registries().items() for n in [*reg.entries, *reg.planned]]
    assert len(names) > 30
    for key, name in names:
        assert type_of(f"model m = {name}(x=1)\n", name) is Name.Function, (key, name)
    assert type_of("model m = lroa(rank=8)\n", "lroa") is Name  # a name no registry has stays plain


def test_every_enum_choice_and_unit_is_recognised():
    for choice in registry.enum_choices():
        assert type_of(f"budget(k={choice})\n", choice) is Name.Constant, choice
    for unit in UNITS:
        assert tokens(f"budget(memory=16{unit})\n")[4:6] == [(Number, "16"), (Keyword.Type, unit)], unit


def test_lexer_is_registered_as_a_pygments_plugin():
    from importlib.metadata import entry_points

    from pygments.lexers import get_lexer_by_name, get_lexer_for_filename

    assert [e.value for e in entry_points(group="pygments.lexers") if e.name == "eff"] == \
        ["effc.lang.highlight:EffLexer"]
    assert type(get_lexer_by_name("eff")) is EffLexer
    assert type(get_lexer_by_name("effc")) is EffLexer
    assert type(get_lexer_for_filename("recipes/x.eff")) is EffLexer


def test_highlight_adds_colour_and_nothing_else():
    text = "pipeline p  # c\r\nmodel m = decoder(vocab=8)\n\n"
    assert highlight(text, False) is text
    assert highlight(text, True, None) is text
    coloured = highlight(text, True)
    assert "\x1b[" in coloured and ANSI.sub("", coloured) == text  # CRLF, blank lines kept
    py = highlight("def f(x):\n    return x\n", True, "python")
    assert "\x1b[" in py and ANSI.sub("", py) == "def f(x):\n    return x\n"


# ---------------------------------------------------------------- the command


MESSY = "pipeline   p\nmodel m = decoder(vocab=64,dim=32,layers=2,heads=4,ffn=64,seq=16)\n"
FORMATTED = "pipeline p\nmodel m = decoder(vocab=64, dim=32, layers=2, heads=4, ffn=64, seq=16)\n"
FORCE = {"FORCE_COLOR": "1", "NO_COLOR": None}  # CliRunner: None removes a variable
IR = ("embed = embedding() vocab=64 dim=32 -> (B, T, 32)\n"
      "    embed.weight (64, 32) float32 dense frozen role=embedding\n"
      "layers[0].attn.q.lora0 = lora(embed) rank=8 alpha=16.0 -> (B, T, 32)\n")
FX = "def forward(self, tokens):\n    return self.embed(tokens)\n"


def piped(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    return subprocess.run([sys.executable, "-m", "effc", *args], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def build_folder(tmp_path) -> Path:
    """What `effc show` reads, written by hand (a real build takes seconds)."""
    out = tmp_path / "build"
    (out / "ir").mkdir(parents=True)
    (out / "fx").mkdir()
    (out / "build.json").write_text(json.dumps({"steps": []}))
    (out / "ir" / "00_s_m.txt").write_text(IR)
    (out / "fx" / "00_s_m.py").write_text(FX)
    (out / "report.txt").write_text("# stage s: train m (line 5, micro-batch 8)\nparams: 1 trainable of 1\n")
    (out / "cost.txt").write_text("params trainable  1\n")
    return out


def test_fmt_diff_is_plain_when_piped_and_coloured_when_forced(tmp_path):
    path = tmp_path / "m.eff"
    path.write_text(MESSY)
    plain = "".join(difflib.unified_diff(MESSY.splitlines(keepends=True), FORMATTED.splitlines(keepends=True),
                                         str(path), f"{path} (formatted)"))
    r = piped("fmt", str(path), "--diff")
    assert r.returncode == 0 and r.stdout == plain  # byte for byte what it always printed
    forced = CliRunner().invoke(app, ["fmt", str(path), "--diff"], env=FORCE)
    assert forced.exit_code == 0 and forced.stdout == highlight(plain, True, "diff")
    assert "\x1b[" in forced.stdout and ANSI.sub("", forced.stdout) == plain
    assert CliRunner().invoke(app, ["fmt", str(path)], env=FORCE).stdout == FORMATTED  # only the diff
    off = CliRunner().invoke(app, ["fmt", str(path), "--diff"], env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert off.stdout == plain  # NO_COLOR wins


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_fmt_diff_is_coloured_on_a_terminal(tmp_path):
    import pty

    path = tmp_path / "m.eff"
    path.write_text(MESSY)
    main, tty = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    proc = subprocess.Popen([sys.executable, "-m", "effc", "fmt", str(path), "--diff"], stdout=tty,
                            env=env)
    os.close(tty)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the terminal's other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert proc.wait(timeout=60) == 0
    shown = b"".join(chunks).decode()
    assert "\x1b[" in shown and "+pipeline p" in ANSI.sub("", shown)


def test_show_is_plain_when_not_on_a_terminal_and_colours_ir_and_fx_when_forced(tmp_path):
    out = build_folder(tmp_path)
    # (in process: `effc show` imports torch, seconds for a second process; the CliRunner's
    # stdout is no terminal, as a pipe is not, and fmt's test runs the console script)
    r = CliRunner().invoke(app, ["show", str(out), "--ir", "--fx"], env={"FORCE_COLOR": None, "NO_COLOR": None})
    ir, fx = f"# 00_s_m\n{IR}", f"# 00_s_m\n{FX}"
    assert r.exit_code == 0 and r.stdout == f"{ir}\n{fx}"
    forced = CliRunner().invoke(app, ["show", str(out), "--ir", "--fx"], env=FORCE)
    assert forced.exit_code == 0 and forced.stdout == f"{highlight(ir, True)}\n{highlight(fx, True, 'python')}"
    assert "\x1b[" in forced.stdout and ANSI.sub("", forced.stdout) == f"{ir}\n{fx}"
    # the report and the cost table are tables, not code: never coloured
    tables = CliRunner().invoke(app, ["show", str(out)], env=FORCE)
    assert tables.exit_code == 0 and "\x1b[" not in tables.stdout and "params trainable  1" in tables.stdout
    assert not any(t in Error for t, _ in tokens(IR))  # an IR dump reads as .eff does
