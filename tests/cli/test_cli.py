"""The effc command: exit codes, streams, formats. Most tests call the Typer app in
process; a few run the installed console script to prove no traceback reaches a user."""

import json
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from effc.cli import app

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "examples" / "quickstart.eff")
runner = CliRunner()

GOOD = """pipeline p
model m = decoder(vocab=64, dim=32, layers=2, heads=4, ffn=64, seq=16)
data d = markov(seq=16)
stage s:
    train m on d (steps=1)
"""
BAD = GOOD.replace("steps=1", "steps=1, stepz=2") + "stage t:\n    adapt m.layers[*].attn.{q_prj} with lora(rank=4)\n"


def write(tmp_path, text, name="{path}:5:28:"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_check_ok_exits_0():
    r = runner.invoke(app, ["check", QUICKSTART])
    assert r.exit_code == 0, r.output
    assert "ok" in r.stderr


def test_check_errors_exit_1_with_every_diagnostic(tmp_path):
    path = write(tmp_path, BAD)
    r = runner.invoke(app, ["check", path])
    assert r.exit_code == 1
    assert f"{path}:5:28: error[E0310]: 'train' has no option 'stepz'" in r.stderr
    assert f"{path}:7:29: error[E0203]: selector matches nothing: 'q_prj'" in r.stderr
    assert "2 errors" in r.stderr
    assert "\x1b[" not in r.stderr  # no colour when not writing to a terminal


def test_check_json(tmp_path):
    r = runner.invoke(app, ["check", write(tmp_path, BAD), "--format", "json"])
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert [(d["code"], d["line"], d["col"]) for d in data] == [("E0310", 5, 28), ("E0203", 7, 29)]
    assert data[1]["end_col"] == 34 and "did you mean 'q'?" in data[1]["hint"]


def test_check_json_clean_is_empty_list():
    r = runner.invoke(app, ["check", QUICKSTART, "--format", "json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == []


def test_set_overrides_a_param():
    assert runner.invoke(app, ["check", QUICKSTART, "--set", "rank=16"]).exit_code == 0
    r = runner.invoke(app, ["check", QUICKSTART, "--set", "rank=0"])
    assert r.exit_code == 1 and "E0306" in r.stderr
    r = runner.invoke(app, ["check", QUICKSTART, "--set", "rnk=3"])
    assert r.exit_code == 1 and "E0111" in r.stderr and "did you mean 'rank'?" in r.stderr
    r = runner.invoke(app, ["check", QUICKSTART, "--set", "rank"])
    assert r.exit_code == 1 and "expected name=value" in r.stderr


def test_missing_file_is_a_diagnostic(tmp_path):
    r = runner.invoke(app, ["check", str(tmp_path / "nope.eff")])
    assert r.exit_code == 1 and "E0010" in r.stderr and "No such file" in r.stderr


def test_explain():
    r = runner.invoke(app, ["explain", "e0203"])
    assert r.exit_code == 0 and r.stdout.startswith("E0203: selector matches nothing")
    r = runner.invoke(app, ["explain", "E0204x"])
    assert r.exit_code == 2 and "no diagnostic code" in r.stderr


def test_fmt_modes(tmp_path):
    messy = "pipeline   p\nmodel m = decoder(vocab=64,dim=32,layers=2,heads=4,ffn=64,seq=16)   # c\n"
    path = write(tmp_path, messy)
    r = runner.invoke(app, ["fmt", path])
    assert r.exit_code == 0
    expected = "pipeline p\nmodel m = decoder(vocab=64, dim=32, layers=2, heads=4, ffn=64, seq=16)  # c\n"
    assert r.stdout == expected
    r = runner.invoke(app, ["fmt", path, "--check"])
    assert r.exit_code == 1 and "would reformat" in r.stderr
    r = runner.invoke(app, ["fmt", path, "--diff"])
    assert r.exit_code == 0 and "-pipeline   p\n" in r.stdout and "+pipeline p\n" in r.stdout
    assert Path(path).read_text() == messy  # --diff and plain fmt never write
    assert runner.invoke(app, ["fmt", path, "--write"]).exit_code == 0
    assert Path(path).read_text() == expected
    assert runner.invoke(app, ["fmt", path, "--check"]).exit_code == 0
    assert list(tmp_path.iterdir()) == [Path(path)]  # no temporary file left behind


def test_fmt_refuses_a_file_with_syntax_errors(tmp_path):
    path = write(tmp_path, "stage s\n    train m on d\n")
    r = runner.invoke(app, ["fmt", path, "--write"])
    assert r.exit_code == 1 and "E0001" in r.stderr
    assert Path(path).read_text() == "stage s\n    train m on d\n"


def _effc(*args, cwd=None):
    exe = Path(sys.executable).with_name("effc")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "effc"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=cwd, timeout=120)


def test_console_script_never_shows_a_traceback(tmp_path):
    (tmp_path / "bin.eff").write_bytes(b"\xff\xfe\x00garbage")
    for args in (["check", str(tmp_path / "bin.eff")], ["check", str(tmp_path)], ["fmt", str(tmp_path)],
                 ["check"], ["nonsense"], ["check", QUICKSTART, "--format", "xml"]):
        r = _effc(*args)
        assert r.returncode in (1, 2), (args, r.returncode)
        assert "Traceback" not in r.stderr + r.stdout, args


def test_version():
    r = _effc("--version")
    assert r.returncode == 0 and r.stdout.startswith("effc ")


def test_colour_only_when_asked_for_a_terminal(tmp_path):
    from effc.lang.check import check_file
    from effc.lang.diagnostics import render_all

    path = write(tmp_path, BAD)
    result = check_file(path)
    plain = render_all(result.diagnostics, {path: result.source})
    coloured = render_all(result.diagnostics, {path: result.source}, colour=True)
    assert "\x1b[" not in plain and "\x1b[1;31merror[E0310]" in coloured
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured) == plain  # colour adds nothing but escapes


def test_check_costs_the_file_against_its_budget(tmp_path):
    path = write(tmp_path, GOOD.replace("stage s:", "budget(memory=1KiB)\nstage s:"))
    r = runner.invoke(app, ["check", path])
    assert r.exit_code == 1
    assert f"{path}:4:1: error[E0404]: 'train m' (stage s, line 6) needs at least" in r.stderr
    path = write(tmp_path, GOOD.replace("stage s:", "budget(memory=1GiB)\nstage s:"), "fits.eff")
    assert runner.invoke(app, ["check", path]).exit_code == 0


def test_memory_on_the_command_line_replaces_the_files_budget(tmp_path):
    """--memory: the budget for this command (the file's, or none, is set aside), an
    overrun reported at the command line; a value that is not a size is E0113."""
    path = write(tmp_path, GOOD.replace("stage s:", "budget(memory=1GiB)\nstage s:"))
    r = runner.invoke(app, ["check", path, "--memory", "1KiB"])
    assert r.exit_code == 1
    assert "<command line>:1:1: error[E0404]: 'train m' (stage s, line 6) needs at least" in r.stderr and "(--memory)" in r.stderr
    plain = write(tmp_path, GOOD, "plain.eff")  # no budget in the file at all
    assert runner.invoke(app, ["check", plain]).exit_code == 0
    r = runner.invoke(app, ["build", plain, "-o", str(tmp_path / "b"), "--memory", "2KB"])
    assert r.exit_code == 1 and "error[E0404]" in r.stderr and not (tmp_path / "b").exists()
    tight = write(tmp_path, GOOD.replace("stage s:", "budget(memory=1KiB)\nstage s:"), "tight.eff")
    assert runner.invoke(app, ["check", tight, "--memory", "1.5GiB"]).exit_code == 0
    r = runner.invoke(app, ["check", plain, "--memory", "lots"])
    assert r.exit_code == 1
    assert "<command line>:1:1: error[E0113]: --memory lots: not a size" in r.stderr and "8GiB" in r.stderr


def test_build_writes_the_ir_and_cost_that_show_prints(tmp_path):
    from effc.compiler.ir import IR

    out = tmp_path / "build"
    r = runner.invoke(app, ["build", QUICKSTART, "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert "built 2 train step(s)" in r.stderr
    steps = json.loads((out / "build.json").read_text())["steps"]
    assert [(s["stage"], s["model"], s["micro_batch"]) for s in steps] == [("pretrain", "tiny", 16), ("tune", "tiny", 16)]
    # the tune step trains LoRA r=8 on q and v of 4 layers (192 -> 192): 4 * 2 * 8 * 384
    assert steps[1]["cost"]["params_trainable"] == 24576 and steps[1]["passes"]["apply_lora"] > 0
    ir = IR.from_json((out / "ir" / "01_tune_tiny.json").read_text())
    assert ir.node("layers[3].attn.v.lora0").params[1].shape == (192, 8)
    shown = runner.invoke(app, ["show", str(out), "--ir", "--cost"])
    assert shown.exit_code == 0
    assert "# 01_tune_tiny" in shown.stdout and "layers[0].attn.q.lora0 = lora(" in shown.stdout
    assert "params trainable" in shown.stdout and "24,576" in shown.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]  # no temporary folder left
    default = runner.invoke(app, ["show", str(out)])
    # the report: pretrain calls linear 4 layers x 7 times, the head and the loss being one
    # fused kernel; tune's 8 LoRA linears are fused kernels too; params 1,869,504 + 24,576
    lines = default.stdout.splitlines()
    assert lines[0] == "# stage pretrain: train tiny (line 16, micro-batch 16)"
    assert "linear x28, linear_cross_entropy x1" in lines[2]
    assert "linear x20, linear_cross_entropy x1, lora_linear x8" in default.stdout and "mul x" not in default.stdout
    assert "24,576 trainable of 1,894,080" in default.stdout and "params total" in default.stdout


def test_build_refuses_a_file_with_errors_and_writes_nothing(tmp_path):
    out = tmp_path / "build"
    r = runner.invoke(app, ["build", write(tmp_path, BAD), "-o", str(out)])
    assert r.exit_code == 1 and "E0310" in r.stderr
    assert not out.exists()


def test_show_needs_a_build_folder(tmp_path):
    r = runner.invoke(app, ["show", str(tmp_path)])
    assert r.exit_code == 2 and "is not a build folder" in r.stderr


def test_fmt_needs_only_a_parse_and_sees_a_missing_final_newline(tmp_path):
    # an undefined data name is a check error, not a formatting one
    path = write(tmp_path, "stage s:\n    train m on nowhere (steps=1)")
    r = runner.invoke(app, ["fmt", path, "--check"])
    assert r.exit_code == 1 and "would reformat" in r.stderr
    assert runner.invoke(app, ["fmt", path, "--write"]).exit_code == 0
    assert Path(path).read_text() == "stage s:\n    train m on nowhere (steps=1)\n"
    assert runner.invoke(app, ["fmt", path, "--check"]).exit_code == 0


def test_build_into_an_unwritable_place_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = runner.invoke(app, ["build", QUICKSTART, "-o", str(blocker / "build")])
    assert r.exit_code == 2 and "cannot write the build folder" in r.stderr
    assert blocker.read_text() == "not a folder"


def test_build_of_a_70b_declaration_allocates_no_weight(tmp_path):
    """effc build writes the fx graph of a Llama-3-70B-shaped step from the meta device:
    the whole process's peak RSS stays far below the 280 GB its fp32 weights would take."""
    src = tmp_path / "big.eff"
    src.write_text("pipeline big\n"
                   "model m = decoder(vocab=128256, dim=8192, layers=80, heads=64, kv_heads=8, ffn=28672, seq=8192)\n"
                   "data d = markov(seq=8192)\nstage s:\n    adapt m.layers[*].attn.{q,v} with lora(rank=16)\n"
                   "    train m on d (steps=1, batch=1)\n")
    # Run the CLI in a child that reports its own peak resident set (VmHWM) at exit.
    child = ("import sys\nfrom effc.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    code = e.code\nprint([ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0])\n"
             "sys.exit(code)\n")
    r = subprocess.run([sys.executable, "-c", child, "build", str(src), "-o", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    hwm_kib = int(r.stdout.split()[1])
    assert hwm_kib < 2 * 2**20  # under 2 GiB
    code = (tmp_path / "b" / "fx" / "00_s_m.py").read_text()
    assert code.count("effc_kernels_attention_attention(") == 80
    assert "layers, \"79\").attn.v.lora0.B" in code
