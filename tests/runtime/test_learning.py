"""Training reaches the floor a source's known entropy sets: on markov data the
validation loss of a trained model approaches the chain's entropy rate (nats per token)
from above, and never beats it by more than sampling noise."""

import sys
from pathlib import Path

from effc.compiler.lower import lower_model
from effc.compiler.passes import PassContext, run_passes
from effc.runtime import data as D
from effc.runtime.evaluate import evaluate
from effc.runtime.model import materialize
from effc.runtime.train import Hooks, TrainSpec, train

sys.path.insert(0, str(Path(__file__).parents[1] / "compiler"))
from conftest import model_info  # noqa: E402


def test_markov_validation_loss_approaches_the_entropy_rate(tmp_path):
    ds = D.load_data("markov", {"seq": 32, "seed": 5, "vocab": 8}, tmp_path)
    info = model_info("decoder(vocab=8, dim=32, layers=1, heads=2, ffn=64, seq=32)")
    ir, _ = run_passes(lower_model(info), ["apply_lora", "assign_roles"], PassContext())
    gm, _ = materialize(ir, 32, {}, seed=0)
    before = evaluate(gm, ds.validation, 32, 16, samples=256)["loss"]
    spec = TrainSpec(150, 16, 1, 1e-2, (0.9, 0.999), 0.0, "cosine", 10, 1.0, 0, None, None)
    train(gm, ir, ds, spec, tmp_path / "ck", False, Hooks())
    after = evaluate(gm, ds.validation, 32, 16, samples=256)["loss"]
    h = ds.entropy_rate
    assert before > h + 0.3  # an untrained model is far from the floor
    assert h - 0.02 < after < h + 0.05, (before, after, h)
