"""Tokenizer: a SentencePiece `tokenizer.model` or an HF `tokenizer.json`, with the checkpoint's
special tokens.

`encode(text)` is exact: it never adds BOS/EOS, never adds SentencePiece's dummy-prefix space and
never parses special-token text, so `decode(encode(a) + encode(b)) == a + b`. Special tokens are
encoded by id (`token_id`), never by tokenising their text; the chat templates build on this.
BOS / EOS / pad come from tokenizer_config.json, then special_tokens_map.json, then
generation_config.json, then the model file; `stop_ids` (generation stops) are EOS, every
`eos_token_id` of generation_config.json and the chat template's end-of-turn token.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm

from simpo.templates import CHATML_JINJA, TURN_MARKERS, detect_template, end_of_turn

SP_MODEL = "tokenizer.model"
HF_JSON = "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# ModelProto field 3 is NormalizerSpec, whose field 3 is add_dummy_prefix. Protobuf merges a
# repeated embedded message into the first, so appending this record turns the dummy prefix off.
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"
_SELF_TEST = ("Hello", " world", "  two  spaces\n", "tab\tend")


class TokenizerError(ValueError):
    """A tokenizer that is missing, unsupported, or does not encode text faithfully."""


class _SentencePiece:
    """`tokenizer.model` through the `sentencepiece` package."""

    def __init__(self, path: Path, added: dict[int, str]) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.exact = spm.SentencePieceProcessor(
            model_proto=self.sp.serialized_model_proto() + _NO_DUMMY_PREFIX
        )
        n = self.sp.vocab_size()
        self.special = {self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i)}
        self.special.update({text: i for i, text in added.items() if i >= n})
        # bytes of every id, so decode is a table lookup (byte-fallback pieces are single bytes)
        self.surface = [self._surface(i) for i in range(n)]
        self.surface += [b""] * (max(added, default=-1) + 1 - n)
        for i, text in added.items():
            if i >= n:
                self.surface[i] = text.encode()
        self.vocab_size = len(self.surface)
        self.defaults = {
            "bos": self.sp.bos_id(),
            "eos": self.sp.eos_id(),
            "pad": self.sp.pad_id(),
        }

    def _surface(self, i: int) -> bytes:
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):
            return bytes([int(piece[3:5], 16)])  # "<0x0A>"
        if self.sp.is_unknown(i):
            return " \u2047 ".encode()  # what sentencepiece itself prints for <unk>
        if self.sp.is_control(i):
            return piece.encode()
        return piece.replace("\u2581", " ").encode()

    def encode(self, text: str) -> list[int]:
        return self.exact.encode(text)

    def decode(self, ids: list[int], skip: set[int]) -> str:
        data = b"".join(self.surface[i] for i in ids if i not in skip)
        return data.decode("utf-8", errors="replace")

    def token_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        i = self.sp.piece_to_id(token)  # unknown pieces map to <unk>
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i


class _HFTokenizers:
    """`tokenizer.json` through the optional `tokenizers` package."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as e:
            raise TokenizerError(
                f"{path} needs the `tokenizers` package: pip install tokenizers "
                "(or pip install simpo[tokenizers])"
            ) from e
        self.tok = HFTokenizer.from_file(str(path))
        self.tok.encode_special_tokens = True  # "<|eot_id|>" inside a message stays plain text
        self.special = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.defaults = {"bos": -1, "eos": -1, "pad": -1}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip: set[int]) -> str:
        return self.tok.decode([i for i in ids if i not in skip], skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_text(value: Any) -> str | None:
    """Config files spell a token as "<s>", {"content": "<s>", ...} or null."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template_source(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    jinja = directory / "chat_template.jinja"  # transformers >= 4.50 writes it beside the config
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    source = tokenizer_config.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": ..., ...}]
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    return source


class Tokenizer:
    """Encode / decode text; BOS, EOS, pad and stop ids; the chat template's name."""

    def __init__(self, path: Path) -> None:
        if path.is_dir():
            model = next((path / n for n in (SP_MODEL, HF_JSON) if (path / n).is_file()), None)
            if model is None:
                raise TokenizerError(f"{path} has neither {SP_MODEL} nor {HF_JSON}")
            configs = [path / n for n in CONFIG_FILES if (path / n).is_file()]
        elif path.suffix in (".model", ".json") and path.is_file():
            model, configs = path, []  # a bare model file: its directory may belong to anything
        else:
            raise TokenizerError(f"{path}: expected a directory, a .model or a tokenizer.json file")
        self.path = path
        self.files = [model, *configs]

        def read(name: str) -> dict[str, Any]:
            return _read_json(path / name) if path.is_dir() else {}

        tok_config, special_map = read("tokenizer_config.json"), read("special_tokens_map.json")
        gen_config, model_config = read("generation_config.json"), read("config.json")
        added = {
            int(i): t["content"] for i, t in tok_config.get("added_tokens_decoder", {}).items()
        }
        if model.suffix == ".model":
            self._backend: _SentencePiece | _HFTokenizers = _SentencePiece(model, added)
        else:
            self._backend = _HFTokenizers(model)
        self.vocab_size = self._backend.vocab_size
        self._special_ids = set(self._backend.special.values())

        def resolve(role: str) -> int | None:
            for config in (tok_config, special_map):
                if f"{role}_token" in config:  # an explicit null means "this model has none"
                    text = _token_text(config[f"{role}_token"])
                    return None if text is None else self.token_id(text)
            ids = gen_config.get(f"{role}_token_id")
            if ids is not None:
                return ids[0] if isinstance(ids, list) else ids
            default = self._backend.defaults[role]
            return default if default >= 0 else None

        self.bos_id = resolve("bos") if tok_config.get("add_bos_token", True) else None
        eos_id = resolve("eos")
        if eos_id is None:
            raise TokenizerError(f"{path}: no EOS token in the model or its config files")
        self.eos_id: int = eos_id
        pad_id = resolve("pad")
        self.pad_id: int = eos_id if pad_id is None else pad_id  # padding is never scored
        self.eos_token = self.decode([eos_id])
        self.chat_template = detect_template(
            _chat_template_source(path, tok_config) if path.is_dir() else None,
            model_config.get("model_type"),
            lambda token: self._backend.token_id(token) is not None,
        )
        extra = gen_config.get("eos_token_id", [])
        stops = [eos_id, *(extra if isinstance(extra, list) else [extra])]
        if self.chat_template and (marker := end_of_turn(self.chat_template)):
            stops.append(self.token_id(marker))
        self.stop_ids = list(dict.fromkeys(stops))
        self._self_test()

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from an HF checkpoint / tokenizer directory, or a bare .model / tokenizer.json."""
        return cls(Path(path))

    def __reduce__(self) -> tuple[Any, tuple[Path]]:  # worker processes reload from the files
        return Tokenizer, (self.path,)

    def encode(self, text: str) -> list[int]:
        """Ids of exactly `text`: no BOS/EOS, no dummy-prefix space, special text stays text."""
        ids = self._backend.encode(text)
        if text and not ids:
            raise TokenizerError(f"{self.path} encoded {text[:40]!r} to no tokens")
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Text of `ids`; special tokens appear as their text unless `skip_special`."""
        return self._backend.decode(ids, self._special_ids if skip_special else set())

    def token_id(self, token: str) -> int:
        """The id of one (special) token, looked up by its text; never tokenised."""
        i = self._backend.token_id(token)
        if i is None:
            raise TokenizerError(f"{self.path} has no token {token!r}")
        return i

    @property
    def fingerprint(self) -> str:
        """sha256 over the tokenizer files (the data cache key)."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        return h.hexdigest()

    def save(self, out_dir: str | Path) -> None:
        """Copy the tokenizer files into `out_dir` (for an HF export), under HF's file names."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model, *configs = self.files
        shutil.copyfile(model, out / (SP_MODEL if model.suffix == ".model" else HF_JSON))
        for f in configs:
            shutil.copyfile(f, out / f.name)
        if not configs:  # a bare model file: write what HF needs to know its special tokens
            _write_config(
                out,
                self.decode([self.bos_id]) if self.bos_id is not None else None,
                self.eos_token,
                None,
            )

    def _self_test(self) -> None:
        """Refuse a tokenizer that drops text or changes it across encode boundaries."""
        ids = [i for s in _SELF_TEST for i in self.encode(s)]
        if self.decode(ids) != "".join(_SELF_TEST):
            raise TokenizerError(
                f"{self.path} does not round-trip text ({self.decode(ids)!r}); a tokenizer.json "
                f"that adds a prefix space to every call is not supported, use {SP_MODEL}"
            )


def _write_config(out: Path, bos: str | None, eos: str, chat_template: str | None) -> None:
    config = {"bos_token": bos, "eos_token": eos, "add_bos_token": bos is not None}
    if chat_template:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


_TRAIN_DEFAULTS: dict[str, Any] = {
    "model_type": "bpe",
    "normalization_rule_name": "identity",  # keep text exactly as given
    "remove_extra_whitespaces": False,
    "byte_fallback": True,  # nothing is ever <unk>
    "split_digits": True,
    "character_coverage": 0.9995,  # rarer characters are byte pieces, so a small vocab fits
    "hard_vocab_limit": False,  # a few KB of text may not support `vocab_size` pieces
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": 3,
    "minloglevel": 2,
}


def train_sentencepiece(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int, **options: Any
) -> Tokenizer:
    """Train a Llama-style BPE SentencePiece model on `texts` (split into lines).

    Turn markers of every supported chat template are control pieces: encoded only by id, so a
    message that contains "<|im_end|>" stays text. Writes tokenizer.model and a
    tokenizer_config.json (<s>, </s>, the chatml template) into `out_dir`; `options` override
    SentencePiece trainer settings.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(line for text in texts for line in text.splitlines() if line),
        model_writer=model,
        vocab_size=vocab_size,
        control_symbols=list(TURN_MARKERS),
        **{**_TRAIN_DEFAULTS, **options},
    )
    (out / SP_MODEL).write_bytes(model.getvalue())
    _write_config(out, "<s>", "</s>", CHATML_JINJA)
    return Tokenizer.from_dir(out)
