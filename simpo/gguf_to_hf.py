"""A llama.cpp GGUF file (Llama architecture, byte-level BPE vocabulary) -> a Hugging Face dir.

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2/")

writes config.json, model.safetensors (fp32), tokenizer.json, tokenizer_config.json (with the
GGUF's chat template) and generation_config.json. Read with the `gguf` package (llama.cpp's
own reader, an optional extra); quantised blocks (Q4_0/Q4_1/Q8_0/...) are dequantised to fp32
with its numpy kernels, so the result is exactly the model llama.cpp runs, in fp32.

Two things llama.cpp's converter changed are undone here:
- q/k rows: convert_hf_to_gguf.py permutes each head's rows from HF's "rotate half" RoPE
  layout to GGML's interleaved pairs; `unpermute_rope_rows` inverts it.
- the tokenizer: a GGUF keeps only the vocabulary, merges and the name of a pre-tokenizer
  (`tokenizer.ggml.pre`); `build_tokenizer` rebuilds tokenizer.json with that pre-tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

# GGUF tensor name (layer part replaced by {i}) -> HF Llama name
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# llama.cpp's pre-tokenizer names -> regexes applied one after another before byte-level BPE
# (llama-vocab.cpp); "smollm" (also starcoder, refact, ...) isolates every digit first.
PRE_TOKENIZERS = {"gpt2": (), "smollm": (r"\p{N}",), "starcoder": (r"\p{N}",)}
CONTROL = 3  # llama.cpp token type of special tokens (<|im_start|>, <|endoftext|>, ...)


class GGUFError(ValueError):
    """A GGUF file this converter does not support; the message names the file and field."""


def open_gguf(path: Path) -> Any:
    """A `gguf.GGUFReader` (memory-mapped); a clear error when the package is missing."""
    try:
        import gguf
    except ImportError:
        raise SystemExit(
            "reading GGUF needs the `gguf` package: pip install gguf (or pip install simpo[gguf])"
        ) from None
    return gguf.GGUFReader(str(path))


def metadata(reader: Any) -> dict[str, Any]:
    """Every scalar / string / array field of the file's key-value metadata, as Python values."""
    return {name: field.contents() for name, field in reader.fields.items()}


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k permutation. w: (n_heads * head_dim, dim).

    HF rotates pairs (j, j + head_dim/2) of each head; llama.cpp stores them as adjacent rows
    (2j, 2j + 1): its converter reshapes rows to (heads, 2, head_dim/2) and swaps the last two
    axes. Reading (heads, head_dim/2, 2) and swapping back restores HF's order.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def model_config(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """HF LlamaConfig fields from the GGUF metadata (llama architecture only)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{where}: general.architecture is {arch!r}; only 'llama' is supported")

    def need(key: str) -> Any:
        if f"llama.{key}" not in meta:
            raise GGUFError(f"{where}: metadata field 'llama.{key}' is missing")
        return meta[f"llama.{key}"]

    dim, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(meta.get("llama.rope.dimension_count", dim // heads))
    if head_dim != dim // heads:
        raise GGUFError(f"{where}: llama.rope.dimension_count != embedding_length / head_count")
    tokens = meta["tokenizer.ggml.tokens"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta.get("llama.vocab_size", len(tokens))),
        "hidden_size": dim,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        # stored as float32: its shortest decimal (1e-05, not 9.999999747378752e-06)
        "rms_norm_eps": float(str(np.float32(need("attention.layer_norm_rms_epsilon")))),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(need("context_length")),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "dtype": "float32",
        "torch_dtype": "float32",
    }


def read_weights(reader: Any, config: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """fp32 HF-named tensors: dequantised, q/k rows un-permuted; tied when output.weight is
    absent (the GGUF then reuses token_embd, as does HF with tie_word_embeddings)."""
    from gguf.quants import dequantize

    n_layers = config["num_hidden_layers"]
    names = {}
    for gguf_name, hf_name in TENSOR_NAMES.items():
        for i in range(n_layers) if "{i}" in gguf_name else [0]:
            names[gguf_name.format(i=i)] = hf_name.format(i=i)
    state, seen = {}, set()
    for t in reader.tensors:
        if t.name not in names:
            if t.name.endswith("rope_freqs.weight"):  # llama3 rope scaling: not supported
                raise GGUFError(f"{where}: tensor {t.name} (rope frequency factors) is unsupported")
            raise GGUFError(f"{where}: unexpected tensor {t.name}")
        w = dequantize(t.data, t.tensor_type).astype(np.float32)  # (rows, cols) = HF's (out, in)
        if ".attn_q." in t.name:
            w = unpermute_rope_rows(w, config["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = unpermute_rope_rows(w, config["num_key_value_heads"])
        state[names[t.name]] = torch.from_numpy(np.ascontiguousarray(w))
        seen.add(t.name)
    missing = sorted(set(names) - seen - {"output.weight"})
    if missing:
        raise GGUFError(f"{where}: missing tensor(s) {', '.join(missing[:5])}")
    config["tie_word_embeddings"] = "output.weight" not in seen
    return state


def build_tokenizer(meta: dict[str, Any], where: str) -> Any:
    """tokenizer.json (a `tokenizers.Tokenizer`) of a GGUF byte-level BPE vocabulary.

    Vocabulary and merges as stored; CONTROL tokens become special added tokens; the
    pre-tokenizer is llama.cpp's for `tokenizer.ggml.pre` (for "smollm": every digit isolated,
    then GPT-2's regex), i.e. the model's original tokenizer.json. transformers' GGUF loader
    (5.x) knows no "smollm" and uses GPT-2's regex alone: it differs only where whitespace
    meets a digit ("a  1": llama.cpp and HF's SmolLM2 give "a", "ĠĠ", "1").
    """
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
        from tokenizers.models import BPE
    except ImportError:
        raise SystemExit(
            "building tokenizer.json needs the `tokenizers` package: pip install tokenizers"
        ) from None
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2":
        raise GGUFError(f"{where}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (BPE) supported")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(
            f"{where}: tokenizer.ggml.pre is {pre!r}; supported: {', '.join(PRE_TOKENIZERS)}"
        )
    if meta.get("tokenizer.ggml.add_space_prefix"):
        raise GGUFError(f"{where}: tokenizer.ggml.add_space_prefix = true is not supported")
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type")
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
            end_of_word_suffix="", fuse_unk=False)
    )  # fmt: skip
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
    if splits:  # e.g. isolated digits (HF spells this Digits(individual_digits=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [t for t, kind in zip(tokens, types or [], strict=False) if kind == CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok


def tokenizer_files(meta: dict[str, Any], tok: Any) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json and generation_config.json: special tokens, chat template, stops."""
    tokens = meta["tokenizer.ggml.tokens"]

    def text(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    added = {
        str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }  # fmt: skip
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # load tokenizer.json as written
        "bos_token": text("bos"),
        "eos_token": text("eos"),
        "pad_token": text("padding"),
        "unk_token": text("unknown"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length", 2048)),
        "added_tokens_decoder": added,
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    eos = meta.get("tokenizer.ggml.eos_token_id")
    generation_config = {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": [eos],  # <|im_end|> for SmolLM2: the chat turn's end stops generation
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    return {"tokenizer_config.json": tokenizer_config, "generation_config.json": generation_config}


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the HF-format directory of a Llama GGUF file (see the module docstring)."""
    path, out = Path(gguf_path), Path(out_dir)
    reader = open_gguf(path)
    meta = metadata(reader)
    config = model_config(meta, str(path))
    state = read_weights(reader, config, str(path))  # sets tie_word_embeddings
    tok = build_tokenizer(meta, str(path))
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    for name, content in tokenizer_files(meta, tok).items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return out
