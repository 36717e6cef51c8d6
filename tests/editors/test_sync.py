"""The editor files agree with the language: the generated word lists are current, every
keyword and registered name reaches both editors, and the VS Code manifest holds
together."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from effc.lang.parser import keywords
from effc.lang.registry import all_registries

ROOT = Path(__file__).resolve().parents[2]
VSCODE = ROOT / "editors" / "vscode"


def _load_generator():
    spec = importlib.util.spec_from_file_location("effc_editors_generate", ROOT / "editors" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


def test_generated_files_are_current():
    stale = [str(path.relative_to(ROOT)) for path, text in generate.expected().items()
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    assert not stale, (f"{', '.join(stale)} out of date with lang/grammar.lark and lang/registry.py: "
                       "run `python editors/generate.py` and commit the result")


def _words_in_alternations(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))


@pytest.mark.parametrize("path", [generate.TMLANGUAGE, generate.VIM_SYNTAX], ids=lambda p: p.name)
def test_every_keyword_and_registered_name_is_highlighted(path):
    """Independent of how the generator sorts words: each keyword the parser knows and
    each name of each registry appears in the file as a word of a pattern."""
    if path == generate.TMLANGUAGE:
        text = " ".join(p.get("match", "") for p in _patterns(json.loads(path.read_text())))
    else:
        text = "\n".join(line for line in path.read_text().splitlines() if line.startswith("syn "))
    words = _words_in_alternations(text)
    names = {n for r in all_registries().values() for n in r.entries}
    missing = sorted((set(keywords()) | names) - words)
    assert not missing, f"{path.name} does not highlight {missing}: run `python editors/generate.py`"


def _patterns(node):
    if isinstance(node, dict):
        if "match" in node or "begin" in node:
            yield node
        for value in node.values():
            yield from _patterns(value)
    elif isinstance(node, list):
        for value in node:
            yield from _patterns(value)


def test_generator_refuses_a_keyword_it_cannot_place():
    grammar = generate.GRAMMAR.read_text().replace(
        'tie_stmt: "tie" selector "with" selector _NL',
        'tie_stmt: "tie" selector "with" selector _NL\n        | "merge" "into" NAME _NL')
    with pytest.raises(ValueError, match="into, merge"):
        generate.read_words(grammar)


def test_generator_places_a_new_statement_by_its_shape():
    grammar = generate.GRAMMAR.read_text().replace(
        'tie_stmt: "tie" selector "with" selector _NL',
        'tie_stmt: "tie" selector "with" selector _NL\n        | "distill" selector "from" call _NL')
    w = generate.read_words(grammar)
    assert "distill" in w.selector_statements and "from" in w.connectives


def test_vscode_manifest():
    manifest = json.loads((VSCODE / "package.json").read_text())
    assert manifest["name"] == "effc-eff" and manifest["publisher"] == "effc"
    assert manifest["engines"]["vscode"].startswith("^")
    [language] = manifest["contributes"]["languages"]
    assert language["id"] == "eff" and language["extensions"] == [".eff"]
    [grammar] = manifest["contributes"]["grammars"]
    assert grammar["language"] == "eff" and grammar["scopeName"] == "source.eff"
    assert (VSCODE / grammar["path"]).resolve() == generate.TMLANGUAGE
    assert json.loads(generate.TMLANGUAGE.read_text())["scopeName"] == "source.eff"

    config = json.loads((VSCODE / language["configuration"]).read_text())
    assert config["comments"] == {"lineComment": "#"}
    assert config["brackets"] == [["(", ")"], ["[", "]"], ["{", "}"]]
    assert config["folding"]["offSide"] is True
    increase = re.compile(config["indentationRules"]["increaseIndentPattern"])
    assert increase.search("stage pretrain:") and increase.search("stage tune:   # why")
    assert not increase.search("# note:") and not increase.search("    train m on d (steps=1)")
    decrease = re.compile(config["indentationRules"]["decreaseIndentPattern"])
    assert not any(decrease.search(line) for line in (ROOT / "examples" / "quickstart.eff").read_text().splitlines())
    closing = {(p["open"], p["close"]) for p in config["autoClosingPairs"]}
    assert {("(", ")"), ("[", "]"), ("{", "}"), ('"', '"')} <= closing
