"""The registries: one per kind of name, so `linear` can be a schedule, a merge and a kind
filter at once without collision.

This version registers the signatures of `decoder`, the data sources, `adamw`, the
schedules and `lora`; every other settled name is listed as *planned* with the issue
that implements it, and the checker refuses it with "not available in this version".
Statement options and their settled choices are in `STATEMENTS`.
"""

from __future__ import annotations

from effc.lang.hf import ARCHITECTURES, hf_derived, hf_problems
from effc.lang.tokenizer_info import TokenizerError, TokenizerInfo, read_tokenizer
from effc.lang.types import (
    REQUIRED, BoolT, CallT, DataT, Entry, EnumT, FloatT, IntT, ListT, ModelT, Param, PathT,
    Problem, Registry, SizeT, StrT, TokenizerT,
)

_SPINE = "the compiler-and-runtime issue (#3)"
_MODELS = "the real-models issue (#4)"
_COMPRESS = "the compression issue (#5)"
_PLAN = "the planning issue (#7)"

# ---------------------------------------------------------------- model families


def _decoder_constraints(a: dict) -> list[Problem]:
    out = []
    dim, heads, kv = a.get("dim"), a.get("heads"), a.get("kv_heads")
    if dim and heads and dim % heads:
        out.append(Problem("heads", f"heads={heads} does not divide dim={dim}",
                           f"each head has dim/heads channels; try heads={_divisor_near(dim, heads)}"))
    elif dim and heads and (dim // heads) % 2:
        out.append(Problem("heads", f"the head width dim/heads = {dim // heads} is odd",
                           "rotary position embeddings rotate channel pairs: the head width must be even"))
    if heads and kv and heads % kv:
        out.append(Problem("kv_heads", f"kv_heads={kv} does not divide heads={heads}",
                           "grouped-query attention shares each key/value head among heads/kv_heads query heads"))
    return out


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


FAMILIES = Registry("model family", {
    "decoder": Entry(
        "decoder",
        (
            Param("vocab", IntT(min=1), doc="vocabulary size"),
            Param("dim", IntT(min=1), doc="model width"),
            Param("layers", IntT(min=1), doc="number of transformer blocks"),
            Param("heads", IntT(min=1), doc="attention heads"),
            Param("kv_heads", IntT(min=1), None, "key/value heads (grouped-query attention)",
                  default_doc="heads"),
            Param("ffn", IntT(min=1), doc="hidden width of the SwiGLU MLP"),
            Param("seq", IntT(min=1), doc="maximum sequence length"),
            Param("tied", BoolT(), False, "tie the output head to the embedding"),
            Param("rope_theta", FloatT(min=0, min_open=True), 10000.0, "rotary embedding base"),
            Param("norm_eps", FloatT(min=0, min_open=True), 1e-5, "RMSNorm epsilon"),
        ),
        "Llama-style decoder: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention.",
        paper="Touvron et al. 2023, LLaMA (arXiv:2302.13971)",
        constraints=_decoder_constraints,
    ),
    "hf": Entry(
        "hf",
        (
            Param("path", PathT(), doc="a local Hugging Face checkpoint folder (config.json, *.safetensors)"),
            Param("seq", IntT(min=1), None, "maximum sequence length", default_doc="the config's maximum"),
        ),
        "A local Hugging Face checkpoint, read into effc's canonical module tree. Families: "
        + ", ".join(sorted(ARCHITECTURES)) + " (docs/models.md).",
        constraints=hf_problems, derive=hf_derived,
    ),
})

# ---------------------------------------------------------------- data sources

_SEQ = Param("seq", IntT(min=1), doc="tokens per training sequence")


def _tokenizer(a: dict) -> tuple[TokenizerInfo | None, list[Problem]]:
    tok = a.get("tokenizer")
    if not isinstance(tok, str) or tok == "bytes":
        return None, []
    try:
        return read_tokenizer(tok), []
    except TokenizerError as e:
        return None, [Problem("tokenizer", e.message, e.hint)]


def _text_constraints(a: dict) -> list[Problem]:
    return _tokenizer(a)[1]


def _jsonl_constraints(a: dict) -> list[Problem]:
    given = [k for k in ("field", "prompt", "response", "messages") if a.get(k) is not None]
    has_p, has_r = a.get("prompt") is not None, a.get("response") is not None
    if has_p != has_r:
        missing = "response" if has_p else "prompt"
        return [Problem("prompt" if has_p else "response",
                        f"'{missing}' is missing: instruction data names both fields",
                        f"add {missing}=\"...\" (the JSON field that holds the {missing})")]
    modes = [m for m in (("field",), ("prompt", "response"), ("messages",)) if any(k in given for k in m)]
    if len(modes) > 1:
        return [Problem(modes[1][0], "give one of field=... (plain text), prompt=/response= (instruction data) "
                        "or messages=... (chat records), not several")]
    info, problems = _tokenizer(a)
    if problems:
        return problems
    if a.get("messages") is not None and (info is None or info.chat_template is None):
        where = "tokenizer=\"bytes\" has none" if info is None else \
            f"'{info.file}' has no chat_template in its tokenizer_config.json"
        return [Problem("messages", f"chat records are rendered with the tokenizer's chat template, and {where}",
                        "name a checkpoint's tokenizer that has a chat template, or use prompt=/response=")]
    return []


BYTE_VOCAB = 256  # byte-level tokens: ids 0..255
# A sentence encoder's (anchor, positive) pairs: in-batch negatives need at least two
# pairs in a micro-batch (one pair alone has no negative, and its loss is 0).
MIN_PAIRS = 2


def data_vocab(source: str, args: dict) -> int | None:
    """How many token ids a data declaration can produce, known without reading it."""
    if source == "markov":
        return args.get("vocab")
    info, problems = _tokenizer(args)
    if info is not None:
        return info.vocab
    return BYTE_VOCAB if source in ("text", "jsonl", "stdlib_text") and not problems else None


_TOKENIZER = Param("tokenizer", TokenizerT(), "bytes",
                   "\"bytes\" (byte-level, 256 ids), or a tokenizer.json or a checkpoint folder holding one")

DATA_SOURCES = Registry("data source", {
    "text": Entry("text", (
        Param("path", PathT(), doc="a UTF-8 text file"),
        _SEQ,
        _TOKENIZER,
    ), "Plain text, tokenized as bytes or by a Hugging Face tokenizer, cut into sequences; the last 5% is "
       "the validation split.",
        constraints=_text_constraints),
    "jsonl": Entry("jsonl", (
        Param("path", PathT(), doc="a JSON-lines file, one record a line"),
        _SEQ,
        Param("field", StrT(), None, "the record field holding plain text", default_doc="text"),
        Param("prompt", StrT(), None, "instruction data: the field holding the prompt"),
        Param("response", StrT(), None, "instruction data: the field holding the response"),
        Param("messages", StrT(), None, "chat data: the field holding a list of {role, content} messages"),
        _TOKENIZER,
    ), "JSON lines: plain text from one field, prompt/response pairs, or chat records (loss on the responses "
       "only; rendered with the tokenizer's chat template when it has one), packed into sequences whose "
       "attention never crosses from one record to the next.",
        constraints=_jsonl_constraints),
    "markov": Entry("markov", (
        _SEQ,
        Param("seed", IntT(min=0), 0, "seed of the random chain"),
        Param("vocab", IntT(min=2, max=65536), 64, "number of symbols (token ids 0..vocab-1)"),
    ), "Synthetic text from a random Markov chain whose entropy rate is known exactly."),
    "stdlib_text": Entry("stdlib_text", (_SEQ, _TOKENIZER),
                         "Real English text that every Python install has (taken from the standard library).",
                         constraints=_text_constraints),
})

# ---------------------------------------------------------------- optimizers and schedules

OPTIMIZERS = Registry("optimizer", {
    "adamw": Entry("adamw", (
        Param("lr", FloatT(min=0, min_open=True), 1e-3, "learning rate"),
        Param("betas", ListT(FloatT(min=0, max=1, max_open=True), length=2), [0.9, 0.999],
              "moment decay rates"),
        Param("weight_decay", FloatT(min=0), 0.0, "decoupled weight decay"),
    ), "AdamW: Adam with decoupled weight decay.",
        paper="Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization (arXiv:1711.05101)"),
})

_WARMUP = Param("warmup", IntT(min=0), 0, "linear warm-up steps")
SCHEDULES = Registry("schedule", {
    "constant": Entry("constant", (), "Constant learning rate."),
    "linear": Entry("linear", (_WARMUP,), "Warm-up, then linear decay to zero."),
    "cosine": Entry("cosine", (_WARMUP,), "Warm-up, then cosine decay to zero.",
                    paper="Loshchilov & Hutter 2017, SGDR (arXiv:1608.03983)"),
})

_WEIGHTS = Param("weights", ListT(FloatT()), None, "one weight per snapshot (default: all 1)")
_BASE = Param("base", ModelT(), doc="the snapshot the task vectors are measured from (theta_i - base)")
_SCALE = Param("scale", FloatT(), 1.0, "multiplies the merged task vector")
MERGES = Registry("merge", {
    "linear": Entry("linear", (
        _WEIGHTS, Param("normalize", BoolT(), True, "divide by the sum of the weights"),
    ), "The weighted mean of the snapshots' weights (a model soup): sum_i w_i theta_i / sum_i w_i.",
        paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482)", min_operands=2),
    "task_arithmetic": Entry("task_arithmetic", (_BASE, _SCALE, _WEIGHTS), (
        "Adds the snapshots' task vectors to the base: base + scale * sum_i w_i (theta_i - base)."),
        paper="Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv:2212.04089)"),
    "ties": Entry("ties", (
        _BASE,
        Param("density", FloatT(min=0, max=1, min_open=True), 0.2, "fraction of each task vector kept (largest |delta|)"),
        _SCALE, _WEIGHTS,
    ), "TIES-Merging: trim each task vector to its largest entries, elect each entry's sign by total mass, "
       "and average the entries that agree with it.",
        paper="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)"),
    "dare": Entry("dare", (
        _BASE,
        Param("drop", FloatT(min=0, max=1, max_open=True), 0.9, "probability of dropping each task-vector entry"),
        Param("rescale", BoolT(), True, "divide the kept entries by 1 - drop, so the expectation is unchanged"),
        Param("seed", IntT(min=0), 0, "seed of the random drop"),
        _WEIGHTS,
    ), "DARE: drop task-vector entries at random and rescale the rest, then add them to the base.",
        paper="Yu et al. 2024, Language Models are Super Mario (arXiv:2311.03099)"),
})

# ---------------------------------------------------------------- techniques per statement


def _lora_targets(a: dict, targets: list) -> list[Problem]:
    rank = a.get("rank")
    if not isinstance(rank, int):
        return []
    for t in targets:
        i, o = t.module.shape
        if rank > min(i, o):
            return [Problem("rank", f"rank={rank} exceeds the width of '{t.path}' ({i} -> {o})",
                            f"a rank above min(in, out) = {min(i, o)} adds parameters but no expressiveness")]
    return []


def _paca_targets(a: dict, targets: list) -> list[Problem]:
    f = a.get("fraction")
    if not isinstance(f, (int, float)):
        return []
    for t in targets:
        i = t.module.shape[0]
        if round(f * i) < 1:
            return [Problem("fraction", f"fraction={f} of the {i} input columns of '{t.path}' is no column",
                            f"train at least one column: fraction >= {1 / i:.3g}")]
    return []


def _svfit_targets(a: dict, targets: list) -> list[Problem]:
    rank = a.get("rank")
    if not isinstance(rank, int):
        return []
    for t in targets:
        i, o = t.module.shape
        if rank > min(i, o):
            return [Problem("rank", f"rank={rank} exceeds the {min(i, o)} singular values of '{t.path}' ({i} -> {o})",
                            f"a {o} x {i} weight has min(in, out) = {min(i, o)} singular values: choose rank <= "
                            f"{min(i, o)}")]
    return []


def _nola_targets(a: dict, targets: list) -> list[Problem]:
    problems = _lora_targets(a, targets)
    rank, bases = a.get("rank"), a.get("bases")
    if problems or not isinstance(rank, int) or not isinstance(bases, int):
        return problems
    for t in targets:
        i, o = t.module.shape
        if 2 * bases > rank * (i + o):
            return [Problem("bases", f"bases={bases} trains {2 * bases} coefficients on '{t.path}' ({i} -> {o}), "
                            f"more than the {rank * (i + o)} numbers of a rank-{rank} LoRA, which can express every "
                            "update this NOLA can",
                            f"NOLA is for training fewer numbers than LoRA: choose bases <= {rank * (i + o) // 2}, "
                            f"or use lora(rank={rank})")]
    return []


def _mos_constraints(a: dict) -> list[Problem]:
    rank, pool, shards = a.get("rank"), a.get("pool"), a.get("shards")
    if isinstance(rank, int) and isinstance(pool, int) and isinstance(shards, int) and pool < rank * shards:
        return [Problem("pool", f"pool={pool} is smaller than rank x shards = {rank * shards}",
                        f"each weight draws rank x shards distinct shards from each pool: choose pool >= "
                        f"{rank * shards}")]
    return []


def _mos_targets(a: dict, targets: list) -> list[Problem]:
    problems = _lora_targets(a, targets)
    shards = a.get("shards")
    if problems or not isinstance(shards, int):
        return problems
    for t in targets:
        i, o = t.module.shape
        if i % shards or o % shards:
            return [Problem("shards", f"shards={shards} does not divide the widths of '{t.path}' ({i} -> {o})",
                            "each low-rank vector is cut into equal shards: choose a common divisor of "
                            f"{i} and {o}")]
    return []


def _embedding_rows_constraints(a: dict) -> list[Problem]:
    rows, count, data = a.get("rows"), a.get("count"), a.get("calibrate")
    if rows is not None and (count is not None or data is not None):
        return [Problem("rows" if count is None else "count", "give either rows=[...] or count= with calibrate=, "
                        "not both", "rows=[...] names the rows that train; count= with calibrate= chooses them "
                        "from data: keep one")]
    if rows is None and count is not None and data is None:
        return [Problem("count", f"count={count} needs calibrate=DATA: its {count} most frequent token ids are the "
                        "rows that train", "add calibrate= naming a data declaration, or list the rows: rows=[...]")]
    if rows is None and data is not None and count is None:
        return [Problem("calibrate", "calibrate= needs count=N: how many of the data's most frequent token ids train",
                        "for example count=64")]
    if rows is None and data is None:
        return [Problem("rows", "embedding_rows needs the rows that train: rows=[token ids], or count=N with "
                        "calibrate=DATA (the N most frequent token ids of that data)",
                        "for example embedding_rows(rows=[...]) or embedding_rows(count=64, calibrate=DATA)")]
    if rows is not None and not rows:
        return [Problem("rows", "rows=[] lists no row, so nothing would train", "list the token ids whose rows train")]
    if rows is not None and len(set(rows)) != len(rows):
        twice = next(r for r in rows if rows.count(r) > 1)
        return [Problem("rows", f"rows lists token id {twice} twice", "list each row once")]
    return []


def _embedding_rows_targets(a: dict, targets: list) -> list[Problem]:
    for t in targets:
        if t.path != "embed":  # blamed on the call: the selector chose the table
            return [Problem("", f"embedding_rows trains rows of the token embedding, and the selection holds "
                            f"'{t.path}', another table", "select the token embedding alone: <model>.embed")]
        vocab = t.module.shape[0]
        bad = [r for r in a.get("rows") or [] if r >= vocab]
        if bad:
            return [Problem("rows", f"row {bad[0]} is outside the vocabulary of {vocab} tokens",
                            f"token ids run from 0 to {vocab - 1}: are these ids from another tokenizer?")]
        if isinstance(a.get("count"), int) and a["count"] > vocab:
            return [Problem("count", f"count={a['count']} exceeds the vocabulary of {vocab} tokens",
                            "to train every row, train the embedding itself")]
    return []


_RANK = Param("rank", IntT(min=1), doc="rank r of the update B·A")
_ALPHA = Param("alpha", FloatT(min=0, min_open=True), None, "scale numerator: the update is (alpha/r)·B·A",
               default_doc="rank")
_DROPOUT = Param("dropout", FloatT(min=0, max=1, max_open=True), 0.0, "dropout on the adapter's input")
_INIT = Param("init", EnumT(("kaiming", "gaussian")), "kaiming", "initialisation of A (B starts at zero)")
_RSLORA = Param("rslora", BoolT(), False, "scale the update by alpha/sqrt(r) instead of alpha/r "
                "(rank-stabilized LoRA, Kalajdzievski 2023, arXiv:2312.03732)")
_SEED = Param("seed", IntT(min=0), 0, "seed of the fixed random choice")

ADAPTERS = Registry("adapter", {
    "lora": Entry("lora", (
        _RANK, _ALPHA, _DROPOUT,
        Param("init", EnumT(("kaiming", "gaussian", "pissa")), "kaiming",
              "initialisation: A kaiming-uniform or gaussian with B = 0; pissa: B·A is the weight's top-r "
              "singular part (scaled by r/alpha) and the frozen weight keeps the rest (Meng et al. 2024, PiSSA, "
              "arXiv:2404.02948)"),
        _RSLORA,
        Param("sparse_delta", BoolT(), False, "on a pruned weight, train the update masked by the weight's "
              "zeros, so merging keeps the sparsity exactly (a dense out x in update is formed each step)"),
        Param("per_loop", BoolT(), False, "one adapter per layer of a shared block, initialised from the truncated "
              "SVD of the difference between the original layer and its block (Relaxed Recursive Transformers)"),
    ), "Low-rank adaptation: a frozen weight W plus a trained low-rank update (alpha/r)·B·A.",
        paper="Hu et al. 2021, LoRA (arXiv:2106.09685)", targets=("linear",),
        target_constraints=_lora_targets),
    "dora": Entry("dora", (_RANK, _ALPHA, _DROPOUT, _INIT, _RSLORA), (
        "Weight-decomposed low-rank adaptation: W' = m·(W + (alpha/r)·B·A) / ||W + (alpha/r)·B·A||, the norm "
        "taken per output row and detached (as PEFT computes it); the magnitude m starts at ||W||. "
        "The only adapter on its weight."),
        paper="Liu et al. 2024, DoRA (arXiv:2402.09353)", targets=("linear",),
        target_constraints=_lora_targets, exclusive=True),
    "ia3": Entry("ia3", (), (
        "Learned scaling vectors (start at 1): the output of each target, except an MLP's down projection, "
        "whose input is scaled (PEFT's feedforward modules). Typical targets: attn.{k,v} and mlp.down. "
        "The only adapter on its weight."),
        paper="Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning (IA3) (arXiv:2205.05638)",
        targets=("linear",), exclusive=True),
    "paca": Entry("paca", (
        Param("fraction", FloatT(min=0, max=1, min_open=True), doc="fraction of each weight's input columns that train"),
        _SEED,
    ), "Partial connection adaptation: a seeded random choice of round(fraction x in) input columns of each weight "
       "trains in place; the rest stays frozen. Only those columns have gradients and optimizer state, and only "
       "their inputs are saved. The only adapter on its weight.",
        paper="Woo et al. 2025, PaCA: Partial Connection Adaptation for Efficient Fine-Tuning (arXiv:2503.01905)",
        targets=("linear",), target_constraints=_paca_targets, exclusive=True),
    "svfit": Entry("svfit", (
        Param("rank", IntT(min=1), doc="how many of the largest singular values train"),
    ), "Singular-value fine-tuning: W = U·diag(s)·V^T; the top-r singular values train (starting at the weight's "
       "own), the singular vectors and the rest of the weight stay frozen: r trained numbers per weight.",
        paper="Sun et al. 2024, SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular "
              "Values (arXiv:2409.05926)", targets=("linear",),
        target_constraints=_svfit_targets),
    "nola": Entry("nola", (
        _RANK,
        Param("bases", IntT(min=1), 64, "random basis matrices for each of A and B"),
        _ALPHA,
        Param("seed", IntT(min=0), 0, "seed of the random bases (made again from it, never stored)"),
    ), "LoRA whose A and B are linear combinations of fixed random bases: only the mixing coefficients train "
       "(2 x bases numbers per weight; b starts at zero). The bases are made again from the seed whenever the "
       "model is built, never stored. Merges exactly.",
        paper="Koohpayegani et al. 2024, NOLA: Compressing LoRA using Linear Combination of Random Basis "
              "(arXiv:2310.02556)", targets=("linear",),
        target_constraints=_nola_targets),
    "mos": Entry("mos", (
        _RANK,
        Param("pool", IntT(min=1), doc="shards in each pool, shared by every selected weight of one shape"),
        Param("shards", IntT(min=1), 1, "shards each low-rank vector is cut into"),
        _ALPHA, _SEED,
    ), "Mixture of shards: LoRA whose low-rank vectors are concatenations of shards drawn (by a fixed seeded "
       "choice, rank x shards distinct shards per weight) from two pools that every weight of one shape in the "
       "statement shares; A and B draw independently. The B pool starts at zero. Merges exactly.",
        paper="Wang et al. 2024, MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of "
              "Shards (arXiv:2410.00938)", targets=("linear",),
        constraints=_mos_constraints, target_constraints=_mos_targets),
    "bottleneck": Entry("bottleneck", (
        Param("size", IntT(min=1), doc="bottleneck width"),
        Param("mode", EnumT(("series", "parallel")), "series",
              "series: after the sublayer, on its output (Houlsby et al. 2019); parallel: beside it, from its "
              "input (He et al. 2022)"),
        Param("scale", FloatT(min=0, min_open=True), 1.0, "factor on the adapter's output (He et al.'s scaled "
              "parallel adapter uses 4)"),
    ), "Bottleneck adapters on attention or MLP sublayers: scale·up(relu(down(h))) added to the sublayer's output "
       "before the residual add, with h that output (series) or the sublayer's input (parallel); up starts at "
       "zero. Select sublayers (layers[*].mlp), or blocks for both. A series adapter reads the output with the "
       "adapters declared before it on the output projection (declare it after a LoRA there to adapt the adapted "
       "sublayer). Nonlinear: they cannot be merged into the weights.",
        paper="Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP (arXiv:1902.00751); He et al. "
              "2022, Towards a Unified View of Parameter-Efficient Transfer Learning (arXiv:2110.04366)",
        targets=("attention", "mlp"),
        unmergeable="a bottleneck adapter is a small nonlinear network (up(relu(down(h)))), which no weight of the "
                    "model can absorb"),
    "prompt": Entry("prompt", (
        Param("length", IntT(min=1), doc="virtual tokens prepended to every sequence"),
        Param("init", EnumT(("vocab", "random")), "vocab",
              "vocab: rows of the embedding of seeded random tokens; random: N(0, 0.02)"),
    ), "Soft prompt tuning: trained embeddings of virtual tokens prepended to every sequence; the model is frozen. "
       "Adapt the whole model: adapt m with prompt(length=20).",
        paper="Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning (arXiv:2104.08691)",
        targets=("model",), exclusive=True,
        unmergeable="a soft prompt is extra input positions, not a change to any weight"),
    "embedding_rows": Entry("embedding_rows", (
        Param("rows", ListT(IntT(min=0)), None, "the token ids whose embedding rows train"),
        Param("count", IntT(min=1), None, "train the rows of the count most frequent token ids of calibrate= "
              "(ties to the smaller id)"),
        Param("calibrate", DataT(), None, "data whose token frequencies choose the rows: its train split, or the "
              "split named (data.validation)"),
    ), "Embedding-row tuning: only the chosen rows of the token embedding train, in place; every other weight, "
       "the rest of the table included, stays frozen, and a tied head reads the trained rows too. Only those "
       "rows have gradients and optimizer state. The row index is stored with the model, so later stages, "
       "exports and generate never read the calibration data again. Merges exactly.",
        paper="Yuan et al. 2024, KS-Lottery: Finding Certified Lottery Tickets for Multilingual Language Models "
              "(arXiv:2402.02801)", targets=("embedding",),
        constraints=_embedding_rows_constraints, target_constraints=_embedding_rows_targets),
    "peft": Entry("peft", (
        Param("path", PathT(), doc="a folder PEFT's save_pretrained wrote (adapter_config.json, adapter_model.safetensors)"),
    ), "Import a PEFT adapter (LoRA, LoRA with use_dora, IA3 or prompt tuning) as effc's lora, dora, ia3 or prompt "
       "adapters on the modules its adapter_config.json targets, starting from its weights. Adapt the whole model: "
       "adapt m with peft(\"dir\").",
        targets=("model",)),
})

def _recursive_targets(a: dict, targets: list) -> list[Problem]:
    blocks, n = a.get("blocks"), len(targets)
    if isinstance(blocks, int) and n % blocks:
        return [Problem("blocks", f"blocks={blocks} does not divide the {n} selected layers: layer i uses block "
                        "i mod blocks, so every block must loop the same number of times",
                        f"choose blocks among the divisors of {n}: {', '.join(str(d) for d in range(1, n + 1) if n % d == 0)}")]
    return []


SHARING = Registry("sharing technique", {
    "recursive": Entry("recursive", (
        Param("blocks", IntT(min=1), doc="shared blocks K: the N selected layers become K blocks looped N/K times, "
              "layer i using block i mod K"),
        Param("init", EnumT(("average", "stepwise", "lower")), "average",
              "what each block starts from: the mean of the layers that use it, every (N/K)-th layer, or the "
              "first K layers"),
    ), "Relaxed Recursive Transformers: consecutive layers share K blocks applied in a cycle; add "
       "lora(..., per_loop=true) to give each layer its own low-rank correction.",
        paper="Bae et al. 2024, Relaxed Recursive Transformers (arXiv:2410.20672)", targets=("block",),
        target_constraints=_recursive_targets),
})


def _columns_divisible(arg: str, what: str):
    def check(a: dict, targets: list) -> list[Problem]:
        k = a.get(arg)
        if not isinstance(k, int):
            return []
        bad = [t for t in targets if t.module.shape and t.module.shape[0] % k]
        if bad:
            return [Problem(arg, f"{arg}={k} does not divide the input width {bad[0].module.shape[0]} of "
                            f"'{bad[0].path}': {what}",
                            f"choose an {arg} that divides every selected layer's input width")]
        return []
    return check


def _nm_constraints(a: dict) -> list[Problem]:
    n, m = a.get("n"), a.get("m")
    if isinstance(n, int) and isinstance(m, int) and n >= m:
        return [Problem("n", f"n={n} keeps every weight of a group of m={m}", "n must be below m, as in n=2, m=4")]
    return []


def _wanda_constraints(a: dict) -> list[Problem]:
    s, n, m = a.get("sparsity"), a.get("n"), a.get("m")
    if (s is None) == (n is None):
        return [Problem("sparsity", "give either sparsity= (unstructured) or n= and m= (N:M), not both"
                        if s is not None else "wanda needs sparsity= or n= with m=",
                        "for example wanda(sparsity=0.5, calibrate=DATA) or wanda(n=2, m=4, calibrate=DATA)")]
    if (n is None) != (m is None):
        return [Problem("m" if m is None else "n", "n= and m= go together: keep n of every m weights",
                        "for example wanda(n=2, m=4, calibrate=DATA)")]
    return _nm_constraints(a)


def _wanda_targets(a: dict, targets: list) -> list[Problem]:
    return _columns_divisible("m", "N:M groups run along it")(a, targets) if a.get("m") else []


def _drop_count(a: dict, targets: list) -> list[Problem]:
    if isinstance(a.get("count"), int) and a["count"] > len(targets):
        return [Problem("count", f"count={a['count']} is more than the {len(targets)} selected layers",
                        f"drop at most {len(targets)}, or select more layers")]
    return []


_SPARSITY = Param("sparsity", FloatT(min=0, max=1, max_open=True), doc="fraction of the weights set to zero")
_CALIBRATE = Param("calibrate", DataT(), doc="data whose activations score the weights (its train split, or the "
                   "split named)")
_SAMPLES = Param("samples", IntT(min=1), 64, "calibration sequences read")

PRUNERS = Registry("pruning method", {
    "magnitude": Entry("magnitude", (
        _SPARSITY,
        Param("scope", EnumT(("tensor", "global")), "tensor",
              "rank weights within each tensor, or across all selected tensors together"),
    ), "Unstructured magnitude pruning: the smallest-|w| weights become zero and stay zero through later "
       "training.", paper="Han et al. 2015, Learning both Weights and Connections (arXiv:1506.02626)",
        targets=("linear",)),
    "nm": Entry("nm", (
        Param("n", IntT(min=1), 2, "weights kept per group"),
        Param("m", IntT(min=2), 4, "consecutive input weights per group"),
    ), "N:M semi-structured sparsity by magnitude: n of every m consecutive input weights are kept.",
        paper="Mishra et al. 2021, Accelerating Sparse Deep Neural Networks (arXiv:2104.08378)",
        targets=("linear",), constraints=_nm_constraints,
        target_constraints=_columns_divisible("m", "N:M groups run along it")),
    "wanda": Entry("wanda", (
        Param("sparsity", FloatT(min=0, max=1, max_open=True), None,
              "fraction of each output row's weights set to zero"),
        Param("n", IntT(min=1), None, "N:M instead: weights kept per group"),
        Param("m", IntT(min=2), None, "N:M instead: consecutive input weights per group"),
        _CALIBRATE, _SAMPLES,
    ), "Wanda: weights scored by |w| times the L2 norm of their input over calibration data, pruned per "
       "output row (or per N:M group); no retraining.",
        paper="Sun et al. 2023, A Simple and Effective Pruning Approach for LLMs (arXiv:2306.11695)",
        targets=("linear",), constraints=_wanda_constraints, target_constraints=_wanda_targets),
    "heads": Entry("heads", (
        Param("fraction", FloatT(min=0, max=1, min_open=True, max_open=True),
              doc="fraction of each selected attention's heads removed (whole key/value groups under "
                  "grouped-query attention), the least important by weight magnitude"),
    ), "Structured head pruning: the q, k, v rows and o columns of the removed heads are deleted, so the "
       "tensors, the parameter count and the FLOPs shrink.",
        paper="Michel et al. 2019, Are Sixteen Heads Really Better than One? (arXiv:1905.10650)",
        targets=("attention",)),
    "channels": Entry("channels", (
        Param("fraction", FloatT(min=0, max=1, min_open=True, max_open=True),
              doc="fraction of each selected MLP's intermediate channels removed, the least important by "
                  "weight magnitude"),
    ), "Structured MLP pruning: the gate and up rows and down columns of the removed channels are deleted.",
        paper="Ma et al. 2023, LLM-Pruner (arXiv:2305.11627)", targets=("mlp",)),
    "drop_sublayers": Entry("drop_sublayers", (
        Param("kind", EnumT(("attn", "mlp")), doc="which sublayers are dropped: attention or MLP"),
        Param("count", IntT(min=1), doc="how many of the selected layers lose that sublayer"),
        _CALIBRATE, _SAMPLES,
    ), "Drops whole attention or MLP sublayers (their residual branch) where the residual stream changes "
       "least: the count with the highest cosine similarity between the sublayer's input and output on "
       "calibration data, chosen at run time. Pre-norm models.",
        paper="He et al. 2024, What Matters in Transformers? Not All Attention is Needed (arXiv:2406.15786)",
        targets=("block",), target_constraints=_drop_count),
})


def _int4_constraints(a: dict) -> list[Problem]:
    if a.get("method") == "gptq" and a.get("calibrate") is None:
        return [Problem("calibrate", "method=gptq needs calibrate=DATA: its layer inputs weigh the rounding errors",
                        "add calibrate= naming a data declaration, or use method=rtn")]
    if a.get("method") == "rtn" and a.get("calibrate") is not None:
        return [Problem("calibrate", "method=rtn reads no data", "drop calibrate=, or use method=gptq")]
    return []


_GROUP = Param("group", IntT(min=32, max=256), 64, "input columns that share one scale")
QUANTIZERS = Registry("quantization scheme", {
    "int8": Entry("int8", (), "Weight-only int8, one symmetric scale per output channel, round-to-nearest; "
                  "the weights are frozen and run through a dequantize-and-multiply op.",
                  paper="Dettmers et al. 2022, LLM.int8() (arXiv:2208.07339)", targets=("linear",)),
    "int4": Entry("int4", (
        _GROUP,
        Param("method", EnumT(("rtn", "gptq")), "rtn", "round to nearest, or GPTQ's error-compensating rounding"),
        Param("calibrate", DataT(), None, "GPTQ: data whose layer inputs weigh the rounding errors"),
        _SAMPLES,
    ), "Weight-only int4 in groups, asymmetric (a scale and an integer zero point per group), packed two "
       "weights per byte; frozen.", paper="Frantar et al. 2022, GPTQ (arXiv:2210.17323)", targets=("linear",),
        constraints=_int4_constraints, target_constraints=_columns_divisible("group", "each group of input "
                                                                              "columns shares a scale")),
    "nf4": Entry("nf4", (
        _GROUP,
        Param("double_quant", BoolT(), True, "store the block scales in 8 bits (QLoRA's double quantization)"),
    ), "NormalFloat4: 4-bit codes from the quantiles of a normal distribution, one absmax scale per block; "
       "frozen, the base of QLoRA.", paper="Dettmers et al. 2023, QLoRA (arXiv:2305.14314)",
        targets=("linear",), target_constraints=_columns_divisible("group", "each block of input columns "
                                                                    "shares a scale")),
    "qat": Entry("qat", (
        Param("bits", IntT(min=2, max=8), 4, "bits per weight (signed, symmetric)"),
        Param("group", IntT(min=1), 64, "input columns that share one learned step"),
    ), "Quantization-aware training: the weight is fake-quantized with a learned step per group (LSQ) "
       "in every forward, so later training adapts to the rounding; with LoRA on the weight, the "
       "merged weight W + s*B*A is what is quantized, and the LoRA and the steps train (L4Q).",
        paper="Esser et al. 2019, LSQ (arXiv:1902.08153); Jeon et al. 2024, L4Q (arXiv:2402.04902)",
        targets=("linear",), target_constraints=_columns_divisible("group", "each group of input columns "
                                                                    "shares a step")),
})

# The registry each technique statement draws from.
TECHNIQUES: dict[str, Registry] = {
    "adapt": ADAPTERS, "share": SHARING, "prune": PRUNERS, "quantize": QUANTIZERS,
}
# Registries reachable through a CallT parameter.
CALLABLES: dict[str, Registry] = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES}

# Statements whose implementation has not landed (all their operands are still checked).
PLANNED_STATEMENTS: dict[str, str] = {}

# ---------------------------------------------------------------- statement options

METRICS = EnumT(("loss", "perplexity", "similarity"))
EXPORT_FORMATS = EnumT(("effc", "hf", "peft", "compressed_tensors"))

STATEMENTS: dict[str, Entry] = {
    "train": Entry("train", (
        Param("steps", IntT(min=1), doc="optimizer steps"),
        Param("batch", IntT(min=1), 8, "sequences per optimizer step"),
        Param("accumulate", IntT(min=1), 1, "micro-batches accumulated per step"),
        Param("optimizer", CallT("optimizer"), None, "the optimizer", default_doc="adamw()"),
        Param("schedule", CallT("schedule", bare_ok=True), None, "learning-rate schedule",
              default_doc="constant"),
        Param("clip", FloatT(min=0, min_open=True), None, "clip the gradient norm to this value"),
        Param("seed", IntT(min=0), 0, "seed for initialisation, data order and dropout"),
        Param("checkpoint_every", IntT(min=1), None, "write a resumable checkpoint every N steps"),
        Param("eval_every", IntT(min=1), None, "evaluate on the validation split every N steps"),
        Param("distill_from", ModelT(), None, "teacher model or snapshot: train on the KL divergence from its "
              "next-token distributions instead of the data's tokens (Hinton et al. 2015)"),
        Param("temperature", FloatT(min=0, min_open=True), 1.0, "distillation temperature (the loss is scaled by "
              "its square)"),
    ), "Train the model's trainable parameters on the data."),
    "eval": Entry("eval", (
        Param("metrics", ListT(METRICS), ["loss"], "what to measure"),
        Param("against", ModelT(), None, "a model or snapshot to compare with"),
        Param("samples", IntT(min=1), None, "evaluate on at most this many sequences"),
    ), "Evaluate the model on the data."),
    "export": Entry("export", (
        Param("format", EXPORT_FORMATS, "effc", "file format"),
        Param("merge_adapters", BoolT(), False, "fold adapters into the base weights"),
    ), "Write the model to a folder."),
    "budget": Entry("budget", (
        Param("memory", SizeT(), doc="peak memory the run may use, per device"),
        Param("devices", IntT(min=1), 1, "data-parallel processes per node (GPUs, or CPU processes)"),
        Param("nodes", IntT(min=1), 1, "nodes (machines) the run spans"),
    ), "Resource budget the cost estimate and the planner must respect."),
}

# Data splits a data declaration provides (`corpus.validation`).
DATA_SPLITS = ("train", "validation")


def all_registries() -> dict[str, Registry]:
    """Every registry by a stable key, for the docs, the editors and the language server."""
    return {
        "family": FAMILIES, "data": DATA_SOURCES, "optimizer": OPTIMIZERS,
        "schedule": SCHEDULES, "merge": MERGES, "adapt": ADAPTERS, "share": SHARING,
        "prune": PRUNERS, "quantize": QUANTIZERS,
    }


def enum_choices() -> dict[str, str]:
    """Every bare-name choice in the language -> where it is a choice (for shadowing)."""
    out: dict[str, str] = {}
    groups = [(e.name, e.params) for r in all_registries().values() for e in r.entries.values()]
    groups += [(name, e.params) for name, e in STATEMENTS.items()]
    for owner, params in groups:
        for p in params:
            t = p.type.item if isinstance(p.type, ListT) else p.type
            if isinstance(t, EnumT):
                for c in t.choices:
                    out.setdefault(c, f"{owner}({p.name}=...)")
    for name in SCHEDULES.entries:
        out.setdefault(name, "train(schedule=...)")
    return out


__all__ = ["REQUIRED", "FAMILIES", "DATA_SOURCES", "OPTIMIZERS", "SCHEDULES", "MERGES",
           "ADAPTERS", "SHARING", "PRUNERS", "QUANTIZERS", "TECHNIQUES", "CALLABLES",
           "PLANNED_STATEMENTS", "STATEMENTS", "DATA_SPLITS", "all_registries", "enum_choices"]
