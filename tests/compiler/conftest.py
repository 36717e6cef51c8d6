"""Checked inputs for the compiler tests, built from `.eff` text as a user writes it."""

import pytest

from effc.lang.check import check_source


def model_info(decl: str, body: str = ""):
    """The ModelInfo of `model m = <decl>`; `body` is extra stage text (adapt statements)."""
    src = f"pipeline t\nmodel m = {decl}\ndata d = markov(seq=8, vocab=2)\nstage s:\n{body}    train m on d (steps=1, batch=2)\n"
    result = check_source(src)
    assert result.ok, result.diagnostics
    return result.models["m"]


@pytest.fixture
def make_model():
    return model_info
