"""The generated half of docs/language.md: registries, statement options, diagnostic codes.

    python -m effc.lang.docs docs/language.md    # rewrite the generated section in place

tests/lang/test_docs.py fails when the file and the registries disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

from effc.lang import registry as R
from effc.lang.codes import CODES
from effc.lang.parser import keywords
from effc.lang.tree import KINDS
from effc.lang.types import Entry, Registry

BEGIN = "<!-- BEGIN GENERATED: python -m effc.lang.docs docs/language.md -->"
END = "<!-- END GENERATED -->"


def default_text(p) -> str:
    """How the reference writes a param's default: required, unset, or the value in backticks
    (the language server's hovers and completions say it the same way)."""
    if p.required:
        return "required"
    if p.default_doc is not None:
        return f"`{p.default_doc}`"
    if p.default is None:
        return "unset"
    v = p.default
    text = str(v).lower() if isinstance(v, bool) else f"[{', '.join(map(str, v))}]" if isinstance(v, list) else str(v)
    return f"`{text}`"


def _entry_table(e: Entry) -> list[str]:
    if not e.params:
        return ["No parameters.", ""]
    rows = ["| parameter | type | default | meaning |", "|---|---|---|---|"]
    for p in e.params:
        t = p.type.describe().replace("|", "\\|")
        note = "" if p.available else " *(not available in this version)*"
        rows.append(f"| `{p.name}` | {t} | {default_text(p)} | {p.doc}{note} |")
    return rows + [""]


def _registry(title: str, reg: Registry) -> list[str]:
    out = [f"### {title}", ""]
    for name in reg.names():
        e = reg.entries[name]
        out += [f"#### `{name}`", "", e.doc + (f" Paper: {e.paper}." if e.paper else ""), ""]
        if e.targets:
            out += [f"Applies to: {', '.join(e.targets)} modules.", ""]
        out += _entry_table(e)
    if reg.planned:
        out += ["Settled names not available in this version: "
                + ", ".join(f"`{n}` ({why})" for n, why in sorted(reg.planned.items())) + ".", ""]
    return out


def generate() -> str:
    out = [BEGIN, "", "## Reference (generated from the registries)", ""]
    out += ["Keywords: " + ", ".join(f"`{k}`" for k in keywords()) + ".", ""]
    out += ["Module kinds for `:kind` filters: " + ", ".join(f"`{k}`" for k in KINDS) + ".", ""]
    titles = {"family": "Model families", "data": "Data sources", "optimizer": "Optimizers",
              "schedule": "Schedules", "merge": "Merges", "adapt": "Adapters (`adapt ... with`)",
              "share": "Sharing (`share ... as`)", "prune": "Pruning (`prune ... with`)",
              "quantize": "Quantization (`quantize ... to`)"}
    for key, reg in R.all_registries().items():
        out += _registry(titles[key], reg)
    out += ["### Statement options", ""]
    for name, e in R.STATEMENTS.items():
        out += [f"#### `{name}`", "", e.doc, ""] + _entry_table(e)
    if R.PLANNED_STATEMENTS:
        out += ["Statements not available in this version: "
                + ", ".join(f"`{n}` ({why})" for n, why in R.PLANNED_STATEMENTS.items()) + ".", ""]
    out += ["Data splits: " + ", ".join(f"`{s}`" for s in R.DATA_SPLITS) + ".", ""]
    out += ["### Diagnostic codes", "", "`effc explain CODE` prints the explanation.", "",
            "| code | title | explanation |", "|---|---|---|"]
    out += [f"| {code} | {title} | {text} |" for code, (title, text) in CODES.items()]
    out += ["", END]
    return "\n".join(out) + "\n"


def splice(document: str) -> str:
    """The document with its generated section replaced by the current one."""
    start, stop = document.find(BEGIN), document.find(END)
    if start < 0 or stop < 0:
        return document.rstrip("\n") + "\n\n" + generate()
    return document[:start] + generate() + document[stop + len(END):].lstrip("\n")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m effc.lang.docs docs/language.md  (rewrites the file's generated half)",
              file=sys.stderr)
        return 0 if argv in (["-h"], ["--help"]) else 2
    path = Path(argv[0])
    path.write_text(splice(path.read_text(encoding="utf-8") if path.exists() else ""), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
