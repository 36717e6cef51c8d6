"""The Vim files, loaded by a real Vim run headless (`vim -es`, no vimrc): filetype
detection, the syntax groups at chosen places in the examples, and the indent rules.

For each place the script writes the syntax item there and the chain of groups it links
to (effSize Number Constant), so a test asks for the standard group it means (Number)
whatever the chain continues with.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VIM_DIR = ROOT / "editors" / "vim"
QUICKSTART = ROOT / "examples" / "quickstart.eff"
PRUNE_QUANTIZE = ROOT / "examples" / "prune_quantize.eff"
EXAMPLES = sorted((ROOT / "examples").glob("*.eff"))

pytestmark = pytest.mark.skipif(shutil.which("vim") is None, reason="vim is not installed (apt-get install vim)")

PRELUDE = r"""
set nocompatible
let &runtimepath = '{rtp},' . &runtimepath
filetype plugin indent on
syntax on
function! Chain(l, c) abort
  let name = synIDattr(synID(a:l, a:c, 1), 'name')
  let out = [name]
  while name !=# '' && len(out) < 8
    let m = matchlist(execute('hi ' . name), 'links to \(\w\+\)')
    if empty(m)
      break
    endif
    let name = m[1]
    call add(out, name)
  endwhile
  return join(out, ' ')
endfunction
"""


def run_vim(tmp_path: Path, body: str) -> list[str]:
    """Run `body` after PRELUDE; it appends lines to the list `out`. Returns them."""
    result = tmp_path / "out.txt"
    script = tmp_path / "script.vim"
    script.write_text(PRELUDE.format(rtp=VIM_DIR) + "let out = []\n" + body
                      + f"\ncall writefile(out, '{result}')\nqall!\n")
    done = subprocess.run(["vim", "-N", "-u", "NONE", "-i", "NONE", "-es", "-S", str(script)],
                          check=False, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert result.exists(), f"vim wrote nothing (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    return result.read_text().splitlines()


def at(path: Path, line_needle: str, token: str, nth: int = 0) -> tuple[int, int]:
    """(line, column), 1-based, of the `nth` `token` on the first line holding `line_needle`."""
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if line_needle in line:
            col = -1
            for _ in range(nth + 1):
                col = line.index(token, col + 1)
            return no, col + 1
    raise AssertionError(f"no line holds {line_needle!r} in {path.name}")


# (file, line holding, token, nth, a group the token's chain must hold)
PLACES = [
    (QUICKSTART, "# effc quickstart", "effc", 0, "Comment"),
    (QUICKSTART, "data stdlib", "bytes", 0, "Comment"),
    (QUICKSTART, "pipeline quickstart", "pipeline", 0, "Keyword"),
    (QUICKSTART, "pipeline quickstart", "quickstart", 0, "Identifier"),
    (QUICKSTART, "param rank", "rank", 0, "Identifier"),
    (QUICKSTART, "param rank", "8", 0, "Number"),
    (QUICKSTART, "model tiny", "decoder", 0, "Function"),
    (QUICKSTART, "model tiny", "vocab", 0, "Special"),
    (QUICKSTART, "data reference", "text", 0, "Function"),
    (QUICKSTART, "data reference", "docs/language", 0, "String"),
    (QUICKSTART, "budget(", "budget", 0, "Keyword"),
    (QUICKSTART, "budget(", "4GiB", 0, "Number"),
    (QUICKSTART, "budget(", "GiB", 0, "Type"),
    (QUICKSTART, "stage pretrain", "pretrain", 0, "Identifier"),
    (QUICKSTART, "train tiny on stdlib", "train", 0, "Statement"),
    (QUICKSTART, "train tiny on stdlib", "on", 0, "Keyword"),
    (QUICKSTART, "train tiny on stdlib", "adamw", 0, "Function"),
    (QUICKSTART, "train tiny on stdlib", "3e-3", 0, "Float"),
    (QUICKSTART, "schedule=cosine", "cosine", 0, "Function"),
    (QUICKSTART, "eval tiny on reference.validation (metrics=[loss, perplexity])", "validation", 0, "Identifier"),
    (QUICKSTART, "eval tiny on reference.validation (metrics=[loss, perplexity])", "loss", 0, "Constant"),
    (QUICKSTART, "adapt tiny", "adapt", 0, "Statement"),
    (QUICKSTART, "adapt tiny", "*", 0, "Special"),
    (QUICKSTART, "adapt tiny", "{", 0, "Delimiter"),
    (QUICKSTART, "adapt tiny", "with", 0, "Keyword"),
    (QUICKSTART, "adapt tiny", "lora", 0, "Function"),
    (QUICKSTART, "adapt tiny", "*", 1, "Operator"),  # 2*rank
    (QUICKSTART, "against=tiny@pretrain", "@", 0, "Operator"),
    (QUICKSTART, "against=tiny@pretrain", "pretrain", 0, "Identifier"),
    (QUICKSTART, "export tiny", "export", 0, "Statement"),
    (QUICKSTART, "export tiny", "to", 0, "Keyword"),
    (QUICKSTART, "export tiny", "true", 0, "Boolean"),
    (QUICKSTART, "export tiny", "effc", 0, "Constant"),
    (PRUNE_QUANTIZE, "stage quantize:", "quantize", 0, "Identifier"),  # a keyword as a name
    (PRUNE_QUANTIZE, "tie tiny", "tie", 0, "Statement"),
    (PRUNE_QUANTIZE, "tie tiny", "with", 0, "Keyword"),
    (PRUNE_QUANTIZE, "tie tiny", "[", 1, "Delimiter"),  # in the second selector
    (PRUNE_QUANTIZE, "**:linear", "**", 0, "Special"),
    (PRUNE_QUANTIZE, "**:linear", "linear", 0, "Type"),
    (PRUNE_QUANTIZE, "**:linear", "magnitude", 0, "Function"),
    (PRUNE_QUANTIZE, "drop_sublayers(", "attn", 0, "Constant"),
    (PRUNE_QUANTIZE, "to nf4(", "quantize", 0, "Statement"),
    (PRUNE_QUANTIZE, "to nf4(", "nf4", 0, "Function"),
]


def test_filetype_and_syntax_groups(tmp_path):
    files = sorted({p for p, *_ in PLACES})
    body = []
    for path in files:
        body += [f"edit {path}", "call add(out, &filetype . ' ' . get(b:, 'current_syntax', '-'))"]
        for p, needle, token, nth, _ in PLACES:
            if p == path:
                line, col = at(p, needle, token, nth)
                body.append(f"call add(out, Chain({line}, {col}))")
    lines = run_vim(tmp_path, "\n".join(body))
    it = iter(lines)
    for path in files:
        assert next(it) == "eff eff", f"{path.name}: filetype and syntax not set to eff"
        for p, needle, token, nth, group in PLACES:
            if p == path:
                chain = next(it).split()
                assert group in chain, f"{path.name}: {token!r} on the line holding {needle!r} is {chain}, not {group}"


def test_ftplugin_settings(tmp_path):
    lines = run_vim(tmp_path, f"edit {QUICKSTART}\ncall add(out, &commentstring)\ncall add(out, &expandtab)")
    assert lines == ["# %s", "1"]


def test_indent_reproduces_the_examples(tmp_path):
    """EffIndent gives every line of every example its indent, except where a stage body
    ends: a dedent is the writer's choice, as in Python."""
    body = []
    for path in EXAMPLES:
        body += [f"edit {path}", "for l in range(2, line('$'))",
                 "  if getline(l) !~# '^\\s*\\%(#.*\\)\\=$'",
                 f"    call add(out, '{path.name}:' . l . ' ' . EffIndent(l) . ' ' . indent(l))",
                 "  endif", "endfor"]
    wrong = []
    for line in run_vim(tmp_path, "\n".join(body)):
        where, want, have = line.split()
        if int(want) != int(have) and not (int(have) == 0 and int(want) == 4):
            wrong.append(f"{where}: EffIndent {want}, the file has {have}")
    assert not wrong, "\n".join(wrong)
