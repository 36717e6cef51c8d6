"""`effc generate`: the incremental evaluator against the fx graph the training runs
(prefill and every cached step, 1e-5), greedy decoding against transformers' `generate`
on checkpoints transformers wrote, sampling against its formula, and the command on run
folders, exports and checkpoints, including every mistake a user can make."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers as T
from typer.testing import CliRunner

from effc.cli import app
from effc.compiler.pipeline import model_ir
from effc.lang.check import check_source
from effc.runtime.generate import (
    ByteTokenizer, Decoder, GenerateError, Sampling, choose, generate, load,
)
from effc.runtime.hf import load as hf_load
from effc.runtime.model import materialize, state_of
from effc.runtime.run import RunOptions, run_pipeline

runner = CliRunner()
SEQ = 32


pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- models

LORA_PIPELINE = """pipeline g
model m = decoder(vocab=61, dim=32, layers=2, heads=4, kv_heads={kv}, ffn=48, seq=32, tied=true)
data d = markov(seq=32, vocab=61)
stage s:
    adapt m.layers[*].attn.{{q,v}} with lora(rank=4, alpha=8)
    adapt m.layers[*].attn.k with lora(rank=2, alpha=6)
    adapt m.head with lora(rank=2)
    train m on d (steps=1)
"""


# DoRA and IA3 rescale the weight they adapt: the incremental evaluator must call the
# same kind functions (before/after) the training graph does.
RESCALING_PIPELINE = """pipeline g
model m = decoder(vocab=61, dim=32, layers=2, heads=4, kv_heads=2, ffn=48, seq=32)
data d = markov(seq=32, vocab=61)
stage s:
    adapt m.layers[*].attn.{q,v} with dora(rank=4, alpha=8)
    adapt m.layers[*].attn.k with ia3()
    adapt m.layers[*].mlp.down with ia3()
    adapt m.layers[*].mlp.up with lora(rank=2)
    train m on d (steps=1)
"""


def _perturbed(ir, seq: int, seed: int):
    """A random state in which every param matters: LoRA's B and the norms moved off
    their initial 0 and 1."""
    gm, _ = materialize(ir, seq, {}, seed)
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state_of(gm, ir).items()}


def _decoder_with_lora(kv: int, src: str = LORA_PIPELINE):
    r = check_source(src.format(kv=kv) if src is LORA_PIPELINE else src, "g.eff")
    assert r.ok, r.diagnostics
    ir, _ = model_ir(r, "m", None)
    gm, _ = materialize(ir, SEQ, _perturbed(ir, SEQ, kv), 0, output="logits")
    return ir, gm.eval(), SEQ


HF = {
    "llama_gqa": lambda: T.LlamaConfig(
        vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, rope_theta=500.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8}),
    "gpt2": lambda: T.GPT2Config(vocab_size=300, n_embd=48, n_layer=2, n_head=4, n_positions=SEQ,
                                 bos_token_id=0, eos_token_id=0),
    "bert": lambda: T.BertConfig(vocab_size=300, hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=80, max_position_embeddings=SEQ),
}


def _write_hf(name: str, folder: Path) -> Path:
    torch.manual_seed(sorted(HF).index(name))
    cfg = HF[name]()
    model = (T.AutoModel if name == "bert" else T.AutoModelForCausalLM).from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: _write_hf(name, root / name) for name in HF}


def _model(kind: str, ckpt):
    if kind == "decoder_dora_ia3":
        return _decoder_with_lora(kv=2, src=RESCALING_PIPELINE)
    if kind.startswith("decoder"):
        return _decoder_with_lora(kv=2 if kind == "decoder_gqa_lora" else 4)
    _, ir, gm = hf_load(str(ckpt[kind]), output="logits")
    return ir, gm.eval(), SEQ


KINDS = ["decoder_lora", "decoder_gqa_lora", "decoder_dora_ia3", "llama_gqa", "gpt2"]


# ---------------------------------------------------------------- against the fx graph


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_equals_the_fx_graph(kind, ckpt):
    ir, gm, seq = _model(kind, ckpt)
    vocab = gm.embed.weight.shape[0]
    x = torch.randint(0, vocab, (2, 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = gm(x)
    got = Decoder(ir, gm, seq).step(x)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_each_cached_step_equals_a_full_recompute(kind, ckpt):
    """Prompt of 5, then one token a step up to the seq limit: step j's logits are the
    fx graph's last row on the first j+1 tokens (rotary and position rows at the end of
    the table included)."""
    ir, gm, seq = _model(kind, ckpt)
    vocab = gm.embed.weight.shape[0]
    x = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(6))
    dec = Decoder(ir, gm, seq)
    dec.step(x[:, :5])
    for j in range(5, seq):
        got = dec.step(x[:, j:j + 1])[:, -1]
        with torch.no_grad():
            want = gm(x[:, :j + 1])[:, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"step at position {j}")
    assert dec.pos == seq
    with pytest.raises(ValueError, match="past the model's seq"):
        dec.step(x[:, :1])


def test_the_evaluator_reads_the_adapters(ckpt):
    """Zeroing one LoRA's B changes the logits: the adapters are not skipped."""
    ir, gm, seq = _decoder_with_lora(kv=2)
    x = torch.arange(10)[None]
    before = Decoder(ir, gm, seq).step(x)
    with torch.no_grad():
        gm.get_parameter("head.lora2.B").zero_()
    after = Decoder(ir, gm, seq).step(x)
    assert (before - after).abs().max() > 1e-3


# ---------------------------------------------------------------- against transformers


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_greedy_tokens_equal_transformers_generate(ckpt, name):
    ref = T.AutoModelForCausalLM.from_pretrained(ckpt[name]).eval()
    loaded = load(ckpt[name])
    said = set()
    for seed in range(3):
        prompt = torch.randint(0, 300, (1, 4 + seed), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want = ref.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=16,
                                pad_token_id=0)[0, prompt.shape[1]:].tolist()
        got = generate(loaded.decoder, prompt[0].tolist(), 16, Sampling(), loaded.eos)
        assert got.tokens == want
        said |= set(want)
    assert len(said) > 3  # the models say something, not one token forever


# ---------------------------------------------------------------- sampling


def test_sampling_follows_top_p_and_top_k():
    """softmax([2, 1, 0, -1]) = [.644, .237, .087, .032]: top_p=0.7 keeps the first two
    (the likelier mass before token 1 is .644 < .7, before token 2 .881), renormalised
    to [.731, .269]; top_k=3 keeps three; temperature 0 is the argmax."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    gen = torch.Generator().manual_seed(0)
    n = 4000
    c = Counter(choose(logits, Sampling(1.0, top_p=0.7), gen) for _ in range(n))
    assert set(c) == {0, 1} and abs(c[0] / n - 0.731) < 0.03
    c = Counter(choose(logits, Sampling(1.0, top_k=3), gen) for _ in range(n))
    p = torch.softmax(logits[:3], -1)
    assert set(c) == {0, 1, 2} and all(abs(c[i] / n - p[i]) < 0.03 for i in range(3))
    assert choose(logits, Sampling(0.0), gen) == 0
    assert choose(logits, Sampling(0.5, top_p=0.01), gen) == 0


def test_a_seed_gives_the_same_tokens_and_top_k_1_is_greedy(ckpt):
    loaded = load(ckpt["llama_gqa"])
    prompt = [5, 17, 99]
    one = generate(loaded.decoder, prompt, 20, Sampling(1.5, seed=3)).tokens
    assert one == generate(loaded.decoder, prompt, 20, Sampling(1.5, seed=3)).tokens
    assert one != generate(loaded.decoder, prompt, 20, Sampling(1.5, seed=4)).tokens
    greedy = generate(loaded.decoder, prompt, 20, Sampling()).tokens
    assert generate(loaded.decoder, prompt, 20, Sampling(1.5, top_k=1, seed=3)).tokens == greedy


def test_stops_at_eos_and_at_the_seq_limit(ckpt):
    loaded = load(ckpt["llama_gqa"])
    greedy = generate(loaded.decoder, [5, 17, 99], 10).tokens
    stopped = generate(loaded.decoder, [5, 17, 99], 10, eos=(greedy[3],))
    assert stopped.tokens == greedy[:greedy.index(greedy[3]) + 1] and stopped.stop == "eos"
    full = generate(loaded.decoder, [5] * 30, 10)  # positions 30, 31 are read; the token after 31 is not
    assert len(full.tokens) == 3 and full.stop == "seq"
    with pytest.raises(GenerateError, match="longer than the model's seq of 32"):
        generate(loaded.decoder, [5] * 33, 10)


def test_bytes_decode_with_replacement():
    tok = ByteTokenizer()
    assert tok.encode("héllo") == list("héllo".encode())
    assert tok.decode(tok.encode("héllo") + [300, 0xC3]) == "héllo\ufffd\ufffd"


# ---------------------------------------------------------------- the command

RUN_PIPELINE = """pipeline tiny_gen

param rank = 2

model m = decoder(vocab=256, dim=32, layers=2, heads=4, kv_heads=2, ffn=64, seq=48)
data d = text("data.txt", seq=48)

stage pre:
    train m on d (steps=3, batch=2, optimizer=adamw(lr=1e-2))

stage tune:
    adapt m.layers[*].attn.{q,v} with lora(rank=rank, alpha=4)
    adapt m.layers[*].attn.k with ia3()
    adapt m with prompt(length=2)
    train m on d (steps=3, batch=2, optimizer=adamw(lr=1e-2))

export m to "out" (format=effc)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("run")
    (d / "data.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    (d / "p.eff").write_text(RUN_PIPELINE)
    over = {"rank": "3"}  # generate must rebuild the rank-3 adapters from pipeline.eff's header
    r = check_source(RUN_PIPELINE, str(d / "p.eff"), overrides=over)
    assert r.ok, r.diagnostics
    run_pipeline(r, d / "p.eff", RunOptions(d / "run"), overrides=over)
    return d


def _gen(*args):
    r = runner.invoke(app, ["generate", *map(str, args)])
    assert "Traceback" not in r.stdout + r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # no uncaught error
    return r


def test_generate_on_a_run_its_stages_and_its_export(run):
    last = _gen(run / "run", "--prompt", "the quick", "--max-new-tokens", "12")
    assert last.exit_code == 0, last.stderr
    assert last.stdout.startswith("the quick") and len(last.stdout.rstrip("\n")) > len("the quick")
    assert "m@tune of run" in last.stderr and "9 prompt + 12 new tokens (greedy)" in last.stderr
    pre = _gen(run / "run", "--prompt", "the quick", "--max-new-tokens", "12", "--stage", "pre")
    assert pre.exit_code == 0 and "m@pre" in pre.stderr
    export = _gen(run / "out", "--prompt", "the quick", "--max-new-tokens", "12")
    assert export.exit_code == 0 and "export" in export.stderr
    assert export.stdout == last.stdout  # the unmerged export is the run's last snapshot, adapters and all
    sampled = [_gen(run / "run", "--prompt", "the", "--temperature", "1.0", "--seed", s, "--max-new-tokens", "20")
               for s in (1, 1, 2)]
    assert sampled[0].stdout == sampled[1].stdout != sampled[2].stdout


def test_the_run_is_read_from_any_folder(run, tmp_path, monkeypatch):
    """The run's pipeline.eff names data.txt relative to p.eff: rechecking it works from
    another working folder too (run.json records p.eff's absolute path here)."""
    monkeypatch.chdir(tmp_path)
    assert _gen(run / "run", "--prompt", "a").exit_code == 0


WORDS = ["[UNK]", "hello", "world", "the", "model", "says"] + [f"w{i}" for i in range(294)]  # 300 ids


def _tokenizer(folder: Path) -> None:
    """A word-level tokenizer.json over the checkpoint's 300 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.save(str(folder / "tokenizer.json"))


def test_generate_on_a_checkpoint_with_its_tokenizer(ckpt, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(ckpt["llama_gqa"], folder)
    _tokenizer(folder)
    r = _gen(folder, "--prompt", "hello world", "--max-new-tokens", "5")
    assert r.exit_code == 0, r.stderr
    loaded = load(folder)
    want = generate(loaded.decoder, [1, 2], 5, eos=loaded.eos).tokens
    assert r.stdout.split() == ["hello", "world"] + [WORDS[i] for i in want]


def test_an_effc_export_of_a_checkpoint_reads_its_source_config(ckpt, tmp_path):
    src = tmp_path / "gpt2"
    shutil.copytree(ckpt["gpt2"], src)
    eff = tmp_path / "p.eff"
    eff.write_text(f'pipeline h\nmodel m = hf("{src}", seq={SEQ})\ndata d = markov(seq={SEQ}, vocab=256)\n'
                   'stage s:\n    export m to "raw" (format=effc)\n'
                   "    train m on d (steps=1, batch=1, optimizer=adamw(lr=1e-2))\n"
                   'export m to "out" (format=effc)\n')
    r = check_source(eff.read_text(), str(eff))
    assert r.ok, r.diagnostics
    run_pipeline(r, eff, RunOptions(tmp_path / "run"))
    direct, raw, trained, from_run = (_gen(f, "--prompt", "hi there", "--max-new-tokens", "6")
                                      for f in (src, tmp_path / "raw", tmp_path / "out", tmp_path / "run"))
    assert {r.exit_code for r in (direct, raw, trained, from_run)} == {0}, raw.stderr + trained.stderr + from_run.stderr
    assert direct.stdout == raw.stdout and trained.stdout == from_run.stdout
    assert "m@s of run" in from_run.stderr
    shutil.rmtree(src)  # an effc export of hf(...) keeps no architecture of its own
    gone = _gen(tmp_path / "out", "--prompt", "hi")
    assert gone.exit_code == 2 and "source checkpoint's config.json" in gone.stderr and "format=hf" in gone.stderr


def test_mistakes_are_one_message_with_a_hint(ckpt, run, tmp_path):
    (tmp_path / "empty").mkdir()
    two = tmp_path / "two"
    shutil.copytree(run / "run", two)
    models = next((two / "stages").glob("01_*")) / "models"
    shutil.copy(models / "m.safetensors", models / "n.safetensors")
    cases = [
        ([tmp_path / "nowhere", "--prompt", "x"], 2, "does not exist"),
        ([tmp_path / "empty", "--prompt", "x"], 2, "is not a run folder, an effc export or a Hugging Face checkpoint"),
        ([ckpt["bert"], "--prompt", "x"], 2, "is an encoder"),
        ([ckpt["gpt2"], "--prompt", "x" * 40], 2, "longer than the model's seq of 32"),
        ([ckpt["gpt2"], "--prompt", ""], 2, "the prompt is empty"),
        ([run / "run", "--prompt", "x", "--stage", "pretrain"], 2, "no stage 'pretrain'"),
        ([run / "run", "--prompt", "x", "--model", "tiny"], 2, "no snapshot of model 'tiny'"),
        ([two, "--prompt", "x"], 2, "holds 2 models (m, n)"),
        ([ckpt["gpt2"], "--prompt", "x", "--stage", "pre"], 2, "--model and --stage choose within a run folder"),
        ([ckpt["gpt2"], "--prompt", "x", "--top-p", "0"], 2, "--top-p 0.0 is outside (0, 1]"),
        ([ckpt["gpt2"], "--prompt", "x", "--temperature", "-1"], 2, "--temperature -1.0 is negative"),
    ]
    for args, status, message in cases:
        r = _gen(*args)
        assert r.exit_code == status and message in r.stderr, (args, r.exit_code, r.stderr)
        assert "= hint:" in r.stderr, args


SMALL = """pipeline small
model m = decoder(vocab=16, dim=16, layers=1, heads=2, ffn=32, seq=16)
data d = markov(seq=16, vocab=16)
data notes = text("notes.txt", seq=16)
stage s:
    train m on d (steps=1, batch=1)
"""


def test_bytes_outside_the_vocab_and_a_run_that_no_longer_checks(tmp_path):
    (tmp_path / "notes.txt").write_text("notes")
    (tmp_path / "p.eff").write_text(SMALL)
    r = check_source(SMALL, str(tmp_path / "p.eff"))
    assert r.ok, r.diagnostics
    run_pipeline(r, tmp_path / "p.eff", RunOptions(tmp_path / "run"))
    ok = _gen(tmp_path / "run", "--prompt", "\x01\x02\x03", "--max-new-tokens", "4")
    assert ok.exit_code == 0 and "3 prompt + 4 new tokens" in ok.stderr, ok.stderr
    bad = _gen(tmp_path / "run", "--prompt", "\x01é")
    assert bad.exit_code == 2 and "byte 1 is 195" in bad.stderr and "vocab is 16" in bad.stderr, bad.stderr
    (tmp_path / "notes.txt").unlink()
    gone = _gen(tmp_path / "run", "--prompt", "\x01")
    assert gone.exit_code == 1 and "no longer checks" in gone.stderr and "notes.txt" in gone.stderr, gone.stderr


def test_the_console_script_shows_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "effc", "generate", str(tmp_path), "--prompt", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr + r.stdout
