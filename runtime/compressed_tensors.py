"""Quantized linears in the compressed-tensors format (what transformers' CompressedTensorsConfig,
vLLM and llm-compressor read): effc's canonical packed int8/int4 weights converted to the
tensors and the `quantization_config` of config.json.

`convert(tensors, quantized)` takes the dense tensors of a Hugging Face folder (HF names) and,
per quantized linear (HF module name, e.g. `model.layers.0.self_attn.q_proj`), effc's tensors
(`Quantized`); it returns every tensor to write and the quantization_config. Layout written
for a quantized module M (format 0.20.1 of the compressed-tensors package, checked against it
in tests/runtime/test_compressed_tensors.py):

- int4 (effc: q in [0, 15], zero in [0, 15], groups of g input columns): format
  "pack-quantized", weights {num_bits 4, type int, symmetric false, strategy group,
  group_size g}. compressed-tensors' asymmetric int4 holds signed values q' = q - 8 in
  [-8, 7] and a signed zero point z' = zero - 8, and dequantizes (q' - z') * scale, which is
  (q - zero) * scale: effc's value, bit for bit (the integer difference is exact in fp32).
  - `M.weight_packed` int32 (out, ceil(in / 8)): word k of row r holds columns 8k..8k+7,
    column 8k+j in bits 4j..4j+3 (the first column lowest); each nibble is stored as
    q' + 8 = q, so the words carry effc's nibbles unchanged (byte j of effc's row: column
    2j low, 2j+1 high, is byte j % 4 of word j // 4 in little-endian order).
  - `M.weight_scale` (out, in // g), fp32 unless scale_dtype says otherwise.
  - `M.weight_zero_point` int32 (ceil(out / 8), in // g): packed the same way but along the
    OUTPUT dim (rows 8k..8k+7 of a group column in word k), each nibble z' + 8 = zero.
  - `M.weight_shape` int64 (2,) = (out, in).
  vLLM sizes the zero point out // 8 (per fused shard): there, out must be a multiple of 8.
- int8 (effc: symmetric per output channel, q in [-127, 127]): weights {num_bits 8, type int,
  symmetric true, strategy channel}, in one of two formats:
  - "pack-quantized" (default): `M.weight_packed` int32 (out, ceil(in / 4)), column 4k+j of
    row r in bits 8j..8j+7 of word k, stored as q + 128; `M.weight_scale` (out, 1);
    `M.weight_shape` int64 (2,). This is the layout vLLM's weight-only (WNA16) path reads
    and the format compressed-tensors itself infers for weight-only int8.
  - "naive-quantized": `M.weight` int8 (out, in) as effc holds it; `M.weight_scale` (out, 1).
    transformers decompresses it, but vLLM treats naive-quantized as an activation
    quantization format and has no weight-only int8 scheme for it, and compressed-tensors'
    model-free dequantizer re-infers "pack-quantized" for such a scheme: use only where a
    reader wants plain int8 tensors.
  compressed-tensors dequantizes q * scale: effc's value, bit for bit.

One config group per distinct (scheme, group size, format), in first-seen order, named
group_0, group_1, ...; its `targets` list the exact module names, so nothing else is touched
(vLLM matches its fused qkv_proj / gate_up_proj through those names: it requires the q, k, v
of a layer, and gate and up, to share one group). The top-level `format` is the groups'
format, or "mixed-precision" when they differ (each group then carries its own). `ignore`
names the linears left dense (lm_head, ...); `quantization_status` is "compressed", which
tells transformers the folder holds compressed weights.

`write_folder` writes config.json (with the quantization_config) and model.safetensors with
effc's checkpoint helpers (atomic writes). The module imports only effc.runtime.checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from effc.runtime.checkpoint import atomic_write_json, write_tensors

FORMAT_VERSION = "0.20.1"  # the compressed-tensors release whose format this writes (config "version")
PACK = "pack-quantized"
NAIVE = "naive-quantized"
MIXED = "mixed-precision"
SCHEMES = ("int8", "int4")
_EMBEDDINGS = ("embed", "wte", "wpe")  # 2-D weights that are no linear (left out of `ignore`)


class CompressedTensorsError(Exception):
    """effc's tensors cannot be written in the compressed-tensors format; message and hint
    are for the user."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


@dataclasses.dataclass(frozen=True)
class Quantized:
    """One linear's weight in effc's canonical packed storage.

    int8: qweight int8 (out, in), scale fp32 (out,), zero None, group None.
    int4: qweight uint8 (out, in // 2) (column 2j in the low nibble of byte j), scale fp32
    (out, in // group), zero uint8 (out, in // group), group the (even) group size."""

    scheme: str
    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    group: int | None = None

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], path: str, scheme: str,
                   group: int | None = None) -> Quantized:
        """The tensors effc stores under the linear's canonical path (`layers[0].attn.q`):
        `path.qweight`, `path.scale` and, for int4, `path.zero`."""
        zero = state[f"{path}.zero"] if scheme == "int4" else None
        return cls(scheme, state[f"{path}.qweight"], state[f"{path}.scale"], zero, group)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight (out, in) this storage stands for: q * scale (int8),
        (q - zero) * scale (int4)."""
        if self.scheme == "int8":
            return self.qweight.float() * self.scale.float()[:, None]
        zero = self.zero.float().repeat_interleave(self.group, dim=1)
        return (_nibbles(self.qweight).float() - zero) * self.scale.float().repeat_interleave(self.group, dim=1)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """effc's uint8 (out, in // 2) -> the nibbles (out, in) as uint8: low nibble first."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Unsigned values (2-D, each below 2**bits; bits divides 32) packed 32 // bits to an int32
    word along `dim`: element j of a word in bits j*bits .. (j+1)*bits - 1, the first element
    lowest; the last word is padded with zero bits. Arithmetic, so the host's byte order does
    not matter."""
    per = 32 // bits
    v = values.to(torch.int64)
    if dim == 0:
        v = v.T
    rows, cols = v.shape
    words = -(-cols // per)
    padded = torch.zeros(rows, words * per, dtype=torch.int64)
    padded[:, :cols] = v
    shifts = torch.arange(per, dtype=torch.int64) * bits
    w = (padded.view(rows, words, per) << shifts).sum(-1)
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)  # the same 32 bits, as a signed word
    return (w.T if dim == 0 else w).contiguous()


def _check(name: str, qt: Quantized) -> tuple[int, int]:
    """(out, in) of a well-formed Quantized, or CompressedTensorsError."""
    def bad(what: str):
        raise CompressedTensorsError(f"quantized linear '{name}' ({qt.scheme}): {what}",
                                     "give effc's canonical tensors (docs: packed storage)")
    if qt.scheme not in SCHEMES:
        raise CompressedTensorsError(f"quantized linear '{name}' has scheme '{qt.scheme}'",
                                     f"compressed-tensors export supports {', '.join(SCHEMES)}")
    if qt.qweight.dim() != 2:
        bad(f"qweight has shape {tuple(qt.qweight.shape)}, not (out, in)")
    out = qt.qweight.shape[0]
    if qt.scheme == "int8":
        if qt.qweight.dtype != torch.int8:
            bad(f"qweight is {qt.qweight.dtype}, not torch.int8")
        if tuple(qt.scale.shape) != (out,):
            bad(f"scale has shape {tuple(qt.scale.shape)}, not ({out},)")
        return out, qt.qweight.shape[1]
    if qt.qweight.dtype != torch.uint8:
        bad(f"qweight is {qt.qweight.dtype}, not torch.uint8")
    g, n = qt.group, qt.qweight.shape[1] * 2
    if not isinstance(g, int) or g <= 0 or g % 2 or n % g:
        bad(f"group {g} must be even and divide the {n} input columns")
    if tuple(qt.scale.shape) != (out, n // g):
        bad(f"scale has shape {tuple(qt.scale.shape)}, not ({out}, {n // g})")
    if qt.zero is None or qt.zero.dtype != torch.uint8 or tuple(qt.zero.shape) != (out, n // g):
        got = None if qt.zero is None else f"{qt.zero.dtype} {tuple(qt.zero.shape)}"
        bad(f"zero is {got}, not torch.uint8 ({out}, {n // g})")
    if int(qt.zero.max()) > 15:
        bad(f"zero holds {int(qt.zero.max())}, above 15")
    return out, n


def compress(qt: Quantized, fmt: str = PACK, scale_dtype: torch.dtype = torch.float32,
             name: str = "") -> dict[str, torch.Tensor]:
    """One linear's tensors by local name (weight_packed, weight_scale, ...); see the module
    doc. name: the module, for messages."""
    out, n = _check(name, qt)
    if qt.scheme == "int8":
        scale = qt.scale.reshape(out, 1).to(scale_dtype).contiguous()
        if fmt == NAIVE:
            return {"weight": qt.qweight.contiguous(), "weight_scale": scale}
        return {"weight_packed": pack_int32(qt.qweight.to(torch.int16) + 128, 8),
                "weight_scale": scale, "weight_shape": torch.tensor([out, n], dtype=torch.int64)}
    return {"weight_packed": pack_int32(_nibbles(qt.qweight), 4),
            "weight_scale": qt.scale.to(scale_dtype).contiguous(),
            "weight_zero_point": pack_int32(qt.zero, 4, dim=0),
            "weight_shape": torch.tensor([out, n], dtype=torch.int64)}


def _weights_args(qt: Quantized) -> dict:
    """The group's `weights` QuantizationArgs: the fields that say the format, nothing
    release-specific (no observer, zp_dtype or scale_dtype)."""
    if qt.scheme == "int8":
        return {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "channel",
                "dynamic": False, "actorder": None}
    return {"num_bits": 4, "type": "int", "symmetric": False, "group_size": qt.group, "strategy": "group",
            "dynamic": False, "actorder": None}


def convert(tensors: Mapping[str, torch.Tensor], quantized: Mapping[str, Quantized],
            ignore: Iterable[str] | None = None, int8_format: str = PACK,
            scale_dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict]:
    """(every tensor to write, the quantization_config for config.json).

    tensors: the dense tensors by Hugging Face name (a quantized module's `.weight` absent;
    its bias, if any, stays here). quantized: HF module name -> Quantized. ignore: the dense
    linears to name in the config's ignore list; by default every module with a 2-D `.weight`
    in `tensors` except embeddings (names with embed/wte/wpe). int8_format: "pack-quantized"
    (vLLM's weight-only int8) or "naive-quantized". scale_dtype: fp32 keeps effc's values
    exactly; a half model may want its own dtype (then dequantized values round to it)."""
    if int8_format not in (PACK, NAIVE):
        raise CompressedTensorsError(f"int8_format '{int8_format}' is not a format for int8 weights",
                                     f"use '{PACK}' (vLLM's weight-only int8) or '{NAIVE}'")
    if not quantized:
        raise CompressedTensorsError("no quantized linear to export",
                                     "a compressed-tensors folder needs at least one quantized module")
    out = dict(tensors)
    groups: dict[tuple, dict] = {}
    for name in sorted(quantized):  # sorted: the same config whatever the caller's order
        qt = quantized[name]
        fmt = int8_format if qt.scheme == "int8" else PACK
        local = compress(qt, fmt, scale_dtype, name)
        clash = [k for k in (f"{name}.weight", *(f"{name}.{n}" for n in local)) if k in tensors]
        if clash:
            raise CompressedTensorsError(f"'{clash[0]}' is given both dense and quantized",
                                         "leave a quantized module's weight out of the dense tensors")
        out.update({f"{name}.{n}": t for n, t in local.items()})
        key = (qt.scheme, qt.group, fmt)
        group = groups.setdefault(key, {"targets": [], "weights": _weights_args(qt), "input_activations": None,
                                        "output_activations": None, "format": fmt})
        group["targets"].append(name)
    if ignore is None:
        ignore = sorted({k.rpartition(".")[0] for k, t in tensors.items()
                         if k.endswith(".weight") and t.dim() == 2 and k.rpartition(".")[0] not in quantized
                         and not any(e in k.rpartition(".")[0].rpartition(".")[2] for e in _EMBEDDINGS)})
    formats = {g["format"] for g in groups.values()}
    config = {
        "quant_method": "compressed-tensors",
        "version": FORMAT_VERSION,
        "format": formats.pop() if len(formats) == 1 else MIXED,
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
    return out, config


def write_folder(folder: Path, tensors: Mapping[str, torch.Tensor], config: Mapping,
                 quantization_config: dict) -> list[str]:
    """config.json (`config` with its quantization_config) and model.safetensors into `folder`
    (created if needed; tokenizer files are the caller's); returns the file names written.
    One file, as transformers' and vLLM's loaders take at any size. A folder that already
    holds a sharded checkpoint is refused: its index would win over the new file."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        raise CompressedTensorsError(f"'{folder}' holds a sharded checkpoint ({index.name})",
                                     "write the compressed model into a fresh folder")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "config.json", {**config, "quantization_config": quantization_config})
    write_tensors(folder / "model.safetensors", dict(tensors), metadata={"format": "pt"})
    return ["config.json", "model.safetensors"]
