"""Device profiles: what this machine does per second, for the cost model's time estimate.

A profile is a JSON file written by `effc profile` (effc.runtime.profile measures it):

    {"effc_profile": 1, "name": ..., "device": "cpu" | "cuda", "threads": ..., "torch": ...,
     "measured": "2026-12-03T08:00:00Z",
     "matmul": {"float32": [[m, n, k, flop_per_s], ...], "bfloat16": [...]},
     "bandwidth": bytes_per_s,                  # a large copy: read + write
     "overhead": {"aten_op": s, "custom_op": s}, # one tiny op call, eager
     "collectives": {"gloo": {"processes": 2, "bytes": n, "bus_bandwidth": bytes_per_s (all-reduce),
                              "all_gather": bytes_per_s, "reduce_scatter": bytes_per_s}, "nccl": ...},
     "host": {"link": bytes_per_s, "bandwidth": bytes_per_s}}   # beside a GPU only

`load_profile()` reads the profile of this machine's device kind from `profile_path()`
(`$EFFC_PROFILE`, else `~/.cache/effc/profile-<device>.json`) and falls back to the
built-in `DEFAULT_CPU` when there is none; every report names the profile it used
(`DeviceProfile.source`). Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

VERSION = 1


class ProfileError(Exception):
    def __init__(self, message: str, hint: str, path: str | None = None):
        super().__init__(message)
        self.message, self.hint, self.path = message, hint, path


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    device: str
    threads: int
    matmul: dict[str, list[list[float]]]  # dtype -> [m, n, k, FLOP/s]
    bandwidth: float  # bytes/s
    overhead: dict[str, float]  # seconds per call
    collectives: dict[str, dict] = field(default_factory=dict)
    # beside a GPU: {"link": host <-> device copy bytes/s (pinned), "bandwidth": host memory copy bytes/s}
    host: dict[str, float] = field(default_factory=dict)
    measured: str = ""
    torch: str = ""
    source: str = "built-in default"  # where it was read from: a path, or the built-in default

    def matmul_rate(self, m: int, n: int, k: int, dtype: str = "float32") -> float:
        """FLOP/s of an (m, k) x (k, n) matmul: the measured shape nearest in log-size
        (the rates of small shapes fall off; large ones plateau)."""
        table = self.matmul.get(dtype) or self.matmul["float32"]
        size = math.log(m * n * k)
        return min(table, key=lambda r: abs(math.log(r[0] * r[1] * r[2]) - size))[3]

    def collective_rate(self, backend: str, op: str = "all_reduce") -> float | None:
        """Bus bandwidth (bytes/s) of a collective over `backend`, if measured: "all_reduce"
        (stored as "bus_bandwidth"), "all_gather" or "reduce_scatter". A profile written
        before the last two were measured answers with the all-reduce's."""
        c = self.collectives.get(backend)
        if not isinstance(c, dict):
            return None
        rate = c.get("bus_bandwidth" if op == "all_reduce" else op, c.get("bus_bandwidth"))
        return float(rate) if rate else None

    def to_json(self) -> dict:
        return {"effc_profile": VERSION, "name": self.name, "device": self.device, "threads": self.threads,
                "torch": self.torch, "measured": self.measured, "matmul": self.matmul,
                "bandwidth": self.bandwidth, "overhead": self.overhead, "collectives": self.collectives,
                "host": self.host}

    @staticmethod
    def from_json(d: dict, source: str) -> "DeviceProfile":
        if not isinstance(d, dict) or d.get("effc_profile") != VERSION:
            raise ProfileError(f"{source} is not an effc device profile (version {VERSION})",
                               "write one with: effc profile", source)
        try:
            return DeviceProfile(str(d["name"]), str(d["device"]), int(d["threads"]),
                                 {k: [[float(x) for x in row] for row in v] for k, v in d["matmul"].items()},
                                 float(d["bandwidth"]), {k: float(v) for k, v in d["overhead"].items()},
                                 dict(d.get("collectives", {})), {k: float(v) for k, v in d.get("host", {}).items()},
                                 str(d.get("measured", "")), str(d.get("torch", "")),
                                 source)
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"{source}: a field is missing or malformed ({e})",
                               "measure this machine again with: effc profile", source) from None


# A 2-core AVX2 x86 CPU without bf16 instructions, torch 2.13.0+cpu CPU build, 2 threads:
# `effc profile` on the machine this project is developed on (2026-12-03), a stand-in
# until a machine has its own profile.
DEFAULT_CPU = DeviceProfile(
    name="built-in: 2-core AVX2 CPU, 2 threads", device="cpu", threads=2,
    matmul={"float32": [[128.0, 128.0, 128.0, 8.934e+10], [512.0, 512.0, 512.0, 1.781e+11],
                        [2048.0, 512.0, 512.0, 1.889e+11], [2048.0, 2048.0, 512.0, 1.874e+11],
                        [2048.0, 2048.0, 2048.0, 1.904e+11]],
            "bfloat16": [[128.0, 128.0, 128.0, 3.02e+09], [512.0, 512.0, 512.0, 1.345e+09],
                         [2048.0, 2048.0, 2048.0, 2.845e+08]]},
    bandwidth=3.102e+10, overhead={"aten_op": 1.628e-06, "custom_op": 6.925e-05},
    collectives={"gloo": {"processes": 2, "bytes": 32 << 20, "bus_bandwidth": 1.7e+09, "all_gather": 4.3e+08,
                          "reduce_scatter": 3.9e+08}})


def device_kind() -> str:
    """"cuda" or "cpu". Without torch loaded (`effc check` never loads it) a stored CUDA
    profile says this machine has a GPU, rather than paying seconds to import torch."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    stored = Path.home() / ".cache" / "effc" / "profile-cuda.json"
    return "cuda" if stored.is_file() else "cpu"


def profile_path(device: str | None = None) -> Path:
    env = os.environ.get("EFFC_PROFILE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "effc" / f"profile-{device or device_kind()}.json"


def load_profile(path: Path | None = None) -> DeviceProfile:
    """The profile at `path` (an error if it is given and unreadable), else this
    machine's stored one, else the built-in default."""
    p = path or profile_path()
    if not p.is_file():
        if path is not None:
            raise ProfileError(f"no device profile at {p}", "write one with: effc profile -o " + str(p))
        return DEFAULT_CPU
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ProfileError(f"cannot read the device profile {p}: {e}", "measure again with: effc profile",
                           str(p)) from None
    return DeviceProfile.from_json(data, str(p))
