"""Syntax colour for `.eff` text: a Pygments lexer, and `highlight` for the terminal.

Nothing here is a list typed by hand. The keywords are read from grammar.lark and sorted
by the place the grammar gives them; the technique, family, data-source, optimizer,
schedule and merge names come from the registries, the enum choices from
`registry.enum_choices()`, the size units from the parser. A name registered tomorrow is
coloured tomorrow; tests/lang/test_highlight.py checks every one of them.

Tokens:
  Keyword              a statement or declaration word at the start of a line (`train`, `budget`)
  Keyword.Declaration  `pipeline`, `param`, `model`, `data`, `stage` (followed by the name declared)
  Name.Class           the name a declaration declares (`model tiny`, `stage tune:`)
  Operator.Word        the words that join a statement's parts (`on`, `with`, `as`, `to`)
  Keyword.Constant     `true`, `false`
  Name.Function        a registered name called: `lora(`, `decoder(`, `adamw(`, `ties(`
  Name.Constant        a bare enum choice: `init=average`, `metrics=[loss]`, `schedule=cosine`
  Name.Attribute       a selector segment: `.layers`, `.{q,v}`, `:linear`; a data split `.validation`
  Name.Property        an option's key: `steps=`
  Name.Label           the stage of a snapshot: `tiny@pretrain`
  Number.*, Keyword.Type  numbers, and the unit of a size (`4` `GiB`)
  String.Double, String.Escape, Comment.Single, Operator, Punctuation, Whitespace

The lexer is contextual the way the grammar is: a keyword is a keyword where a statement
starts or where it joins a statement; where only a name can stand (`(model=1)`,
`stage train:`, `train m on data`) it is a name.
"""

from __future__ import annotations

import functools
import io
import re
from importlib import resources

from pygments.lexer import RegexLexer, bygroups, default
from pygments.token import Comment, Keyword, Name, Number, Operator, Punctuation, String, Whitespace

from effc.lang import registry
from effc.lang.parser import UNITS

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"  # the grammar's NAME terminal


def _grammar_text() -> str:
    return resources.files("effc.lang").joinpath("grammar.lark").read_text(encoding="utf-8")


def keyword_classes(grammar: str | None = None) -> dict[str, str]:
    """Every quoted keyword of the grammar -> "declaration", "statement", "connective" or
    "constant", by where the grammar puts it: an alternative that is the keyword alone
    is a constant (`"true" -> true`); a keyword that opens an alternative opens a
    statement, a declaration when its rule is a `*_decl` naming a NAME next; any other
    keyword joins the parts of a statement (`"on"`, `"with"`)."""
    text = re.sub(r"//[^\n]*", "", _grammar_text() if grammar is None else grammar)
    out: dict[str, str] = {}
    rank = {"connective": 0, "statement": 1, "declaration": 2, "constant": 3}  # where a word has two places
    # a rule: `?name: alternatives`, its `|` continuations on the lines after it
    for rule, body in re.findall(r"^\??([a-z_][a-z0-9_]*)\s*:(.*?)(?=^\??[A-Za-z_]\w*(?:\.\d+)?\s*:|^%|\Z)",
                                 text, re.MULTILINE | re.DOTALL):
        for alt in body.split("|"):
            symbols = re.sub(r"->\s*\w+", "", alt).split()
            for i, sym in enumerate(symbols):
                word = re.fullmatch(r'"([a-z_]+)"', sym)
                if word is None:
                    continue
                if len(symbols) == 1:
                    kind = "constant"
                elif i == 0:
                    kind = "declaration" if rule.endswith("_decl") and symbols[1:2] == ["NAME"] else "statement"
                else:
                    kind = "connective"
                out[word.group(1)] = max(kind, out.get(word.group(1), kind), key=rank.__getitem__)
    return dict(sorted(out.items()))


def registry_names() -> list[str]:
    """Every name in every registry (landed or planned): the names a call can name."""
    names = set()
    for reg in registry.all_registries().values():
        names.update(reg.entries)
        names.update(reg.planned)
    return sorted(names)


def enum_names() -> list[str]:
    """Every bare-name choice of the language (`average`, `gptq`, `perplexity`, ...)."""
    return sorted(registry.enum_choices())


def _alt(words, whole: bool = True) -> str:
    """A regex alternation of the words, longest first; `whole`: as whole words."""
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=lambda w: (-len(w), w))) + ")" + \
        (r"\b" if whole else "")


@functools.lru_cache(maxsize=1)
def _tokens() -> dict:
    classes = keyword_classes()
    declarers, starters, connectives, constants = (
        [w for w, k in classes.items() if k == kind] for kind in ("declaration", "statement", "connective", "constant"))
    not_key = r"(?![ \t]*=)"  # `model=1`: a keyword standing as an option's key is a name
    return {
        "root": [
            # where a line starts: declarations and statements, and the name each declares or names first
            (rf"^([ \t]*)({_alt(declarers)})([ \t]+)({_NAME})",
             bygroups(Whitespace, Keyword.Declaration, Whitespace, Name.Class)),
            (rf"^([ \t]*)({_alt(declarers)}){not_key}", bygroups(Whitespace, Keyword.Declaration)),
            (rf"^([ \t]*)({_alt(starters)}){not_key}([ \t]+)({_NAME})",
             bygroups(Whitespace, Keyword, Whitespace, Name)),
            (rf"^([ \t]*)({_alt(starters)}){not_key}", bygroups(Whitespace, Keyword)),
            (r"\n", Whitespace),
            (r"[^\S\n]+", Whitespace),
            (r"#[^\n]*", Comment.Single),
            (r'"', String.Double, "string"),
            # numbers: a size before a float before an integer, as in the grammar
            (rf"([0-9]+\.?[0-9]*)({_alt(UNITS, whole=False)})(?![A-Za-z0-9_])", bygroups(Number, Keyword.Type)),
            (r"[0-9]+\.[0-9]*(?:[eE][-+]?[0-9]+)?|\.[0-9]+(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+", Number.Float),
            (r"[0-9]+", Number.Integer),
            # names
            (rf"({_NAME})([ \t]*)(=)(?!=)", bygroups(Name.Property, Whitespace, Operator)),
            # after `on`, `to`, ...: a model or data name, or a selector's root (a call has its '(' next)
            (rf"({_alt(connectives)})([ \t]+)({_NAME})\b(?!\()", bygroups(Operator.Word, Whitespace, Name)),
            (_alt(connectives), Operator.Word),
            (_alt(constants), Keyword.Constant),
            (rf"{_alt(registry_names())}(?=[ \t]*\()", Name.Function),
            (rf"{_alt(enum_names())}(?![ \t]*[(.@])", Name.Constant),
            (rf"(@)([ \t]*)({_NAME})", bygroups(Operator, Whitespace, Name.Label)),
            (rf"(\.)({_NAME})", bygroups(Punctuation, Name.Attribute)),
            (rf"(:)({_NAME})", bygroups(Punctuation, Name.Attribute)),
            (r"(\.)(\{)", bygroups(Punctuation, Punctuation), "name_set"),
            (_NAME, Name),
            (r"\*\*|->|[-+*/=@]", Operator),
            (r"[()\[\]{},.:]", Punctuation),
        ],
        "string": [
            (r'[^"\\\n]+', String.Double),
            (r"\\.", String.Escape),
            (r'"', String.Double, "#pop"),
            default("#pop"),  # not closed on its line: the parser reports it (E0007)
        ],
        "name_set": [  # `{q, v}` in a selector
            (r"\s+", Whitespace),
            (_NAME, Name.Attribute),
            (r",", Punctuation),
            (r"\}", Punctuation, "#pop"),
            default("#pop"),
        ],
    }


class EffLexer(RegexLexer):
    """The .eff pipeline language of effc."""

    name = "eff"
    aliases = ["eff", "effc"]
    filenames = ["*.eff"]
    mimetypes = ["text/x-eff"]
    flags = re.MULTILINE
    tokens = _tokens()


def highlight(text: str, colour: bool, language: str | None = "eff") -> str:
    """`text` with ANSI colour for a terminal when `colour` is true (as the lexer of
    `language` sees it: "eff", or a Pygments alias such as "python" or "diff"); the
    text itself, unchanged, otherwise or when `language` is None. The coloured text is
    the same text with escapes around tokens: nothing else changes (no newline added
    or stripped, CRLF kept), because the tokens are taken before Pygments' input
    clean-up."""
    if not colour or language is None or not text:
        return text
    from pygments.formatters import TerminalFormatter
    from pygments.lexers import get_lexer_by_name

    lexer = EffLexer() if language == "eff" else get_lexer_by_name(language)
    tokens = ((ttype, value) for _, ttype, value in lexer.get_tokens_unprocessed(text))
    out = io.StringIO()
    TerminalFormatter().format(tokens, out)
    return out.getvalue()
