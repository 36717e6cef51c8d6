"""`effc lsp` driven over stdio by a real LSP client (pygls's), as an editor would.

One server process serves the whole module: the session fixture opens documents, changes
them, sends every request and records the answers; each test then asserts on one feature.
Expected values come from elsewhere: ranges are computed from the document text, the
formatted text from `lang.format.format_source`, defaults from the registry.
"""

import asyncio
import re
import sys
from pathlib import Path

import pytest
from lsprotocol import types as lsp
from pygls.lsp.client import BaseLanguageClient

from effc.lang.format import format_source

TIMEOUT_S = 30  # a hung server fails the module instead of hanging CI

GOOD = """pipeline lsp_test

model tiny = decoder(vocab=64, dim=32, layers=2, heads=2, ffn=64, seq=16)
data corpus = markov(seq=16)

stage tune:
    adapt tiny.layers[*].attn.{q,v} with lora(rank=4)
    train tiny on corpus (steps=2)
"""
BAD = GOOD.replace("lora(rank=4)", "lorx(rank=4)")  # an unknown adapter: E0301
HEAD = GOOD.split("stage tune:")[0] + "stage tune:\n"
UGLY = "pipeline  p\nmodel m=decoder( vocab=64,dim=32,layers=2 , heads=2,ffn=64,seq=16 )\n"
GARBAGE = "stage \x00 ((( \n\t]] @@ \"\n" * 3


def _pos(text: str, needle: str, k: int = 0) -> lsp.Position:
    """The position of the k-th character of the first `needle` in `text` (0-based)."""
    i = text.index(needle) + k
    line = text.count("\n", 0, i)
    return lsp.Position(line, i - (text.rfind("\n", 0, i) + 1))


def _end(text: str) -> lsp.Position:
    return lsp.Position(text.count("\n"), len(text) - (text.rfind("\n") + 1))


async def _session(folder: Path) -> dict:
    client = BaseLanguageClient("effc-test", "1")
    published: dict[tuple[str, int | None], list[lsp.Diagnostic]] = {}

    @client.feature(lsp.TEXT_DOCUMENT_PUBLISH_DIAGNOSTICS)
    def on_diagnostics(params: lsp.PublishDiagnosticsParams) -> None:
        published[(params.uri, params.version)] = params.diagnostics

    async def diagnostics(uri: str, version: int) -> list[lsp.Diagnostic]:
        while (uri, version) not in published:
            await asyncio.sleep(0.02)
        return published[(uri, version)]

    def open_(name: str, text: str) -> str:
        uri = (folder / name).as_uri()
        client.text_document_did_open(lsp.DidOpenTextDocumentParams(lsp.TextDocumentItem(uri, "eff", 1, text)))
        return uri

    def change(uri: str, version: int, text: str) -> None:
        client.text_document_did_change(lsp.DidChangeTextDocumentParams(
            lsp.VersionedTextDocumentIdentifier(version, uri), [lsp.TextDocumentContentChangeEvent_Type2(text)]))

    async def completion(uri: str, version: int, text: str) -> list[lsp.CompletionItem]:
        change(uri, version, text)
        answer = await client.text_document_completion_async(
            lsp.CompletionParams(lsp.TextDocumentIdentifier(uri), _end(text)))
        return answer.items if isinstance(answer, lsp.CompletionList) else answer or []

    def doc(uri: str) -> lsp.TextDocumentIdentifier:
        return lsp.TextDocumentIdentifier(uri)

    out: dict = {}
    await client.start_io(sys.executable, "-m", "effc", "lsp")
    try:
        init = await client.initialize_async(lsp.InitializeParams(
            capabilities=lsp.ClientCapabilities(), root_uri=folder.as_uri(), process_id=None))
        client.initialized(lsp.InitializedParams())
        out["init"] = init

        good = open_("good.eff", GOOD)
        out["open"] = await diagnostics(good, 1)
        change(good, 2, BAD)
        out["change"] = await diagnostics(good, 2)
        change(good, 3, GARBAGE)
        out["garbage"] = await diagnostics(good, 3)
        change(good, 4, GOOD)
        out["fixed"] = await diagnostics(good, 4)

        out["hover"] = await client.text_document_hover_async(
            lsp.HoverParams(doc(good), _pos(GOOD, "lora(", 2)))
        out["definition_model"] = await client.text_document_definition_async(
            lsp.DefinitionParams(doc(good), _pos(GOOD, "tiny on", 1)))
        out["definition_data"] = await client.text_document_definition_async(
            lsp.DefinitionParams(doc(good), _pos(GOOD, "corpus (", 3)))

        typing = open_("typing.eff", HEAD)
        out["keywords"] = await completion(typing, 2, HEAD + "    ")
        out["with"] = await completion(typing, 3, HEAD + "    adapt tiny.layers[*].attn.q with ")
        out["args"] = await completion(typing, 4, HEAD + "    adapt tiny.layers[*].attn.q with lora(")
        out["selector"] = await completion(typing, 5, HEAD + "    adapt tiny.")
        out["members"] = await completion(typing, 6, HEAD + "    adapt tiny.layers[*].attn.")

        ugly = open_("ugly.eff", UGLY)
        fmt = lsp.FormattingOptions(tab_size=4, insert_spaces=True)
        out["format"] = await client.text_document_formatting_async(lsp.DocumentFormattingParams(doc(ugly), fmt))
        out["format_good"] = await client.text_document_formatting_async(
            lsp.DocumentFormattingParams(doc(good), fmt))

        await client.shutdown_async(None)
        client.exit(None)
    finally:
        await client.stop()
    return out


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("lsp")
    return asyncio.run(asyncio.wait_for(_session(folder), TIMEOUT_S))


def _labels(items) -> list[str]:
    return [i.label for i in items]


def test_initialize_names_the_server_and_its_features(session):
    init = session["init"]
    assert init.server_info.name == "effc"
    caps = init.capabilities
    assert caps.hover_provider and caps.definition_provider and caps.document_formatting_provider
    assert caps.completion_provider is not None


def test_a_valid_file_publishes_no_diagnostics(session):
    assert session["open"] == []
    assert session["fixed"] == []


def test_an_unknown_technique_is_reported_at_its_range(session):
    errors = [d for d in session["change"] if d.severity == lsp.DiagnosticSeverity.Error]
    assert [d.code for d in errors] == ["E0301"]
    d = errors[0]
    line = BAD.split("\n").index("    adapt tiny.layers[*].attn.{q,v} with lorx(rank=4)")
    start = BAD.split("\n")[line].index("lorx")
    assert (d.range.start.line, d.range.start.character) == (line, start)
    assert (d.range.end.line, d.range.end.character) == (line, start + 4)
    assert "unknown adapter 'lorx'" in d.message and "did you mean 'lora'?" in d.message  # the hint comes along
    assert d.source == "effc"


def test_garbage_gets_a_diagnostic_and_the_server_keeps_serving(session):
    assert session["garbage"], "a file full of syntax errors must get diagnostics"
    assert all(d.code != "E9001" for d in session["garbage"])
    assert session["hover"] is not None  # answered after the garbage


def test_completion_of_statement_keywords_in_a_stage(session):
    labels = _labels(session["keywords"])
    assert {"train", "eval", "adapt", "quantize", "export"} <= set(labels)
    assert "pipeline" not in labels


def test_completion_after_with_offers_the_adapters(session):
    labels = _labels(session["with"])
    assert "lora" in labels and "dora" in labels
    assert "int4" not in labels  # a quantizer follows `to`, not an adapter's `with`


def test_completion_inside_lora_offers_its_arguments(session):
    items = {i.label: i for i in session["args"]}
    assert {"rank", "alpha", "dropout"} <= set(items)
    assert "required" in items["rank"].detail
    assert "rank" in items["alpha"].detail  # alpha's default is the rank


def test_completion_of_selector_paths_from_the_module_tree(session):
    assert {"embed", "layers", "head"} <= set(_labels(session["selector"]))
    assert {"q", "k", "v", "o"} <= set(_labels(session["members"]))


def test_hover_on_lora_shows_its_parameters_defaults_and_paper(session):
    value = session["hover"].contents.value
    assert "**lora**" in value
    assert "`rank`" in value and "required" in value
    assert "`alpha`" in value and "default `rank`" in value
    assert "arXiv:2106.09685" in value


def test_definition_jumps_to_the_declaration(session):
    model, data = session["definition_model"], session["definition_data"]
    lines = GOOD.split("\n")
    assert model.uri.endswith("good.eff")
    assert model.range.start == lsp.Position(lines.index(next(x for x in lines if x.startswith("model tiny"))), 6)
    assert data.range.start.line == next(i for i, x in enumerate(lines) if x.startswith("data corpus"))


def test_formatting_returns_what_effc_fmt_produces(session):
    expected, _ = format_source(UGLY)
    assert expected is not None and expected != UGLY
    (edit,) = session["format"]
    assert edit.new_text == expected
    assert edit.range.start == lsp.Position(0, 0) and edit.range.end == _end(UGLY)
    assert session["format_good"] == []  # formatted already: no edit


def test_the_statement_keywords_are_the_grammars():
    """The server's statement keywords (what it completes at a line's start) are the
    words that begin the grammar's items and stage statements."""
    from effc.lang.lsp import STAGE_KEYWORDS, TOP_KEYWORDS

    grammar = (Path(__file__).resolve().parents[2] / "lang" / "grammar.lark").read_text()
    first_word = dict(re.findall(r'^(\w+): "(\w+)"', grammar, re.M))  # rule -> the keyword it starts with

    def starts(rule: str) -> set[str]:
        body = grammar.split(f"?{rule}:")[1].split("\n\n")[0]
        return {first_word[r] for r in re.findall(r"(\w+)", body) if r in first_word}

    assert set(TOP_KEYWORDS) == starts("item")
    assert set(STAGE_KEYWORDS) == starts("stmt")
