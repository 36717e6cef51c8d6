"""`effc generate`: what a decoder says, token by token, with a KV cache over the IR.

`Decoder(ir, gm, seq)` evaluates the IR's nodes in order, each op with the same kernel or
torch call `compiler/to_fx.py` gives it, reading the weights of `gm` (the model's fx graph,
as `materialize` or `hf.load` built it). It keeps, per attention node, the rotated keys
and the values of every token read so far, so each new token costs one pass over the
weights. Only three ops look at positions and differ from the training graph:

- ROTARY rotates the new tokens by the table rows of their absolute positions;
- POSITION adds the learned rows of those positions;
- ATTENTION_CORE writes the new keys and values into the cache; the prompt (the cache
  empty) attends causally exactly as the training graph does, and each later token, a
  single query at the last position, attends to every cached key, which is the causal
  row of that position.

So `step` over a whole prompt computes what the fx graph computes (the tests assert its
logits to 1e-5), and every later step equals a full recompute of the grown sequence.

Loading (`load`): a run folder (a stage's snapshot of one model; the IR rebuilt by checking
the run's pipeline.eff), an effc export (effc.json, model.safetensors, adapters.safetensors)
or a Hugging Face checkpoint folder. Text becomes tokens with the model's tokenizer.json
(the `tokenizers` library) when there is one, else as bytes (token id = byte value).

Legend: B batch, T tokens in this step, S tokens cached, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F

from effc.compiler.adapters import kind_of, prefix_length
from effc.compiler.ir import ADAPTERS, IR, IRError, Op
from effc.compiler.to_fx import add_positions, add_type0, embedding_adapters, fx_name, qat_weight
from effc.kernels.attention import attention
from effc.kernels.quant import packed_linear
from effc.kernels.rmsnorm import rms_norm
from effc.kernels.rotary import rotary, rotary_tables
from effc.kernels.swiglu import swiglu

BYTES = 256  # ids of the byte-level tokenizer


class GenerateError(Exception):
    """A mistake of the user's (a folder, an option, a prompt): message and hint are theirs.
    `status` is the exit status: 1 for a pipeline with errors, 2 for anything else."""

    def __init__(self, message: str, hint: str | None = None, status: int = 2):
        super().__init__(message)
        self.message, self.hint, self.status = message, hint, status


# ---------------------------------------------------------------- incremental evaluation


class Decoder:
    """A decoder IR with per-layer key/value caches. `step(tokens)` reads the next tokens
    (the whole prompt first, then one at a time) and returns their logits."""

    def __init__(self, ir: IR, gm: fx.GraphModule, seq: int):
        refuse_encoder(ir)
        self.seq = seq
        self.ir = ir
        self.plan = [(n, ir.inputs(n.id)) for n in ir.nodes()]  # topological order, as to_fx
        unknown = sorted(n.op.value for n, _ in self.plan if n.op not in EVALUATED)
        if unknown:  # an op added to the IR needs its incremental form here too
            raise IRError(f"generate: no incremental evaluation of op {unknown[0]}")
        self.weights = {n.id: tuple(gm.get_parameter(fx_name(p.tied_to or p.path)) for p in n.params)
                        for n, _ in self.plan}
        self.eager = _Eager(ir, self.weights)
        # Soft prompts: the first step prepends them, and they hold cache positions from then on.
        self.prefix = prefix_length(ir)
        # Positions the model can read, prompt included (a learned table has a fixed number of rows).
        rows = [n.attrs.rows for n, _ in self.plan if n.op is Op.POSITION and n.attrs.kind == "position"]
        self.capacity = min([seq + self.prefix] + rows)
        self.tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        for n, _ in self.plan:
            if n.op is Op.ROTARY and _rope_key(n.attrs) not in self.tables:
                self.tables[_rope_key(n.attrs)] = rotary_tables(seq + self.prefix, *_rope_key(n.attrs))
        self.reset()

    def reset(self) -> None:
        self.pos = 0  # tokens read so far: the absolute position of the next one
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # attention node -> (k_BSK, v_BSK)

    @torch.no_grad()
    def step(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        B, T = tokens_BT.shape
        if self.pos and T != 1:
            raise ValueError("after the prompt, a step reads one token")
        if self.pos + T + (self.prefix if self.pos == 0 else 0) > self.capacity:
            raise ValueError(f"position {self.pos + T - 1 - self.prefix} is past the model's seq of "
                             f"{self.capacity - self.prefix}")
        self.eager.tokens = tokens_BT
        out: dict[str, torch.Tensor] = {}
        for n, inputs in self.plan:
            x = [out[i] for i in inputs]
            if n.op is Op.LOSS:  # the loss reads the logits: they are the answer
                first = self.prefix if self.pos == 0 else 0  # the prompt's positions have no answer
                self.pos += x[0].shape[1]
                return x[0][:, first:]
            out[n.id] = self._op(n, x, tokens_BT)
        raise IRError("generate: the IR has no loss node")

    def _op(self, n, x: list[torch.Tensor], tokens_BT: torch.Tensor) -> torch.Tensor:
        """One node on the new tokens: to_fx's call for the op (see its lowering)."""
        a, w, p = n.attrs, self.weights[n.id], self.pos
        if n.op is Op.EMBEDDING:  # as to_fx; a soft prompt is read once, by the first step
            y = F.embedding(tokens_BT, w[0])
            for m, v in embedding_adapters(self.ir, n.id, x):
                if not (p and kind_of(m).prefix(m)):
                    y = kind_of(m).after(self.eager, m, v, y)
            return y
        if n.op is Op.POSITION:  # rows p, p+1, ... of the learned table
            return add_positions(x[0], w[0][p:]) if a.kind == "position" else add_type0(x[0], w[0])
        if n.op is Op.RMSNORM:
            return rms_norm(x[0], w[0], a.eps)
        if n.op is Op.LAYERNORM:
            return F.layer_norm(x[0], (a.dim,), w[0], w[1], a.eps)
        if n.op is Op.LINEAR:  # as to_fx: each adapter kind's before/after, in declaration order
            adapters = [self.ir.node(i) for i in self.ir.inputs(n.id)[1:]]
            h = x[0]
            for m, v in zip(adapters, x[1:]):
                h = kind_of(m).before(self.eager, m, v, h)
            if a.quant == "qat":  # as to_fx: LoRA updates folded in, then fake-quantized
                wq = qat_weight(w[0], w[1], a.bits, a.group,
                                tuple((self.weights[m.id][1], self.weights[m.id][0], m.attrs.scale) for m in adapters))
                return F.linear(h, wq, *w[2:])
            if a.quant:  # the packed tensors, then the bias (effc.kernels.quant)
                k = sum(q.quantized for q in n.params)
                y = packed_linear(h, a.quant, a.group, a.double_quant, w[:k], w[k] if a.bias else None)
            else:
                y = F.linear(h, *w)
            for m, v in zip(adapters, x[1:]):
                y = kind_of(m).after(self.eager, m, v, y)
            return y
        if n.op in ADAPTERS:  # the kind's own lowering, evaluated at once (no dropout here)
            return kind_of(n).lower(self.eager, n, x[0] if x else None)
        if n.op is Op.ROTARY:
            cos, sin = self.tables[_rope_key(a)]
            T = x[0].shape[1]
            return rotary(x[0], cos[p:p + T], sin[p:p + T], a.heads)
        if n.op is Op.ATTENTION_CORE:
            return self._attend(n.id, a, *x)
        if n.op is Op.SWIGLU:
            return swiglu(x[0], x[1])
        if n.op is Op.GELU:
            return F.gelu(x[0], approximate=a.approximate)
        if n.op is Op.RESIDUAL_ADD:
            return operator.add(x[0], x[1])
        raise IRError(f"generate: no incremental evaluation of op {n.op.value} (node '{n.id}')")

    def _attend(self, id: str, a, q_BTD, k_BTK, v_BTK) -> torch.Tensor:
        B, T, K = k_BTK.shape
        p = self.pos
        if id not in self.cache:  # room for the whole context, written as tokens arrive
            size = self.capacity
            self.cache[id] = (k_BTK.new_empty(B, size, K), v_BTK.new_empty(B, size, K))
        k_BSK, v_BSK = self.cache[id]
        k_BSK[:, p:p + T] = k_BTK
        v_BSK[:, p:p + T] = v_BTK
        if p == 0:  # the prompt: causal attention among its tokens, the training graph's call
            return attention(q_BTD, k_BTK, v_BTK, a.heads, a.kv_heads)
        # One query at position p sees keys 0..p, all of the cache: its causal row, unmasked.
        return attention(q_BTD, k_BSK[:, :p + T], v_BSK[:, :p + T], a.heads, a.kv_heads, False)


def _rope_key(a) -> tuple:
    """rotary_tables' arguments after seq: to_fx builds one (cos, sin) pair per key."""
    return (a.head_dim, a.theta, a.scaling, a.factor, a.low_freq, a.high_freq, a.original_seq)


EVALUATED = frozenset({Op.EMBEDDING, Op.POSITION, Op.RMSNORM, Op.LAYERNORM, Op.LINEAR, Op.ROTARY,
                       Op.ATTENTION_CORE, Op.SWIGLU, Op.GELU, Op.RESIDUAL_ADD, Op.LOSS}) | ADAPTERS


class _Eager:
    """The builder interface adapter kinds lower with (to_fx's `Lowering`), evaluated at
    once on tensors: the same torch functions, without an fx graph. Dropout is the
    identity, as in evaluation mode."""

    def __init__(self, ir: IR, weights: dict):
        self.ir, self._weights = ir, weights
        self.tokens = None  # the step's token ids, set by Decoder.step

    def call(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    def param(self, node, i: int) -> torch.Tensor:
        return self._weights[node.id][i]

    def linear(self, x, w, bias=None):
        return F.linear(x, w, bias)

    def dropout(self, node, p: float, x):
        return x

    def constant(self, node, name: str, t: torch.Tensor) -> torch.Tensor:
        return t


def refuse_encoder(ir: IR) -> None:
    if any(n.op is Op.POOL for n in ir.nodes()):
        raise _encoder()


def _encoder() -> GenerateError:
    return GenerateError("this model is an encoder (its output is mean-pooled hidden states): it embeds text, "
                         "it does not continue it",
                         "generate works with decoders: decoder(...), Llama, Mistral, Qwen2 and GPT-2 checkpoints")


# ---------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (the likeliest token); otherwise sample from softmax(logits /
    temperature), among the top_k likeliest (0: all) and within the smallest set whose
    probability reaches top_p (Holtzman et al. 2019, arXiv:1904.09751)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise GenerateError(f"--temperature {self.temperature} is negative", "use 0 for greedy, or above 0")
        if self.top_k < 0:
            raise GenerateError(f"--top-k {self.top_k} is negative", "use 0 for no limit, or 1 and above")
        if not 0 < self.top_p <= 1:
            raise GenerateError(f"--top-p {self.top_p} is outside (0, 1]", "use 1 for no limit, such as 0.9")


def choose(logits_V: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    if s.temperature == 0:
        return int(logits_V.argmax())
    z_V = logits_V.double() / s.temperature
    if s.top_k:
        kth = z_V.topk(min(s.top_k, z_V.numel())).values[-1]
        z_V = z_V.masked_fill(z_V < kth, float("-inf"))
    if s.top_p < 1:
        probs, order = z_V.softmax(-1).sort(descending=True)
        before = probs.cumsum(-1) - probs  # the mass of the likelier tokens
        z_V[order[before >= s.top_p]] = float("-inf")  # the likeliest token always stays
    return int(torch.multinomial(z_V.softmax(-1), 1, generator=gen))


@dataclass(frozen=True)
class Generation:
    tokens: list[int]  # the new tokens only
    stop: str  # "eos" | "max_new_tokens" | "seq"


def generate(dec: Decoder, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
             eos: tuple[int, ...] = ()) -> Generation:
    """Continue `prompt` until an eos token, `max_new_tokens` new tokens, or the model's seq
    limit (every token the model reads sits at a position below seq)."""
    if not prompt:
        raise GenerateError("the prompt is empty", "give some text with --prompt")
    room = dec.capacity - dec.prefix  # positions left for text after any soft prompt
    if len(prompt) > room:
        raise GenerateError(f"the prompt is {len(prompt)} tokens, longer than the model's seq of {room}",
                            f"shorten it to {room} tokens or fewer")
    gen = torch.Generator().manual_seed(sampling.seed)
    dec.reset()
    logits_BTV = dec.step(torch.tensor([prompt]))
    new: list[int] = []
    while True:
        if len(new) == max_new_tokens:
            return Generation(new, "max_new_tokens")
        t = choose(logits_BTV[0, -1], sampling, gen)
        new.append(t)
        if t in eos:
            return Generation(new, "eos")
        if dec.pos == dec.capacity:  # the new token would sit past the last position the model reads
            return Generation(new, "seq") if len(new) < max_new_tokens else Generation(new, "max_new_tokens")
        logits_BTV = dec.step(torch.tensor([[t]]))


# ---------------------------------------------------------------- tokenizers


class ByteTokenizer:
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # An id above 255 is no byte: 0xFF never occurs in UTF-8, so it decodes to U+FFFD.
        return bytes(i if i < BYTES else 0xFF for i in ids).decode("utf-8", errors="replace")


class FileTokenizer:
    """A Hugging Face tokenizer.json, through the `tokenizers` library (no code is run)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # the library raises plain Exceptions for a bad file
            raise GenerateError(f"cannot read the tokenizer {path}: {e}",
                                "the file is damaged or not a Hugging Face tokenizer.json") from None
        self.name = path

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def tokenizer_of(folders: list[str]) -> ByteTokenizer | FileTokenizer:
    for f in folders:
        path = os.path.join(f, "tokenizer.json")
        if os.path.isfile(path):
            return FileTokenizer(path)
    return ByteTokenizer()


def eos_ids(folders: list[str]) -> tuple[int, ...]:
    """The end-of-sequence ids a checkpoint declares: generation_config.json's, as
    transformers' generate reads them, else config.json's."""
    for f in folders:
        for name in ("generation_config.json", "config.json"):
            try:
                with open(os.path.join(f, name), encoding="utf-8") as fh:
                    v = json.load(fh).get("eos_token_id")
            except (OSError, ValueError, AttributeError):
                continue
            ids = v if isinstance(v, list) else [v]
            ids = tuple(i for i in ids if isinstance(i, int) and not isinstance(i, bool))
            if ids:
                return ids
    return ()


# ---------------------------------------------------------------- loading


@dataclass
class Loaded:
    decoder: Decoder
    tokenizer: ByteTokenizer | FileTokenizer
    eos: tuple[int, ...]
    vocab: int
    what: str  # what was loaded, for the report line


def load(folder: str | Path, model: str | None = None, stage: str | None = None) -> Loaded:
    folder = Path(folder)
    if not folder.exists():
        raise GenerateError(f"'{folder}' does not exist", _KINDS)
    if not folder.is_dir():
        raise GenerateError(f"'{folder}' is not a folder", _KINDS)
    is_run = (folder / "pipeline.eff").is_file() and (folder / "stages").is_dir()
    if not is_run and (model or stage):
        raise GenerateError(f"--model and --stage choose within a run folder, and '{folder}' is not one",
                            "leave them out for an export or a Hugging Face folder")
    if is_run:
        return _load_run(folder, model, stage)
    if (folder / "effc.json").is_file():
        return _load_export(folder)
    if (folder / "config.json").is_file():
        return _load_hf(folder)
    raise GenerateError(f"'{folder}' is not a run folder, an effc export or a Hugging Face checkpoint", _KINDS)


_KINDS = ("give a run folder (pipeline.eff and stages/, written by effc run), an effc export (effc.json) "
          "or a Hugging Face checkpoint folder (config.json and safetensors)")


def _graph(ir: IR, seq: int, state, seed: int = 0) -> fx.GraphModule:
    """The weights of `ir` from `state`, every one of them: a missing one is an error."""
    from effc.runtime.model import materialize

    refuse_encoder(ir)
    try:
        gm, fresh = materialize(ir, seq, state, seed, output="logits")
    except ValueError as e:  # a shape that is not the IR's
        raise GenerateError(str(e), "the weights do not belong to this model description") from None
    if fresh:
        raise GenerateError(f"the weights lack {fresh[0]}" + (f" and {len(fresh) - 1} more" if len(fresh) > 1 else ""),
                            "the weights do not belong to this model description, or the file is incomplete")
    return gm.eval()


def _tensors(path: Path) -> dict:
    from effc.runtime.checkpoint import CheckpointError, read_tensors

    try:
        return read_tensors(path)
    except CheckpointError as e:
        raise GenerateError(e.message, e.hint) from None


def _loaded(ir: IR, seq: int, state, folders: list[str], what: str) -> Loaded:
    vocab = next(n.attrs.vocab for n in ir.nodes() if n.op is Op.EMBEDDING)
    return Loaded(Decoder(ir, _graph(ir, seq, state), seq), tokenizer_of(folders), eos_ids(folders), vocab, what)


# ------------------------------------------------------------ Hugging Face folders


def _load_hf(folder: Path) -> Loaded:
    from effc.lang.hf import HFConfigError, read_hf
    from effc.runtime import hf

    try:
        arch = read_hf(str(folder)).arch
        if arch.output == "embedding":
            raise _encoder()
        _, ir, gm = hf.load(str(folder), output="logits")
    except (HFConfigError, hf.HFError) as e:
        raise GenerateError(e.message, e.hint) from None
    return Loaded(Decoder(ir, gm.eval(), arch.seq), tokenizer_of([str(folder)]), eos_ids([str(folder)]),
                  arch.vocab, f"checkpoint {folder}")


# ------------------------------------------------------------ effc exports


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise GenerateError(f"cannot read {path}: {e}", "the file is damaged: export the model again") from None
    if not isinstance(data, dict):
        raise GenerateError(f"{path} is not a JSON object", "the file is damaged: export the model again")
    return data


def _load_export(folder: Path) -> Loaded:
    """An effc export: the IR rebuilt from effc.json (the family's Arch from its config,
    then the adapters the export kept apart, from the adapt statements it records)."""
    from effc.compiler.lower import lower_arch
    from effc.compiler.passes import InternalError, PassContext, run_passes
    from effc.compiler.pipeline import PASSES
    from effc.lang.hf import HFConfigError, read_hf
    from effc.lang.tree import decoder_arch

    meta = _read_json(folder / "effc.json")
    family, config = meta.get("family"), meta.get("config")
    if meta.get("format") != "effc" or not isinstance(config, dict):
        raise GenerateError(f"{folder / 'effc.json'} does not describe an effc export (format, config)",
                            "the file is damaged: export the model again")
    folders = [str(folder)]
    try:
        if family == "decoder":
            arch = decoder_arch(config)
        elif family == "hf":
            # effc.json keeps the checkpoint's path and seq, not its architecture: config.json
            # there describes the model (a merged, tied head records tied=false here).
            source = read_hf(str(config.get("path")), config.get("seq"))
            arch = dataclasses.replace(source.arch, tied=bool(config.get("tied", source.arch.tied)))
            folders.append(source.folder)
        else:
            raise GenerateError(f"effc.json names family {family!r}, which generate cannot rebuild",
                                "generate reads exports of decoder(...) and hf(...) models")
    except HFConfigError as e:
        raise GenerateError(f"this export of an hf(...) model is described by its source checkpoint's config.json, "
                            f"which cannot be read: {e.message}",
                            f"restore the checkpoint folder {config.get('path')!r}, or export with format=hf, "
                            "which writes a self-contained folder") from None
    except (KeyError, TypeError, ValueError) as e:
        raise GenerateError(f"effc.json's config cannot describe a decoder: {e!r}",
                            "the file is damaged: export the model again") from None
    records = meta.get("adapters") or []
    try:
        ir, _ = run_passes(lower_arch(arch, None), PASSES, PassContext(_adapter_uses(meta, records), _edit_uses(meta)))
    except (InternalError, IRError, KeyError, TypeError, ValueError):  # an adapter the model cannot hold
        ir = None
    if ir is None or {n.id for n in ir.nodes() if n.op in ADAPTERS} != {r.get("node") for r in records}:
        raise GenerateError("effc.json's adapters do not rebuild the export's adapter nodes",
                            "the file is damaged: export the model again")
    state = _tensors(folder / "model.safetensors")
    if records:
        state.update(_tensors(folder / "adapters.safetensors"))
    return _loaded(ir, arch.seq, state, folders, f"export {folder}")


def _edit_uses(meta: dict) -> tuple:
    """effc.json's share, prune and quantize statements (`edits`, in order) -> the EditUse
    list the passes read (an export without them is an uncompressed model)."""
    from effc.lang.check import EditUse

    try:
        return tuple(EditUse(e["verb"], e["technique"], tuple(e["paths"]), None, dict(e["args"]))
                     for e in meta.get("edits") or [])
    except (KeyError, TypeError) as e:
        raise GenerateError(f"effc.json's compression statements are damaged: {e!r}",
                            "export the model again") from None


def _adapter_uses(meta: dict, records: list) -> tuple:
    """effc.json's adapt statements (`uses`, in order) -> the AdapterUse list the passes
    read, so each node gets its number, and each weight its order, back."""
    from effc.lang.check import AdapterUse

    uses = meta.get("uses")
    if records and not isinstance(uses, list):
        raise GenerateError("effc.json lists adapters but not the adapt statements that made them",
                            "the export was written by an older effc: export the model again")
    try:
        return tuple(AdapterUse(u["technique"], u.get("scope", "shared"), frozenset(u["paths"]), None, dict(u["args"]))
                     for u in uses or [])
    except (KeyError, TypeError) as e:
        raise GenerateError(f"effc.json's adapt statements are damaged: {e!r}",
                            "export the model again") from None


# ------------------------------------------------------------ run folders


def _load_run(run: Path, model: str | None, stage: str | None) -> Loaded:
    """Model M as stage S left it: RUN/stages/NN_S/models/M.safetensors, with the IR that
    `effc run` built for that snapshot (the adapters declared before S ended)."""
    from effc.compiler.passes import InternalError
    from effc.compiler.pipeline import model_ir, snapshot_until

    result = _check_run(run)
    names = [s.name for s in result.stages]
    if not names:
        raise GenerateError(f"the pipeline of run '{run}' has no stages, so the run holds no model",
                            "generate reads the snapshots that stages write")
    done = [n for i, n in enumerate(names) if (run / "stages" / f"{i:02d}_{n}" / "done.json").is_file()]
    if stage is None:
        if not done:
            raise GenerateError(f"no stage of run '{run}' has finished", "finish it with: effc run FILE --resume")
        stage = done[-1]
    elif stage not in names:
        raise GenerateError(f"run '{run}' has no stage '{stage}'", f"its stages: {', '.join(names)}")
    elif stage not in done:
        raise GenerateError(f"stage '{stage}' of run '{run}' has not finished",
                            f"finished stages: {', '.join(done) or 'none'}; or finish it with: effc run FILE --resume")
    models_dir = run / "stages" / f"{names.index(stage):02d}_{stage}" / "models"
    snapshots = sorted(p.stem for p in models_dir.glob("*.safetensors"))
    if model is None:
        if len(snapshots) != 1:
            raise GenerateError(f"stage '{stage}' of run '{run}' holds "
                                + (f"{len(snapshots)} models ({', '.join(snapshots)})" if snapshots else "no model"),
                                "choose one with --model" if snapshots else "a stage snapshots the models it uses")
        model = snapshots[0]
    elif model not in snapshots:
        where = f"stage '{stage}' holds: {', '.join(snapshots)}" if snapshots else f"stage '{stage}' holds no model"
        raise GenerateError(f"run '{run}' has no snapshot of model '{model}' at stage '{stage}'", where)
    info = result.models.get(model)
    if info is None:
        raise GenerateError(f"the run's pipeline.eff declares no model '{model}'",
                            "the run folder is damaged: run the pipeline again")
    try:
        ir, _ = model_ir(result, model, snapshot_until(result, stage))
    except (InternalError, IRError) as e:
        raise GenerateError(f"model '{model}' cannot be rebuilt: {e}", "please report this with the .eff file") from None
    folders = [str(info.args["path"])] if info.family == "hf" else []
    state = _tensors(models_dir / f"{model}.safetensors")
    return _loaded(ir, info.args["seq"], state, folders, f"{model}@{stage} of run {run}")


_SET = re.compile(r"# --set ([^=\s]+)=(.*)")


def _check_run(run: Path):
    """The run's pipeline.eff checked again, with the --set overrides its header records.
    Its paths were relative to the file `effc run` read (run.json names it), so that file's
    folder is tried first, then the run folder."""
    from effc.lang.check import check_source, read_source
    from effc.lang.diagnostics import render_all

    eff = run / "pipeline.eff"
    text, diags = read_source(str(eff))
    if text is None:
        raise GenerateError(diags[0].message, diags[0].hint)
    overrides = {}
    for line in text.splitlines():  # the header run.py writes, one line per override
        m = _SET.fullmatch(line)
        if m is None:
            break
        overrides[m.group(1)] = m.group(2)
    recorded = _read_json(run / "run.json").get("file") if (run / "run.json").is_file() else None
    paths = ([str(Path(recorded).resolve())] if isinstance(recorded, str) else []) + [str(eff)]
    first = None
    for path in paths:
        result = check_source(text, path, overrides=overrides)
        if result.ok:
            return result
        first = first or (path, result)
    path, result = first
    raise GenerateError("the run's pipeline.eff no longer checks:\n"
                        + render_all(result.diagnostics, {path: text}, colour=False).rstrip(),
                        f"its paths are relative to {os.path.dirname(path)}: restore the files it names"
                        + ("" if isinstance(recorded, str) and os.path.isabs(recorded) else
                           ", or run effc generate in the folder effc run ran in"), status=1)


# ---------------------------------------------------------------- the command


def complete(loaded: Loaded, prompt: str, max_new_tokens: int, sampling: Sampling) -> tuple[str, str]:
    """The prompt and its continuation as text, and a line saying what ran and why it stopped."""
    tok = loaded.tokenizer
    ids = tok.encode(prompt)
    bad = [(i, t) for i, t in enumerate(ids) if t >= loaded.vocab]
    if bad:
        i, t = bad[0]
        if isinstance(tok, ByteTokenizer):
            raise GenerateError(f"the prompt's byte {i} is {t}, but the model reads bytes as tokens and its vocab "
                                f"is {loaded.vocab}", f"give a prompt of bytes below {loaded.vocab}, or use a "
                                "model with vocab=256 or more (there is no tokenizer.json beside it)")
        raise GenerateError(f"the prompt's token {i} is id {t}, outside the model's vocab of {loaded.vocab}",
                            f"is {tok.name} this model's tokenizer?")
    out = generate(loaded.decoder, ids, max_new_tokens, sampling, loaded.eos)
    why = {"eos": "at the end-of-sequence token",
           "max_new_tokens": f"after --max-new-tokens {max_new_tokens}",
           "seq": f"at the model's seq limit of {loaded.decoder.seq} tokens"}[out.stop]
    how = "greedy" if sampling.temperature == 0 else f"sampled, seed {sampling.seed}"
    note = f"{loaded.what}: {len(ids)} prompt + {len(out.tokens)} new tokens ({how}), stopped {why}"
    return tok.decode(ids + out.tokens), note
