"""effc run end to end on a tiny pipeline: exact resume after SIGKILL (mid-step and
mid-save) and SIGTERM, the stage cache, exports, errors, plots, and the train loop's
arithmetic (schedules, accumulation) against formulas."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from effc.runtime.train import TrainSpec, lr_at, micro_sizes

PIPELINE = """pipeline tiny_run

model m = decoder(vocab=16, dim=32, layers=2, heads=2, ffn=64, seq=16)
data d = markov(seq=16, vocab=16, seed=3)

stage pre:
    train m on d (steps={pre_steps}, batch=4, checkpoint_every=2, optimizer=adamw(lr=1e-2))

stage tune:
    adapt m.layers[*].attn.{{q,v}} with lora(rank=2, dropout=0.1)
    train m on d (steps=8, batch=4, accumulate=2, clip=1.0, checkpoint_every=2)
    eval m on d.validation (metrics=[loss, perplexity, similarity], against=m@pre, samples=16)

export m to "out" (merge_adapters=true)
"""


def write(folder: Path, pre_steps: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / "p.eff"
    f.write_text(PIPELINE.format(pre_steps=pre_steps))
    return f


def effc(*args, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effc", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=240, **kw)


def start(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "effc", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def curve(run: Path) -> dict:
    """(stage, step) -> loss, the later line winning (a resumed run repeats the steps
    it had logged after its last checkpoint)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[(r["stage"], r["step"])] = r["loss"]
    return out


def evals(run: Path) -> list:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(ln)["kind"] == "eval"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run at one thread: the curve every interrupted run must repeat."""
    d = tmp_path_factory.mktemp("reference")
    r = effc("run", write(d), "-o", "run", "--threads", "1", cwd=d)
    assert r.returncode == 0, r.stderr
    return d


def test_uninterrupted_run_trains_evaluates_and_exports(reference):
    c = curve(reference / "run")
    assert sorted(c) == [("pre", s) for s in range(1, 13)] + [("tune", s) for s in range(1, 9)]
    # small initial weights predict nearly uniformly: the first loss is about ln(vocab)
    assert c[("pre", 1)] == pytest.approx(math.log(16), abs=0.05)
    assert c[("pre", 12)] < c[("pre", 1)] - 0.15  # a real decrease, not noise
    (ev,) = evals(reference / "run")
    assert ev["model"] == "m" and ev["against"]["model"] == "m@pre" and ev["sequences"] == 16
    assert ev["perplexity"] == pytest.approx(math.exp(ev["loss"]))
    assert 0.0 < ev["similarity"] <= 1.0 + 1e-6
    meta = json.loads((reference / "out" / "effc.json").read_text())
    assert meta["merged"] and len(meta["merged_adapters"]) == 4  # 2 layers x {q, v}
    # finished stages keep their snapshots, not their checkpoints
    assert (reference / "run/stages/00_pre/models/m.safetensors").is_file()
    assert not list((reference / "run/stages").glob("*/train_*"))


def test_merged_export_equals_the_adapted_model(reference):
    """The export's weights are W + (alpha/r) B A, computed here from the tune snapshot."""
    from safetensors.torch import load_file

    snap = load_file(reference / "run/stages/01_tune/models/m.safetensors")
    out = load_file(reference / "out/model.safetensors")
    assert not any(k.endswith((".A", ".B")) for k in out)
    for layer in range(2):
        for t in ("q", "v"):
            p = f"layers[{layer}].attn.{t}"
            want = snap[f"{p}.weight"] + (2 / 2) * snap[f"{p}.lora0.B"] @ snap[f"{p}.lora0.A"]
            torch.testing.assert_close(out[f"{p}.weight"], want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["layers[0].mlp.up.weight"], snap["layers[0].mlp.up.weight"], rtol=0, atol=0)


def _kill_when(proc: subprocess.Popen, run: Path, lines: int, delay: float) -> None:
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= lines:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.005)
    pytest.fail(f"the run ended before it could be killed: {proc.communicate()[1]}")


def test_resume_after_sigkill_is_bitwise_identical(reference, tmp_path):
    """Kills land at several instants (mid-step, and mid-save: a checkpoint is written
    every 2 steps); after each, --resume continues; the final curve equals the reference
    bit for bit."""
    f = write(tmp_path)
    for lines, delay in ((3, 0.0), (7, 0.01), (15, 0.002)):
        p = start("run", f, "-o", "run", "--threads", "1", "--resume", cwd=tmp_path)
        _kill_when(p, tmp_path / "run", lines, delay)
        assert p.returncode == -signal.SIGKILL
    r = effc("run", f, "-o", "run", "--threads", "1", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert curve(tmp_path / "run") == curve(reference / "run")
    assert evals(tmp_path / "run")[-1]["loss"] == evals(reference / "run")[0]["loss"]


def test_sigterm_writes_a_checkpoint_and_resume_finishes_identically(reference, tmp_path):
    f = write(tmp_path)
    p = start("run", f, "-o", "run", "--threads", "1", cwd=tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 5):
        assert p.poll() is None, p.communicate()[1]
        time.sleep(0.005)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "checkpoint written" in err and "--resume" in err and "Traceback" not in err
    assert (tmp_path / "run/stages/00_pre/train_0/latest").is_file()
    r = effc("run", f, "-o", "run", "--threads", "1", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming after step" in r.stderr
    assert curve(tmp_path / "run") == curve(reference / "run")


def test_unchanged_stages_are_reused_and_exports_need_force(reference, tmp_path):
    f = write(tmp_path)
    assert effc("run", f, "-o", "run", cwd=tmp_path).returncode == 0
    again = effc("run", f, "-o", "run", cwd=tmp_path)
    assert again.returncode == 1
    assert "error[E0502]" in again.stderr and "--force" in again.stderr and "p.eff:14:1:" in again.stderr
    before = (tmp_path / "run/metrics.jsonl").read_text().count("\n")
    forced = effc("run", f, "-o", "run", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "stage pre: cached" in forced.stderr and "stage tune: cached" in forced.stderr
    # a cached stage logs nothing new
    assert (tmp_path / "run/metrics.jsonl").read_text().count("\n") == before
    # editing the later stage reruns it alone
    f.write_text(f.read_text().replace("samples=16", "samples=8"))
    edited = effc("run", f, "-o", "run", "--force", cwd=tmp_path)
    assert edited.returncode == 0, edited.stderr
    assert "stage pre: cached" in edited.stderr and "stage tune: cached" not in edited.stderr
    assert evals(tmp_path / "run")[-1]["sequences"] == 8


def test_changing_an_earlier_stage_reruns_it_and_everything_after(tmp_path):
    f = write(tmp_path, pre_steps=2)
    assert effc("run", f, "-o", "run", cwd=tmp_path).returncode == 0
    f.write_text(PIPELINE.format(pre_steps=3))
    r = effc("run", f, "-o", "run", "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "cached" not in r.stderr
    assert max(s for st, s in curve(tmp_path / "run") if st == "pre") == 3


def test_bad_data_is_a_diagnostic_at_the_data_line(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "p.eff").write_text(
        "pipeline e\nmodel m = decoder(vocab=256, dim=16, layers=1, heads=2, ffn=16, seq=8)\n"
        'data t = text("empty.txt", seq=8)\nstage s:\n    train m on t (steps=1)\n')
    r = effc("run", "p.eff", "-o", "run", cwd=tmp_path)
    assert r.returncode == 1
    assert "p.eff:3:" in r.stderr and "error[E0501]" in r.stderr and "Traceback" not in r.stderr


def test_plot_and_show(reference, tmp_path):
    r = effc("plot", "run", "-o", tmp_path, cwd=reference)
    assert r.returncode == 0, r.stderr
    for name in ("loss.png", "lr.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = effc("plot", "nowhere", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    b = effc("build", reference / "p.eff", "-o", tmp_path / "build", cwd=tmp_path)
    assert b.returncode == 0, b.stderr
    fx = effc("show", tmp_path / "build", "--fx", cwd=tmp_path)
    assert fx.returncode == 0 and "rms_norm" in fx.stdout and "def forward(self, tokens, targets, segments = None, positions = None)" in fx.stdout
    dot = effc("show", tmp_path / "build", "--format", "dot", cwd=tmp_path)
    assert dot.returncode == 0, dot.stderr
    paths = dot.stdout.split()
    assert len(paths) == 2 and all(Path(p).read_text().startswith("digraph") for p in paths)


# ---------------------------------------------------------------- the loop's arithmetic


def _spec(schedule: str, warmup: int, steps: int = 10, lr: float = 1.0) -> TrainSpec:
    return TrainSpec(steps, 4, 1, lr, (0.9, 0.999), 0.0, schedule, warmup, None, 0, None, None)


def test_schedules_follow_their_formulas():
    assert [lr_at(s, _spec("constant", 2)) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    lin = _spec("linear", 2)
    assert [lr_at(s, lin) for s in (0, 1, 2, 6, 9)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 1 - 7 / 8])
    cos = _spec("cosine", 0)
    for s in range(10):
        assert lr_at(s, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * s / 10)))


def test_micro_batches_split_the_batch_evenly():
    assert micro_sizes(8, 1) == [8]
    assert micro_sizes(8, 3) == [3, 3, 2]
    assert micro_sizes(2, 4) == [1, 1]


def test_accumulation_gives_the_gradient_of_the_whole_batch(tmp_path):
    """One step of batch 6 in 1, 2 or 4 micro-batches (4 has unequal sizes) moves the
    weights to the same place: the gradient is that of the mean loss over the batch."""
    import sys as _sys
    _sys.path.insert(0, str(Path(__file__).parents[1] / "compiler"))
    from conftest import model_info

    from effc.compiler.lower import lower_model
    from effc.compiler.passes import PassContext, run_passes
    from effc.runtime import data as D
    from effc.runtime.model import materialize, state_of
    from effc.runtime.train import Hooks, train

    info = model_info("decoder(vocab=8, dim=16, layers=1, heads=2, ffn=16, seq=8)")
    ir, _ = run_passes(lower_model(info), ["apply_lora", "assign_roles"], PassContext())
    ds = D.load_data("markov", {"seq": 8, "seed": 0, "vocab": 8}, tmp_path)
    states = []
    for acc in (1, 2, 4):
        gm, _ = materialize(ir, 8, {}, seed=0)
        spec = TrainSpec(1, 6, acc, 1e-2, (0.9, 0.999), 0.0, "constant", 0, None, 0, None, None)
        train(gm, ir, ds, spec, tmp_path / f"ck{acc}", False, Hooks())
        states.append(state_of(gm, ir))
    for other in states[1:]:
        for k in states[0]:
            torch.testing.assert_close(other[k], states[0][k], rtol=1e-5, atol=1e-6)


def test_an_unwritable_export_is_a_diagnostic_at_the_export_line(tmp_path):
    f = write(tmp_path, pre_steps=1)
    (tmp_path / "blocker").write_text("a file where the export's parent folder should be")
    f.write_text(f.read_text().replace('export m to "out"', 'export m to "blocker/out"'))
    r = effc("run", f, "-o", "run", cwd=tmp_path)
    assert r.returncode == 1
    assert "p.eff:14:1: error[E0503]: cannot write the export folder 'blocker/out'" in r.stderr
    assert "Traceback" not in r.stderr


def test_merging_lora_into_a_tied_head_unties_it(tmp_path):
    from safetensors.torch import load_file

    (tmp_path / "p.eff").write_text(
        "pipeline t\nmodel m = decoder(vocab=16, dim=16, layers=1, heads=2, ffn=16, seq=8, tied=true)\n"
        "data d = markov(seq=8, vocab=16)\nstage s:\n    adapt m.head with lora(rank=2)\n"
        "    train m on d (steps=2, batch=2, optimizer=adamw(lr=0.1))\n"
        'export m to "out" (merge_adapters=true)\n')
    r = effc("run", "p.eff", "-o", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "out/effc.json").read_text())
    assert meta["config"]["tied"] is False
    out = load_file(tmp_path / "out/model.safetensors")
    snap = load_file(tmp_path / "run/stages/00_s/models/m.safetensors")
    assert "head.weight" not in snap  # tied: stored once, as the embedding
    want = snap["embed.weight"] + (2 / 2) * snap["head.lora0.B"] @ snap["head.lora0.A"]
    torch.testing.assert_close(out["head.weight"], want, rtol=1e-6, atol=1e-7)
    assert not torch.equal(out["head.weight"], out["embed.weight"])


def test_a_damaged_stage_record_reruns_the_stage(tmp_path):
    f = write(tmp_path, pre_steps=1)
    assert effc("run", f, "-o", "run", cwd=tmp_path).returncode == 0
    (tmp_path / "run/stages/00_pre/done.json").write_text("{not json")
    r = effc("run", f, "-o", "run", "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # pre reruns; its key (and so tune's) is unchanged, so tune's record still stands
    assert "stage pre: cached" not in r.stderr and "stage tune: cached" in r.stderr
    assert json.loads((tmp_path / "run/stages/00_pre/done.json").read_text())["key"]
