"""The checker's results on valid programs (what the compiler will read), and rules whose
behaviour is more than one diagnostic: snapshots, overrides, adapter scope, tree walks.
The corpus of bad programs with golden diagnostics is tests/lang/test_bad_programs.py."""

from effc.lang.check import Ref, check_source
from effc.lang.tree import ModelCatalog, Module, decoder_tree

HEAD = """pipeline t
param rank = 8
model tiny = decoder(vocab=512, dim=256, layers=3, heads=4, kv_heads=2, ffn=704, seq=128)
data corpus = markov(seq=64)
"""


def codes(result):
    """(code, line, col) of the errors; warnings such as an unused param are left out."""
    return [(d.code, d.span.line, d.span.col) for d in result.diagnostics if d.severity.value == "error"]


def run(body: str, **kw):
    return check_source(HEAD + body, **kw)


def test_resolved_model_arguments_and_defaults():
    r = run("stage s:\n    train tiny on corpus (steps=1)\n")
    assert r.ok, codes(r)
    args = r.models["tiny"].args
    assert args["kv_heads"] == 2
    no_gqa = check_source(HEAD.replace(", kv_heads=2", ""))
    assert no_gqa.models["tiny"].args["kv_heads"] == 4  # defaults to heads and args["tied"] is False and args["rope_theta"] == 10000.0
    assert r.data["corpus"].source == "markov" and r.data["corpus"].args == {"seq": 64, "seed": 0, "vocab": 64}


def test_decoder_tree_shapes_follow_the_arguments():
    tree = decoder_tree({"vocab": 512, "dim": 256, "layers": 3, "heads": 4, "kv_heads": 2, "ffn": 704})
    block = tree.child("layers").items[0]
    assert len(tree.child("layers").items) == 3
    assert block.child("attn").child("k").shape == (256, 128)  # kv_heads * dim/heads
    assert block.child("attn").child("q").shape == (256, 256)
    assert block.child("mlp").child("down").shape == (704, 256)
    assert tree.child("head").shape == (256, 512)


def test_adapter_targets_expand_containers_to_linear_layers():
    r = run("stage s:\n    adapt tiny.layers[-1].attn with lora(rank=rank)\n    train tiny on corpus (steps=1)\n")
    assert r.ok, codes(r)
    (use,) = r.models["tiny"].adapters
    assert use.paths == {f"layers[2].attn.{n}" for n in "qkvo"}
    assert use.args == {"rank": 8, "alpha": 8.0, "dropout": 0.0, "init": "kaiming", "rslora": False, "sparse_delta": False, "per_loop": False}


def test_any_depth_and_kind_filter_select_every_linear():
    r = run("stage s:\n    adapt tiny.**:linear with lora(rank=4)\n    train tiny on corpus (steps=1)\n")
    assert r.ok, codes(r)
    (use,) = r.models["tiny"].adapters
    assert len(use.paths) == 3 * 7 + 1  # 7 linears a block, plus the head


def test_slices_follow_python_bounds():
    r = run("stage s:\n    adapt tiny.layers[1:].mlp.{up,down} with lora(rank=4)\n"
            "    adapt tiny.layers[:1].attn.q with lora(rank=4)\n    train tiny on corpus (steps=1)\n")
    assert r.ok, codes(r)
    a, b = r.models["tiny"].adapters
    assert a.paths == {"layers[1].mlp.up", "layers[1].mlp.down", "layers[2].mlp.up", "layers[2].mlp.down"}
    assert b.paths == {"layers[0].attn.q"}


def test_adapters_persist_across_stages():
    r = run("stage a:\n    adapt tiny.layers[0].attn.q with lora(rank=4)\n    train tiny on corpus (steps=1)\n"
            "stage b:\n    adapt tiny.layers[*].attn.q with lora(rank=4)\n    train tiny on corpus (steps=1)\n")
    assert codes(r) == [("E0207", 9, 11)]


def test_param_arithmetic_and_override():
    r = run("stage s:\n    adapt tiny.layers[0].attn.q with lora(rank=rank, alpha=2*rank + 1)\n"
            "    train tiny on corpus (steps=rank*10/4)\n")
    assert r.ok, codes(r)
    assert r.params == {"rank": 8}
    r2 = run("stage s:\n    train tiny on corpus (steps=rank)\n", overrides={"rank": "16"})
    assert r2.params == {"rank": 16}
    bad = run("stage s:\n    train tiny on corpus (steps=rank)\n", overrides={"rank": "0"})
    assert [c for c, *_ in codes(bad)] == ["E0306"]  # reported where the param is used


def test_non_integral_division_is_a_float_and_refused_as_steps():
    r = run("stage s:\n    train tiny on corpus (steps=rank/3)\n")
    assert [c for c, *_ in codes(r)] == ["E0305"]


def test_snapshots_resolve_to_finished_stages_only():
    ok = run("stage a:\n    train tiny on corpus (steps=1)\n"
             "stage b:\n    eval tiny on corpus.validation (against=tiny@a)\n")
    assert ok.ok, codes(ok)
    later = run("stage a:\n    eval tiny on corpus (against=tiny@b)\nstage b:\n    train tiny on corpus (steps=1)\n")
    assert [c for c, *_ in codes(later)] == ["E0106"]
    itself = run("stage a:\n    eval tiny on corpus (against=tiny@a)\n")
    assert [c for c, *_ in codes(itself)] == ["E0106"]


def test_model_declared_after_stage_is_not_in_its_snapshot():
    r = check_source("model a = decoder(vocab=8, dim=8, layers=1, heads=2, ffn=8, seq=8)\n"
                     "data d = markov(seq=8, vocab=8)\nstage s:\n    train a on d (steps=1)\n"
                     "model b = decoder(vocab=8, dim=8, layers=1, heads=2, ffn=8, seq=8)\n"
                     "export b@s to \"out\"\n")
    assert [c for c, *_ in codes(r)] == ["E0109"]


def test_value_types_reach_the_result():
    r = run("budget(memory=1.5GiB)\nstage s:\n    train tiny on corpus (steps=1, schedule=constant)\n"
            "    eval tiny on corpus (against=tiny, metrics=[similarity])\n")
    assert r.ok, codes(r)
    assert r.budget["memory"].n == int(1.5 * 2**30)


def test_attr_and_snapshot_values_are_references():
    r = run("stage a:\n    train tiny on corpus (steps=1)\nstage b:\n    eval tiny on corpus.validation (against=tiny@a)\n")
    assert r.ok
    assert Ref("model", "tiny", stage="a") == Ref("model", "tiny", stage="a")


def test_catalog_interface_supplies_trees():
    """The checker takes model trees through ModelCatalog, not by importing the compiler."""
    one = Module("model", (("only", Module("linear", shape=(4, 4))),))
    cat = ModelCatalog({"decoder": lambda args: one})
    r = run("stage s:\n    adapt tiny.only with lora(rank=2)\n    train tiny on corpus (steps=1)\n", catalog=cat)
    assert r.ok, codes(r)
    r2 = run("stage s:\n    adapt tiny.layers[0].attn.q with lora(rank=2)\n    train tiny on corpus (steps=1)\n",
             catalog=cat)
    assert [c for c, *_ in codes(r2)] == ["E0203"]


def test_all_diagnostics_are_collected_and_sorted():
    r = run("stage s:\n    train tiny on corpus (steps=0, batch=0)\n    train tiny on nope (steps=1)\n")
    assert codes(r) == [("E0306", 6, 33), ("E0306", 6, 42), ("E0101", 7, 19)]


def test_stages_record_checked_steps_with_defaults():
    """What the runtime reads: each stage's train/eval/export with every option resolved."""
    r = run("stage a:\n    train tiny on corpus (steps=10, optimizer=adamw(lr=3e-3), schedule=cosine(warmup=2))\n"
            "stage b:\n    adapt tiny.layers[0].attn.q with lora(rank=2)\n"
            "    eval tiny on corpus.validation (against=tiny@a)\n"
            "export tiny@a to \"out/a\" (format=effc)\n")
    assert r.ok, codes(r)
    a, b = r.stages
    assert (a.name, [s.kind for s in a.steps], b.name, [s.kind for s in b.steps]) == ("a", ["train"], "b", ["eval"])
    defaults = check_source(HEAD + "stage s:\n    train tiny on corpus (steps=1)\n").stages[0].steps[0].options
    assert (defaults["optimizer"].name, defaults["optimizer"].args["lr"], defaults["schedule"].name) == (
        "adamw", 1e-3, "constant")
    train = a.steps[0]
    assert train.model == Ref("model", "tiny") and train.data == Ref("data", "corpus")
    assert train.options["steps"] == 10 and train.options["batch"] == 8 and train.options["accumulate"] == 1
    assert train.options["optimizer"].name == "adamw"
    assert train.options["optimizer"].args == {"lr": 3e-3, "betas": [0.9, 0.999], "weight_decay": 0.0}
    assert train.options["schedule"].name == "cosine" and train.options["schedule"].args == {"warmup": 2}
    ev = b.steps[0]
    assert ev.data == Ref("data", "corpus", split="validation")
    assert ev.options["against"] == Ref("model", "tiny", stage="a") and ev.options["metrics"] == ["loss"]
    (export,) = r.exports
    assert (export.model, export.path, export.options) == (
        Ref("model", "tiny", stage="a"), "out/a", {"format": "effc", "merge_adapters": False})


def test_a_statement_with_errors_is_not_recorded():
    r = run("stage a:\n    train tiny on corpus (steps=0)\n    train tiny on corpus (steps=1)\n")
    assert [c for c, *_ in codes(r)] == ["E0306"]
    assert [s.options["steps"] for s in r.stages[0].steps] == [1]
