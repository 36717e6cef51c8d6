"""compile_checked: one costed IR per train step, adapters as declared so far, budget."""

from pathlib import Path

from effc.compiler.pipeline import compile_checked
from effc.lang.check import check_file, check_source

ROOT = Path(__file__).resolve().parents[2]

SRC = """pipeline p
model m = decoder(vocab=64, dim=32, layers=2, heads=4, ffn=64, seq=16)
data d = markov(seq=16)
{budget}
stage pre:
    train m on d (steps=1, batch=8, accumulate=2)
stage tune:
    adapt m.layers[*].attn.{{q,v}} with lora(rank=4)
    train m on d (steps=1, batch=8)
"""


def test_each_train_step_sees_the_adapters_declared_before_it():
    c = compile_checked(check_source(SRC.format(budget="")))
    assert c.diagnostics == ()
    pre, tune = c.builds
    assert (pre.stage, pre.micro_batch, tune.stage, tune.micro_batch) == ("pre", 4, "tune", 8)
    assert pre.cost.params_trainable == pre.cost.params_total  # pretraining trains everything
    # LoRA r=4 on q and v (32 -> 32) in 2 layers: 2 * 2 * 4 * (32 + 32)
    assert tune.cost.params_trainable == 1024
    assert tune.cost.params_total == pre.cost.params_total + 1024
    assert tune.report.count("apply_lora") > 0 and pre.report.count("apply_lora") == 0


def test_a_peak_over_the_budget_is_a_diagnostic_at_the_budget_line():
    fits = compile_checked(check_source(SRC.format(budget="budget(memory=1GiB)")))
    assert fits.diagnostics == ()
    over = compile_checked(check_source(SRC.format(budget="budget(memory=1KiB)")))
    assert [(d.code, d.span.line, d.span.col) for d in over.diagnostics] == [("E0404", 4, 1)] * 2
    peak = over.builds[0].cost.peak_bytes
    assert f"{peak / 2**20:.1f}MiB" in over.diagnostics[0].message


def test_every_example_compiles_within_its_budget():
    for path in sorted((ROOT / "examples").glob("*.eff")):
        c = compile_checked(check_file(str(path)))
        assert c.diagnostics == () and c.builds, path.name
