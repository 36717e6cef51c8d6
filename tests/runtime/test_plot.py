"""`effc plot`: reading metrics.jsonl (which line wins after a resume or a rerun, what is
an error and on which line), the global step axis against hand-computed numbers, and the
PNG files themselves (signature and pixel size from the IHDR chunk)."""

import json
import struct
import sys

import pytest

from effc.runtime.plot import DPI, FIGSIZE_IN, PlotError, global_steps, plot_run, read_metrics, stage_spans

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train(stage, step, loss=1.0, lr=1e-3, **extra):
    return {"kind": "train", "stage": stage, "model": "tiny", "step": step, "loss": loss, "lr": lr,
            "tokens_per_s": 1000.0, "elapsed_s": 0.25, **extra}


def evaluation(stage, loss, step=None, data="corpus.validation", against=None):
    rec = {"kind": "eval", "stage": stage, "model": "tiny", "data": data, "loss": loss, "perplexity": 2.0}
    if step is not None:
        rec["step"] = step
    if against is not None:
        rec["against"] = {"model": "tiny@pretrain", "loss": against, "perplexity": 3.0}
    return rec


def write(folder, lines, end="\n"):
    """metrics.jsonl from records (dicts) and raw text lines (str)."""
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + end
    (folder / "metrics.jsonl").write_text(text, encoding="utf-8")
    return folder / "metrics.jsonl"


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")  # the first chunk of every PNG
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------- read_metrics


def steps_and_losses(records):
    return [(r["stage"], r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def test_a_resumed_stage_keeps_the_later_line_for_a_repeated_step(tmp_path):
    # Killed after step 5 with a checkpoint at 3: the resume logs 4 and 5 again.
    lines = [train("pre", s, loss=10 + s) for s in range(1, 6)]
    lines += [train("pre", s, loss=20 + s) for s in range(4, 7)]
    got = read_metrics(write(tmp_path, lines))
    assert steps_and_losses(got) == [("pre", 1, 11), ("pre", 2, 12), ("pre", 3, 13),
                                     ("pre", 4, 24), ("pre", 5, 25), ("pre", 6, 26)]


def test_a_rerun_stage_drops_its_stale_later_steps_and_records_group_by_stage(tmp_path):
    # Run 1 did pre 1..3 and tune 1..2; the edited pre reran and was killed after step 2,
    # so tune's lines are still the old run's and pre's step 3 no longer happened.
    lines = [train("pre", 1, 11), train("pre", 2, 12), train("pre", 3, 13),
             train("tune", 1, 31), evaluation("tune", 3.5, step=1), train("tune", 2, 32),
             train("pre", 1, 21), train("pre", 2, 22)]
    got = read_metrics(write(tmp_path, lines))
    assert [(r["kind"], r["stage"], r.get("step"), r["loss"]) for r in got] == [
        ("train", "pre", 1, 21), ("train", "pre", 2, 22),
        ("train", "tune", 1, 31), ("eval", "tune", 1, 3.5), ("train", "tune", 2, 32)]


def test_a_repeated_eval_keeps_the_later_line(tmp_path):
    lines = [train("tune", 1), train("tune", 2),
             evaluation("tune", 2.0, step=2), evaluation("tune", 2.5, step=2),  # a resume repeats it
             evaluation("tune", 1.5, against=1.9), evaluation("tune", 1.4, data="other.validation"),
             evaluation("tune", 1.6, against=1.8)]
    got = [r for r in read_metrics(write(tmp_path, lines)) if r["kind"] == "eval"]
    assert [(r.get("step"), r["data"], r["loss"]) for r in got] == [
        (2, "corpus.validation", 2.5), (None, "other.validation", 1.4), (None, "corpus.validation", 1.6)]
    assert got[2]["against"]["loss"] == 1.8


def test_what_is_skipped_and_what_is_kept(tmp_path):
    lines = ["", train("pre", 1, extra_key=[1, 2]), "   ",
             {"kind": "event", "what": "checkpoint"},  # a kind this version does not plot
             train("pre", 2, loss=float("inf")), '{"kind": "train", "stage": "pre", "st']
    got = read_metrics(write(tmp_path, lines, end=""))  # the last line was cut off by a kill
    assert [r["step"] for r in got] == [1, 2]
    assert got[0]["extra_key"] == [1, 2] and got[1]["loss"] == float("inf")


@pytest.mark.parametrize("bad, problem", [
    ("{not json", "not a JSON line"),
    ('{"kind": "train", "stage": "pre", "st', "not a JSON line"),  # cut off, but not last
    ("[1, 2]", "expected a JSON object, found list"),
    ('{"stage": "pre", "step": 2}', "no string 'kind'"),
    (json.dumps({**train("pre", 2), "stage": ""}), "without a 'stage' name"),
    (json.dumps(train("pre", 0)), "'step' 0: expected an integer >= 1"),
    (json.dumps(train("pre", "2")), "'step' '2'"),
    (json.dumps(train("pre", True)), "'step' True"),
    (json.dumps({**train("pre", 2), "loss": None}), "train record without a numeric 'loss'"),
    (json.dumps({k: v for k, v in train("pre", 2).items() if k != "lr"}), "without a numeric 'lr'"),
    (json.dumps(evaluation("pre", "low")), "eval record without a numeric 'loss'"),
    (json.dumps(evaluation("pre", 1.0, step=-1)), "eval record with 'step' -1"),
    (json.dumps({**evaluation("pre", 1.0), "against": {"model": "x"}}), "'against' has no numeric 'loss'"),
])
def test_a_malformed_line_is_named_by_its_number(tmp_path, bad, problem):
    path = write(tmp_path, [train("pre", 1), "", bad, train("pre", 2)])
    with pytest.raises(PlotError) as e:
        read_metrics(path)
    assert e.value.message.startswith(f"{path}:3: ") and problem in e.value.message
    assert "one JSON object a line" in e.value.hint


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(json.dumps(train("pre", 1)).encode() + b"\n\xff\xfe\n")
    with pytest.raises(PlotError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(PlotError) as e:
        read_metrics(tmp_path / "metrics.jsonl")
    assert e.value.message == f"no metrics file at {tmp_path / 'metrics.jsonl'}"
    assert "run folder" in e.value.hint
    with pytest.raises(PlotError) as e:
        plot_run(tmp_path / "nowhere")
    assert "no metrics file" in e.value.message
    assert not (tmp_path / "nowhere").exists()
    for lines in ([""], ["", "  "], [{"kind": "event"}]):
        path = write(tmp_path, lines)
        with pytest.raises(PlotError) as e:
            read_metrics(path)
        assert e.value.message == f"{path} has no train or eval records" and e.value.hint


# ---------------------------------------------------------------- the global step axis


def test_global_steps_continue_across_stages():
    records = [train("pre", 1), train("pre", 2), evaluation("pre", 2.0, step=2), train("pre", 3),
               evaluation("tune", 1.9),  # an `eval` statement before the stage trains
               train("tune", 1), train("tune", 2), evaluation("tune", 1.5, against=1.7),
               evaluation("compare", 1.4)]  # a stage that only evaluates
    assert stage_spans(records) == [("pre", 0, 3), ("tune", 3, 5), ("compare", 5, 5)]
    got = global_steps(records)
    assert [x for x, _ in got] == [1, 2, 2, 3, 3, 4, 5, 5, 5]
    assert [r for _, r in got] == records


def test_a_stage_that_only_evaluates_during_training_spans_its_highest_step():
    records = [evaluation("a", 1.0, step=4), train("b", 1), train("b", 2)]
    assert stage_spans(records) == [("a", 0, 4), ("b", 4, 6)]
    assert [x for x, _ in global_steps(records)] == [4, 5, 6]


# ---------------------------------------------------------------- the pictures


def test_plot_run_writes_two_pngs_of_the_promised_size(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [train("pretrain", s, loss=4.0 / s, lr=1e-3 * s / 10) for s in range(1, 11)]
    lines += [train("pretrain", 9, loss=0.5), train("pretrain", 10, loss=float("nan"))]
    lines += [train("tune", s, loss=0.4 - s / 100, lr=5e-4) for s in range(1, 6)]
    lines += [evaluation("tune", 0.35, step=5), evaluation("tune", 0.34, against=0.41)]
    write(run, lines)
    had_pyplot = "matplotlib.pyplot" in sys.modules
    paths = plot_run(run)
    assert paths == [run / "loss.png", run / "lr.png"]
    want = (round(FIGSIZE_IN[0] * DPI), round(FIGSIZE_IN[1] * DPI))
    assert want == (800, 450)
    for p in paths:
        assert png_size(p) == want
    assert sorted(p.name for p in run.iterdir()) == ["loss.png", "lr.png", "metrics.jsonl"]
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules, "plotting must not need pyplot"


def test_plot_run_into_a_new_folder_and_without_training(tmp_path):
    write(tmp_path, [evaluation("check", 2.0, against=2.5)])
    out = tmp_path / "plots" / "deep"
    paths = plot_run(tmp_path, out)
    assert paths == [out / "loss.png", out / "lr.png"]
    assert all(png_size(p) == (800, 450) for p in paths)
    assert not (tmp_path / "loss.png").exists()
