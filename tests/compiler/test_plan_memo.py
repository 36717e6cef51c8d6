"""plan_train keeps its last searches: the same inputs (as `effc run` gives at check time
and again as it trains) search once; any input the plan depends on searches again."""

import pytest

from effc.compiler import pipeline
from effc.compiler.pipeline import compile_checked, model_ir, plan_train
from effc.compiler.profile import DEFAULT_CPU
from effc.lang.check import check_source

SRC = """pipeline p
model m = decoder(vocab=64, dim=32, layers=2, heads=4, ffn=64, seq=16)
model n = decoder(vocab=64, dim=32, layers=3, heads=4, ffn=64, seq=16)
data d = markov(seq=16)
stage tune:
    adapt m.layers[*].attn.{q,v} with lora(rank=4)
    train m on d (steps=1, batch=8)
    train m on d (steps=1, batch=6)
    train n on d (steps=1, batch=8)
"""


@pytest.fixture
def searches(monkeypatch):
    """The searches plan_train runs from here on (a fresh memo, a counting search)."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return search(*args, **kwargs)

    search = pipeline.search
    monkeypatch.setattr(pipeline, "_PLANS", type(pipeline._PLANS)())
    monkeypatch.setattr(pipeline, "search", counting)
    return calls


def steps():
    result = check_source(SRC)
    assert result.ok, result.diagnostics
    return result, result.stages[0].steps


def test_the_same_inputs_search_once_and_give_the_same_plan(searches):
    result, (step, _, _) = steps()
    ir, _ = model_ir(result, "m", step.span)
    first = plan_train(result, step, ir, [], 2**30, 1, DEFAULT_CPU)
    assert len(searches) == 1
    again_ir, _ = model_ir(result, "m", step.span)  # an equal IR, built again
    again = plan_train(result, step, again_ir, [], 2**30, 1, DEFAULT_CPU)
    assert len(searches) == 1
    assert again == first and again[0].plan == first[0].plan


def test_another_budget_world_override_or_ir_searches_again(searches):
    result, (step, smaller, other) = steps()
    ir, _ = model_ir(result, "m", step.span)
    plan_train(result, step, ir, [], 2**30, 1, DEFAULT_CPU)
    plan_train(result, step, ir, [], 2**20, 1, DEFAULT_CPU)  # the budget
    assert len(searches) == 2
    plan_train(result, step, ir, [], 2**30, 2, DEFAULT_CPU)  # the processes
    plan_train(result, step, ir, [("checkpoint", "full")], 2**30, 1, DEFAULT_CPU)  # an override
    plan_train(result, step, ir, [], 2**30, 1, DEFAULT_CPU, searching=False)
    assert len(searches) == 5
    plan_train(result, smaller, model_ir(result, "m", smaller.span)[0], [], 2**30, 1, DEFAULT_CPU)  # the batch
    assert len(searches) == 6
    plan_train(result, other, model_ir(result, "n", other.span)[0], [], 2**30, 1, DEFAULT_CPU)  # the model
    assert len(searches) == 7
    plan_train(result, step, ir, [], 2**30, 1, DEFAULT_CPU)  # still kept
    assert len(searches) == 7


def test_compile_then_run_search_once(searches):
    """The check of `effc run` and its train step ask for the same search."""
    result, (step, _, _) = steps()
    built = compile_checked(result, [], 2**30, 1, profile=DEFAULT_CPU).builds[0]
    assert len(searches) == 3
    chosen, found = plan_train(result, step, model_ir(result, "m", step.span)[0], [], 2**30, 1, DEFAULT_CPU)
    assert len(searches) == 3
    assert (chosen.plan, found) == (built.plan, built.search)


def test_only_the_last_searches_are_kept(searches, monkeypatch):
    monkeypatch.setattr(pipeline, "PLANS_KEPT", 2)
    result, (step, _, _) = steps()
    ir, _ = model_ir(result, "m", step.span)
    for budget in (2**30, 2**29, 2**28):
        plan_train(result, step, ir, [], budget, 1, DEFAULT_CPU)
    plan_train(result, step, ir, [], 2**28, 1, DEFAULT_CPU)
    assert len(searches) == 3
    plan_train(result, step, ir, [], 2**30, 1, DEFAULT_CPU)  # the oldest was dropped
    assert len(searches) == 4
