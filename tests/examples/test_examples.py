"""Every file under examples/ checks cleanly (no errors, no warnings) and is formatted."""

from pathlib import Path

import pytest

from effc.lang.check import check_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.eff"))


def test_there_are_examples():
    assert any(p.name == "quickstart.eff" for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_checks_clean(path):
    result = check_file(str(path))
    assert result.ok
    assert result.diagnostics == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_formatted(path):
    from effc.lang.format import format_source

    text = path.read_text(encoding="utf-8")
    formatted, diags = format_source(text, str(path))
    assert diags == ()
    assert formatted == text
