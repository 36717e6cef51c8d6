"""The VS Code grammar, run by the engine VS Code runs it with.

tokenize.js tokenizes every file under examples/ with vscode-textmate on vscode-oniguruma
(npm packages pinned by package-lock.json beside it; `npm ci` installs them when
node_modules is missing, as .ci/run does), in one node process. Each file's tokens are
compared with its golden `golden/<name>.scopes.txt`: one line a token,

    LINE:COL "text"  scope scope ...

(the root scope source.eff and tokens of bare spaces left out). Rewrite the goldens with

    EFFC_UPDATE_GOLDENS=1 python -m pytest tests/editors/test_textmate.py

and read every changed line before committing it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "editors"
GOLDEN = HERE / "golden"
GRAMMAR = ROOT / "editors" / "vscode" / "syntaxes" / "eff.tmLanguage.json"
EXAMPLES = sorted((ROOT / "examples").glob("*.eff"))
UPDATE = os.environ.get("EFFC_UPDATE_GOLDENS") == "1"

pytestmark = pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                                reason="node and npm are needed to run vscode-textmate (apt-get install nodejs npm)")


@pytest.fixture(scope="module")
def tokens() -> dict[str, list[list[dict]]]:
    """Relative path -> lines -> tokens, for every example."""
    if not (HERE / "node_modules" / "vscode-textmate").is_dir():
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=HERE, check=False,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"npm ci failed in tests/editors:\n{done.stdout}\n{done.stderr}"
    done = subprocess.run(["node", str(HERE / "tokenize.js"), str(GRAMMAR), *map(str, EXAMPLES)], check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return {str(Path(k).relative_to(ROOT)): v for k, v in json.loads(done.stdout).items()}


def render(lines: list[list[dict]]) -> str:
    out = []
    for line in lines:
        for t in line:
            scopes = t["scopes"][1:]  # [0] is source.eff
            if scopes or t["text"].strip():
                out.append(f'{t["line"]}:{t["col"]} {json.dumps(t["text"])}  {" ".join(scopes) or "source.eff"}')
    return "\n".join(out) + "\n"


def find(tokens: list[list[dict]], line: int, text: str, nth: int = 0) -> list[str]:
    """The scopes of the `nth` token on `line` (1-based) whose text is `text`."""
    hits = [t for t in tokens[line - 1] if t["text"] == text]
    assert len(hits) > nth, f"no token {text!r} on line {line}: {[t['text'] for t in tokens[line - 1]]}"
    return hits[nth]["scopes"]


def line_of(path: Path, needle: str) -> int:
    return next(i for i, s in enumerate(path.read_text().splitlines(), 1) if needle in s)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_scopes_match_golden(tokens, example: Path):
    got = render(tokens[str(example.relative_to(ROOT))])
    golden = GOLDEN / f"{example.stem}.scopes.txt"
    if UPDATE:
        golden.write_text(got)
    assert golden.exists(), f"no golden for {example.name}: run EFFC_UPDATE_GOLDENS=1 python -m pytest {__file__}"
    assert got == golden.read_text(), (f"{example.name} tokenizes differently from {golden.relative_to(ROOT)}: "
                                       "if the change is intended, rerun with EFFC_UPDATE_GOLDENS=1 and review")


def test_no_golden_without_an_example():
    stale = {p.name for p in GOLDEN.glob("*.scopes.txt")} - {f"{p.stem}.scopes.txt" for p in EXAMPLES}
    assert not stale, f"goldens of examples that no longer exist: {sorted(stale)}"


def test_quickstart_scopes(tokens):
    path = ROOT / "examples" / "quickstart.eff"
    q = tokens["examples/quickstart.eff"]
    assert find(q, 1, "#")[1:] == ["comment.line.number-sign.eff", "punctuation.definition.comment.eff"]
    assert all("comment.line.number-sign.eff" in t["scopes"] for t in q[0])
    budget = line_of(path, "budget(")
    assert find(q, budget, "budget")[-1] == "keyword.other.declaration.eff"
    assert find(q, budget, "4")[-1] == "constant.numeric.size.eff"
    assert find(q, budget, "GiB")[1:] == ["constant.numeric.size.eff", "keyword.other.unit.eff"]
    assert find(q, budget, "memory")[-1] == "variable.parameter.eff"
    assert find(q, line_of(path, "pipeline "), "quickstart")[-1] == "entity.name.namespace.pipeline.eff"
    assert find(q, line_of(path, "model tiny"), "tiny")[-1] == "entity.name.type.model.eff"
    assert find(q, line_of(path, "model tiny"), "decoder")[-1] == "support.function.eff"
    assert find(q, line_of(path, "stage tune"), "tune")[-1] == "entity.name.section.stage.eff"

    adapt = line_of(path, "adapt ")
    assert find(q, adapt, "adapt")[-1] == "keyword.control.statement.eff"
    assert find(q, adapt, "with")[-1] == "keyword.other.connective.eff"
    assert find(q, adapt, "lora")[-1] == "support.function.eff"
    for text in ("tiny", "layers", "*", "attn", "{", "q", "v", "}"):
        assert "meta.selector.eff" in find(q, adapt, text), text
    assert find(q, adapt, "*")[-1] == "keyword.operator.wildcard.eff"
    assert find(q, adapt, "rank", 1)[-1] == "variable.other.eff"  # rank=rank: the value is the param

    train = line_of(path, "train tiny on stdlib")
    assert find(q, train, "train")[-1] == "keyword.control.statement.eff"
    assert find(q, train, "on")[-1] == "keyword.other.connective.eff"
    assert find(q, train, "3e-3")[-1] == "constant.numeric.float.eff"
    against = line_of(path, "against=tiny@pretrain")
    assert find(q, against, "@")[1:] == ["meta.snapshot.eff", "keyword.operator.snapshot.eff"]
    export = line_of(path, "export tiny")
    assert find(q, export, "out/quickstart")[-1] == "string.quoted.double.eff"
    assert find(q, export, "true")[-1] == "constant.language.boolean.eff"
    assert find(q, export, "effc")[-1] == "support.constant.eff"


def test_compression_scopes(tokens):
    path = ROOT / "examples" / "prune_quantize.eff"
    p = tokens["examples/prune_quantize.eff"]
    kind = line_of(path, "**:linear")
    assert find(p, kind, "**")[1:] == ["meta.selector.eff", "keyword.operator.wildcard.any-depth.eff"]
    assert find(p, kind, "linear")[1:] == ["meta.selector.eff", "support.type.kind.eff"]
    assert find(p, kind, "magnitude")[-1] == "support.function.eff"
    tie = line_of(path, "tie tiny")
    assert find(p, tie, "tiny", 1)[1:] == ["meta.selector.eff", "variable.other.model.eff"]  # the second selector
    assert find(p, tie, "4")[-1] == "constant.numeric.integer.eff"
    assert find(p, line_of(path, "stage quantize"), "quantize")[-1] == "entity.name.section.stage.eff"
    quantize = line_of(path, "to nf4(")
    assert find(p, quantize, "quantize")[-1] == "keyword.control.statement.eff"
    assert find(p, quantize, "nf4")[-1] == "support.function.eff"
    drop = line_of(path, "drop_sublayers(")
    assert find(p, drop, "attn")[-1] == "support.constant.eff"  # kind=attn: a choice, not a selector field
    assert find(p, drop, ":")[-1] == "punctuation.separator.slice.eff"
