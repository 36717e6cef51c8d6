"""effc installs as a package: non-editable (used from outside the checkout) and editable.

Each install goes into a fresh virtual environment that sees this environment's
dependencies (--system-site-packages) and builds effc without network access."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "__init__.py", "__main__.py", "cli.py",
           "lang", "compiler", "runtime", "kernels"]


def _venv(where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(where)], check=True)
    return where / "bin"


def _pip_install(bin_dir: Path, *args: str) -> None:
    r = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                        "--no-index", "-q", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


# An editable install adds a finder to the end of sys.meta_path, so a non-editable copy of effc
# in the base environment (CI installs one there before running the tests) would shadow it in a
# --system-site-packages venv. Putting the editable finders first is what an environment without
# that second copy sees.
EDITABLE_FIRST = ("import sys;"
                  "sys.meta_path.sort(key=lambda f: not str(getattr(f, '__module__', '')).startswith('__editable__'));")


def _where(bin_dir: Path, cwd: Path, prelude: str = "") -> dict:
    code = (prelude + "import effc, effc.lang, effc.cli, effc.compiler, effc.compiler.passes, effc.runtime,"
            " effc.kernels, json, os;"
            "from importlib import resources;"
            "print(json.dumps({'lang': os.path.realpath(effc.lang.__file__),"
            " 'grammar': resources.files('effc.lang').joinpath('grammar.lark').is_file()}))")
    r = subprocess.run([str(bin_dir / "python"), "-c", code], capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, r.stderr
    import json

    return json.loads(r.stdout)


def test_every_package_folder_is_listed_in_pyproject():
    """setuptools installs only the packages pyproject names: a new subpackage folder
    that is not listed would work in the checkout and be missing from a real install."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"effc"}
    for top in ("lang", "compiler", "runtime", "kernels"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            found.add(".".join(("effc",) + rel))
    assert found == listed


@pytest.fixture
def outside(tmp_path) -> Path:
    d = tmp_path / "elsewhere"
    d.mkdir()
    return d


def test_non_editable_install_works_from_outside_the_checkout(tmp_path, outside):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, src / name)
    bin_dir = _venv(tmp_path / "venv")
    _pip_install(bin_dir, str(src))
    shutil.rmtree(src)  # the installed package must not need its source tree
    where = _where(bin_dir, outside)
    assert where["lang"].startswith(os.path.realpath(tmp_path / "venv")), where
    assert where["grammar"]
    example = outside / "quickstart.eff"
    shutil.copy2(ROOT / "examples" / "quickstart.eff", example)
    (tmp_path / "docs").mkdir()  # the quickstart fine-tunes on ../docs/language.md
    shutil.copy2(ROOT / "docs" / "language.md", tmp_path / "docs" / "language.md")
    r = subprocess.run([str(bin_dir / "effc"), "check", "quickstart.eff"], capture_output=True, text=True,
                       cwd=outside)
    assert r.returncode == 0, r.stderr
    assert "quickstart.eff: ok" in r.stderr


def test_editable_install_points_at_the_checkout(tmp_path, outside):
    bin_dir = _venv(tmp_path / "venv")
    _pip_install(bin_dir, "-e", str(ROOT))
    try:
        where = _where(bin_dir, outside, EDITABLE_FIRST)
        assert where["lang"] == os.path.realpath(ROOT / "lang" / "__init__.py")
        assert where["grammar"]
        cli = EDITABLE_FIRST + "from effc.cli import main; sys.argv = ['effc', 'check', sys.argv[1]]; main()"
        r = subprocess.run([str(bin_dir / "python"), "-c", cli, str(ROOT / "examples" / "quickstart.eff")],
                           capture_output=True, text=True, cwd=outside)
        assert r.returncode == 0, r.stderr
    finally:
        for leftover in ROOT.glob("*.egg-info"):
            shutil.rmtree(leftover)
