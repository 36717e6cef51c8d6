"""Device profiles (compiler/profile.py, runtime/profile.py, `effc profile`): measured,
written atomically, read back; the built-in default when a machine has none; a missing or
corrupt profile is a message with a hint, never a traceback."""

import json

import pytest
from typer.testing import CliRunner

from effc.cli import app
from effc.compiler.profile import DEFAULT_CPU, DeviceProfile, ProfileError, load_profile, profile_path

runner = CliRunner()


def test_quick_profile_is_written_and_read_back(tmp_path):
    out = tmp_path / "p.json"
    r = runner.invoke(app, ["profile", "--quick", "-o", str(out), "--threads", "1"])
    assert r.exit_code == 0, r.output
    p = load_profile(out)
    assert p.source == str(out) and p.threads == 1 and p.device in ("cpu", "cuda")
    assert all(rate > 0 for rows in p.matmul.values() for *_, rate in rows)
    assert p.bandwidth > 0 and p.overhead["aten_op"] > 0 and p.overhead["custom_op"] > 0
    assert p.collectives["gloo"]["processes"] == 2
    assert all(p.collective_rate("gloo", op) > 0 for op in ("all_reduce", "all_gather", "reduce_scatter"))
    assert "over gloo, 2 processes: all-reduce" in r.stdout and "reduce-scatter" in r.stdout
    assert f"({out})" in r.stdout and "GFLOP/s" in r.stdout
    assert json.loads(out.read_text())["effc_profile"] == 1
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left over


def test_an_older_profile_without_fsdp_collectives_answers_with_the_all_reduce():
    old = DeviceProfile.from_json({**DEFAULT_CPU.to_json(), "collectives": {"gloo": {
        "processes": 2, "bytes": 1 << 22, "bus_bandwidth": 2e9}}}, "old.json")
    assert old.collective_rate("gloo", "all_gather") == old.collective_rate("gloo") == 2e9
    assert old.collective_rate("nccl") is None


def test_a_gpu_profile_says_its_host_link_and_round_trips():
    from dataclasses import replace

    from effc.runtime.profile import summary

    p = replace(DEFAULT_CPU, device="cuda", host={"link": 2.5e10, "bandwidth": 1.5e10})
    back = DeviceProfile.from_json(json.loads(json.dumps(p.to_json())), "p.json")
    assert back.host == p.host
    assert "host <-> device copies (pinned): 25.0 GB/s; host memory copy: 15.0 GB/s" in summary(p)
    assert "host <-> device" not in summary(DEFAULT_CPU)


def test_without_a_profile_the_built_in_default_is_used_and_named(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFC_PROFILE", str(tmp_path / "none.json"))
    assert profile_path() == tmp_path / "none.json"
    p = load_profile()
    assert p is DEFAULT_CPU and p.source == "built-in default"
    r = runner.invoke(app, ["profile", "--show"])
    assert r.exit_code == 0 and "(built-in default)" in r.stdout


def test_missing_or_corrupt_profiles_are_messages(tmp_path):
    r = runner.invoke(app, ["profile", "--show", "-o", str(tmp_path / "absent.json")])
    assert r.exit_code == 2 and "no device profile at" in r.stderr and "effc profile -o" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="cannot read the device profile"):
        load_profile(bad)
    bad.write_text(json.dumps({"effc_profile": 1, "name": "x"}))
    with pytest.raises(ProfileError, match="a field is missing or malformed") as e:
        load_profile(bad)
    assert "effc profile" in e.value.hint
    bad.write_text(json.dumps({"something": "else"}))
    r = runner.invoke(app, ["profile", "--show", "-o", str(bad)])
    assert r.exit_code == 2 and "is not an effc device profile" in r.stderr and "Traceback" not in r.output


def test_matmul_rate_reads_the_nearest_measured_shape():
    p = DeviceProfile("t", "cpu", 1, {"float32": [[64, 64, 64, 1e9], [1024, 1024, 1024, 1e11]]}, 1e10,
                      {"aten_op": 1e-6, "custom_op": 1e-5})
    assert p.matmul_rate(100, 50, 80) == 1e9
    assert p.matmul_rate(2048, 512, 1024) == 1e11
    assert p.matmul_rate(2048, 512, 1024, "bfloat16") == 1e11  # no bf16 rows: float32's
    assert DeviceProfile.from_json(p.to_json(), "here") == DeviceProfile(**{**p.__dict__, "source": "here"})
