"""docs/language.md's generated reference must match the registries and codes."""

from pathlib import Path

from effc.lang import docs, registry
from effc.lang.codes import CODES

ROOT = Path(__file__).resolve().parents[2]


def test_generated_reference_is_in_sync():
    text = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    assert docs.splice(text) == text, "run: python -m effc.lang.docs docs/language.md"


def test_reference_lists_every_code_and_registered_name():
    text = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    for code in CODES:
        assert f"| {code} |" in text
    for reg in registry.all_registries().values():
        for name in reg.entries:
            assert f"#### `{name}`" in text
        for name in reg.planned:
            assert f"`{name}` (" in text


def test_splice_replaces_only_the_generated_section():
    doc = "# Title\n\nhand-written\n\n" + docs.BEGIN + "\nstale\n" + docs.END + "\ntail\n"
    out = docs.splice(doc)
    assert out.startswith("# Title\n\nhand-written\n\n")
    assert "stale" not in out and out.endswith("tail\n")
    assert docs.splice(out) == out
