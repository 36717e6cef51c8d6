"""The corpus of bad programs: every `tests/lang/bad/NNN_name.eff` is a small program with
one mistake a user would really make, and the diagnostics it must produce.

Expectations. A file starts with one or more lines

    # expect: E0203 8:26

each a (code, line, column), in order. Error codes (E...) are compared with the file's
first K *errors* in position order (warnings such as an unused declaration that a
mistake causes on the side are not part of the expectation); warning codes (W...) with
its first K *warnings*; a file whose expectations mix both is compared with its first K
diagnostics of either severity. A file with only W expectations is a warning case and
must produce no error; every other file must produce at least one error.

Goldens. `NNN_name.txt` holds the exact text a user sees: `render_all` of the
diagnostics of `check_file("tests/lang/bad/NNN_name.eff")`, checked from the repository
root so that paths are relative; the repository root, which appears only in the hint of a
missing file (E0401: "looked for ..."), is written `<repo>`. Rewrite the goldens with

    EFFC_UPDATE_GOLDENS=1 python -m pytest tests/lang/test_bad_programs.py

and read every changed golden before committing it.

Known bugs. A file listed in KNOWN_BUGS shows a checker or parser bug: its expectations
and golden say what a user *should* see (written by hand, never rewritten by the update
mode), and its test is an expected failure. The marker is strict, so once the bug is
fixed the test reports XPASS as a failure: then remove the entry (and regenerate that
golden if the fix words the message differently).

E0010 (unreadable file), E0111 (a bad `--set` override), E0112 (a bad `--plan` override,
tests/runtime/test_plan.py) and E0113 (a bad `--memory`, tests/cli/test_cli.py) cannot come from a committed
`.eff` file and have their own tests below; E9001 (internal error) is a checker bug by
definition and has no corpus entry.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from effc.lang.check import check_file, check_source
from effc.lang.codes import CODES
from effc.lang.diagnostics import Severity, render_all

ROOT = Path(__file__).resolve().parents[2]
BAD = ROOT / "tests" / "lang" / "bad"
UPDATE = os.environ.get("EFFC_UPDATE_GOLDENS") == "1"

EXPECT = re.compile(r"#\s*expect:\s*([EW]\d{4})\s+(\d+):(\d+)\s*$")

# Codes that no committed .eff file can produce; each is tested separately here.
# E0404 (over the memory budget) comes from the compiler's cost estimate, not from `effc check`
# alone: tests/compiler/test_pipeline.py covers it.
# E0501-E0504 are run-time problems (data, exports, the run folder, checkpoint weights):
# tests/runtime covers them.
# E0302 (not available in this version): every settled name and option is available now.
NOT_FROM_A_FILE = {"E0010", "E0111", "E0112", "E0113", "E0114", "E0115", "E0302", "E0404", "E0501", "E0502",
                   "E0503", "E0504", "E0505", "E9001"}

KNOWN_BUGS: dict[str, str] = {}

# Goldens that record a message with the right code and place but poor wording or hint.
# They pass today; when the message is improved, regenerate and review these goldens.
POOR_MESSAGES = {
    "004_unexpected_end_of_file.eff": "the list of expectations ends in 'a name or ...'",
}


def corpus() -> list[Path]:
    return sorted(BAD.glob("*.eff"))


def expectations(path: Path) -> list[tuple[str, int, int]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = EXPECT.fullmatch(line.strip())
        if not m:
            break
        out.append((m.group(1), int(m.group(2)), int(m.group(3))))
    return out


def rendered(path: Path) -> tuple[object, str]:
    rel = path.relative_to(ROOT).as_posix()
    result = check_file(rel)
    text = render_all(result.diagnostics, {rel: result.source})
    for root in {str(ROOT), os.getcwd()}:
        text = text.replace(root, "<repo>")
    return result, text + "\n"


def _params():
    for p in corpus():
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[p.name])] if p.name in KNOWN_BUGS else []
        yield pytest.param(p, id=p.stem, marks=marks)


@pytest.mark.parametrize("path", list(_params()))
def test_bad_program(path: Path, monkeypatch):
    monkeypatch.chdir(ROOT)
    expected = expectations(path)
    assert expected, f"{path.name}: the first line must be '# expect: CODE LINE:COL'"
    result, text = rendered(path)
    golden = path.with_suffix(".txt")
    if UPDATE and path.name not in KNOWN_BUGS:
        golden.write_text(text, encoding="utf-8", newline="\n")

    diags = list(result.diagnostics)
    errors = [d for d in diags if d.severity is Severity.ERROR]
    kinds = {c[0] for c, _, _ in expected}
    if kinds == {"W"}:
        assert not errors, f"a warning case must produce no error, got {[d.code for d in errors]}"
        pool = [d for d in diags if d.severity is Severity.WARNING]
    elif kinds == {"E"}:
        assert errors, "the program must produce at least one error"
        pool = errors
    else:
        pool = [d for d in diags if d.severity in (Severity.ERROR, Severity.WARNING)]
    actual = [(d.code, d.span.line, d.span.col) for d in pool[: len(expected)]]
    assert actual == expected, f"{path.name}: diagnostics were\n{text}"
    assert golden.exists(), f"no golden {golden.name}; run with EFFC_UPDATE_GOLDENS=1"
    assert text == golden.read_text(encoding="utf-8")


def test_corpus_covers_every_code():
    files = corpus()
    assert len(files) >= 40
    seen: dict[str, list[str]] = {}
    for p in files:
        exp = expectations(p)
        assert exp, f"{p.name} has no '# expect:' line"
        for code, _, _ in exp:
            assert code in CODES, f"{p.name} expects an unknown code {code}"
            seen.setdefault(code, []).append(p.name)
    missing = sorted(set(CODES) - NOT_FROM_A_FILE - set(seen))
    assert not missing, f"no bad program expects {missing}"
    assert NOT_FROM_A_FILE <= set(CODES) | {"E9001"}


def test_corpus_files_are_well_formed():
    files = corpus()
    names = [p.name for p in files]
    assert all(re.fullmatch(r"\d{3}_[a-z0-9_]+\.eff", n) for n in names), names
    numbers = [n[:3] for n in names]
    assert len(set(numbers)) == len(numbers), "two files share a number"
    assert set(KNOWN_BUGS) <= set(names), "KNOWN_BUGS names a file that does not exist"
    assert set(POOR_MESSAGES) <= set(names), "POOR_MESSAGES names a file that does not exist"
    goldens = {p.name for p in BAD.glob("*.txt")}
    assert goldens == {p.with_suffix(".txt").name for p in files}, "goldens and programs differ"
    assert len({p.read_text(encoding="utf-8") for p in files}) == len(files), "duplicate programs"


# ---------------------------------------------------------------- E0010: unreadable files


def test_file_that_is_not_utf8_is_e0010(tmp_path):
    path = tmp_path / "latin1.eff"
    path.write_bytes("# recette café\npipeline p\n".encode("latin-1"))
    result = check_file(str(path))
    assert result.program is None and not result.ok
    (d,) = result.diagnostics
    # the caret is on the first byte that is not UTF-8: the Latin-1 'é' of "café"
    assert (d.code, d.severity, d.span.line, d.span.col) == ("E0010", Severity.ERROR, 1, 14)
    assert d.span.file == str(path) and "byte 0xe9 at line 1, column 14" in d.message
    assert d.hint == "save the file as UTF-8"
    text = render_all(result.diagnostics, {str(path): result.source})
    assert text.startswith(f"{path}:1:14: error[E0010]: '{path}' is not UTF-8 text")
    assert "Traceback" not in text


def test_binary_file_is_e0010(tmp_path):
    path = tmp_path / "model.eff"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    (d,) = check_file(str(path)).diagnostics
    assert d.code == "E0010"


def test_missing_file_is_e0010(tmp_path):
    path = tmp_path / "nope.eff"
    (d,) = check_file(str(path)).diagnostics
    assert (d.code, d.span.line, d.span.col) == ("E0010", 1, 1)
    assert d.hint == "check the path"


# ---------------------------------------------------------------- E0111: --set overrides

VALID = """pipeline p
param rank = 8
model tiny = decoder(vocab=512, dim=256, layers=2, heads=4, ffn=704, seq=128)
data corpus = markov(seq=128)
stage tune:
    adapt tiny.layers[*].attn.q with lora(rank=rank)
    train tiny on corpus (steps=10)
"""


def test_valid_program_needs_no_override():
    assert check_source(VALID).ok


def test_override_of_an_unknown_param_is_e0111():
    result = check_source(VALID, overrides={"nope": "1"})
    (d,) = [d for d in result.diagnostics if d.severity is Severity.ERROR]
    assert d.code == "E0111" and d.span.file == "<command line>"
    assert "nope" in d.message and "rank" in d.hint
    typo = check_source(VALID, overrides={"rnak": "4"})
    assert [d.code for d in typo.diagnostics] == ["E0111"]
    assert "did you mean 'rank'" in typo.diagnostics[0].hint


def test_override_that_does_not_parse_is_e0111():
    result = check_source(VALID, overrides={"rank": "(("})
    (d,) = [d for d in result.diagnostics if d.severity is Severity.ERROR]
    assert d.code == "E0111" and d.span.file == "<command line>"
    assert "does not parse" in d.message
    text = render_all(result.diagnostics, {})
    assert text.startswith("<command line>:1:1: error[E0111]: --set rank=((: ")
