"""Every file under examples/ checks cleanly (no errors, no warnings) and is formatted.

Examples that start from a Hugging Face checkpoint name the folder that their header's
`effc init-checkpoint` command creates under examples/checkpoints/ (ignored by git);
tests/conftest.py runs the same command when the folder is missing, as a user would."""

from pathlib import Path

import pytest

from effc.lang.check import check_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.eff"))


def test_there_are_examples():
    assert any(p.name == "quickstart.eff" for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_checks_clean(path):
    result = check_file(str(path))
    assert result.ok
    assert result.diagnostics == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_formatted(path):
    from effc.lang.format import format_source

    text = path.read_text(encoding="utf-8")
    formatted, diags = format_source(text, str(path))
    assert diags == ()
    assert formatted == text


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_builds(path, tmp_path):
    """Every train step lowers, passes verify after each pass, costs within the file's
    budget, and its fx graph is written."""
    import json

    from effc.compiler.build import write_build
    from effc.compiler.pipeline import PASSES, compile_checked
    from effc.compiler.passes import PassContext, run_passes
    from effc.compiler.lower import lower_model

    result = check_file(str(path))
    compiled = compile_checked(result)
    assert compiled.diagnostics == ()
    for b in compiled.builds:
        info = result.models[b.step.model.name]
        before = lambda u: (u.span.line, u.span.col) < (b.step.span.line, b.step.span.col)  # noqa: E731
        adapters = tuple(u for u in info.adapters if before(u))
        edits = tuple(e for e in info.edits if before(e))
        ir, _ = run_passes(lower_model(info), PASSES, PassContext(adapters, edits), verify_each=True)
        assert ir == b.ir
    write_build(compiled, tmp_path / "build")
    steps = json.loads((tmp_path / "build" / "build.json").read_text())["steps"]
    assert len(steps) == len(compiled.builds) > 0
    assert len(list((tmp_path / "build" / "fx").glob("*.py"))) == len(steps)


def test_quickstart_runs_as_the_readme_says(tmp_path):
    """The README's first command, end to end (about a minute on a 2-core CPU): both
    stages train with the loss falling, the LoRA model beats the pretrained snapshot on
    the text it was tuned on, and the merged export is written next to the example."""
    import json
    import shutil
    import subprocess
    import sys

    work = tmp_path / "examples"
    work.mkdir()
    shutil.copy2(ROOT / "examples" / "quickstart.eff", work)
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    r = subprocess.run([sys.executable, "-m", "effc", "run", str(work / "quickstart.eff"), "-o", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for stage in ("pretrain", "tune"):
        losses = [x["loss"] for x in records if x["kind"] == "train" and x["stage"] == stage]
        assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.2
    tuned = [x for x in records if x["kind"] == "eval" and x["stage"] == "tune"][-1]
    assert tuned["loss"] < tuned["against"]["loss"]
    assert (work / "out" / "quickstart" / "model.safetensors").is_file()
