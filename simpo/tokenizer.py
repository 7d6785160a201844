"""Tokenizer: the checkpoint's own `tokenizer.json` (through `tokenizers`, exactly as transformers'
fast tokenizer) or, when it ships only a SentencePiece `tokenizer.model`, that model.

Two encodings:
  `encode_chat(text)`  what `transformers` gives for `tokenizer(text, add_special_tokens=False)`:
                       special-token text (`<s>`, `<|eot_id|>`, ...) becomes that token, the text
                       between them is tokenised as the fast tokenizer does. Rendered chat
                       templates are tokenised this way (simpo/conventions.py).
  `encode(text)`       the ids of `text` with special-token text kept as text and no BOS / EOS.
                       Exact (no dummy-prefix space) for SentencePiece, so
                       `decode(encode(a) + encode(b)) == a + b` there.
BOS / EOS / pad come from tokenizer_config.json, then special_tokens_map.json, then
generation_config.json, then the model file; `stop_ids` (generation stops) are EOS, every
`eos_token_id` of generation_config.json and the end-of-turn token of the chat template.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm

from simpo.templates import (
    CHATML_BOS_JINJA,
    END_OF_TURN_MARKERS,
    TEMPLATES,
    TURN_MARKERS,
    TemplateError,
    chat_template_source,
    fallback_template,
)

SP_MODEL = "tokenizer.model"
HF_JSON = "tokenizer.json"
CONFIG_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
# ModelProto field 3 is NormalizerSpec, whose field 3 is add_dummy_prefix. Protobuf merges a
# repeated embedded message into the first, so appending this record turns the dummy prefix off.
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"
_TOKENIZERS_HINT = "pip install tokenizers (a core dependency of simpo: pip install -e .)"


class TokenizerError(ValueError):
    """A tokenizer that is missing, unsupported, or does not encode text faithfully."""


class _SentencePiece:
    """`tokenizer.model` through the `sentencepiece` package.

    `encode_chat` follows transformers' conversion of the model to a fast tokenizer: split on
    special tokens; the dummy-prefix "▁" goes before the text at the very start of the string
    ("first", transformers >= 5 and `"legacy": false`) or before every piece ("legacy": true),
    never before a piece that already starts with a space. The fast tokenizer's BPE and
    SentencePiece can still split runs of spaces differently: ship a tokenizer.json for
    token-for-token equality.
    """

    def __init__(self, path: Path, added: dict[int, str], legacy: bool) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.exact = spm.SentencePieceProcessor(
            model_proto=self.sp.serialized_model_proto() + _NO_DUMMY_PREFIX
        )
        n = self.sp.vocab_size()
        specials = (i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i))
        self.special = {self.sp.id_to_piece(i): i for i in specials}
        self.special.update({text: i for i, text in added.items()})
        self.legacy = legacy
        self.dummy_prefix = self.sp.encode("a") != self.exact.encode("a")
        longest_first = sorted(self.special, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        # bytes of every id, so decode is a table lookup (byte-fallback pieces are single bytes)
        self.surface = [self._surface(i) for i in range(n)]
        self.surface += [b""] * (max(added, default=-1) + 1 - n)
        for i, text in added.items():
            if i >= n:
                self.surface[i] = text.encode()
        self.vocab_size = len(self.surface)
        self.defaults = {
            "bos": self._piece(self.sp.bos_id()),
            "eos": self._piece(self.sp.eos_id()),
            "unk": self._piece(self.sp.unk_id()),
            "pad": self._piece(self.sp.pad_id()),
        }

    def _piece(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if i >= 0 else None

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

    def encode_chat(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, piece in enumerate(self.split.split(text)):
            if k % 2:  # odd pieces are the special tokens the pattern captured
                ids.append(self.special[piece])
            elif piece:
                prefix = self.dummy_prefix and (k == 0 or self.legacy) and piece[0] != " "
                ids += self.exact.encode(" " + piece if prefix else piece)
        return ids

    def decode(self, ids: list[int], skip: set[int]) -> str:
        data = b"".join(self.surface[i] for i in ids if i not in skip)
        return data.decode("utf-8", errors="replace")

    def token_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        i = self.sp.piece_to_id(token)  # unknown pieces map to <unk>
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i


class _HFTokenizers:
    """`tokenizer.json` through the `tokenizers` package: the same Rust code that transformers'
    fast tokenizers run, so `encode_chat` equals `tokenizer(text, add_special_tokens=False)`."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as e:
            raise TokenizerError(f"{path} needs the tokenizers package: {_TOKENIZERS_HINT}") from e
        self.tok = HFTokenizer.from_file(str(path))
        self.special = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.defaults: dict[str, str | None] = {"bos": None, "eos": None, "unk": None, "pad": None}

    def _encode(self, text: str, specials_as_text: bool) -> list[int]:
        self.tok.encode_special_tokens = specials_as_text
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        return self._encode(text, specials_as_text=True)

    def encode_chat(self, text: str) -> list[int]:
        return self._encode(text, specials_as_text=False)

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


class Tokenizer:
    """Encode / decode text; BOS, EOS, pad and stop ids; the checkpoint's chat template."""

    def __init__(self, path: Path) -> None:
        if path.is_dir():
            # transformers' AutoTokenizer also prefers tokenizer.json when both are shipped
            model = next((path / n for n in (HF_JSON, SP_MODEL) if (path / n).is_file()), None)
            if model is None:
                raise TokenizerError(f"{path} has neither {HF_JSON} nor {SP_MODEL}")
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
            legacy = bool(tok_config.get("legacy", False))
            self._backend: _SentencePiece | _HFTokenizers = _SentencePiece(model, added, legacy)
        else:
            self._backend = _HFTokenizers(model)
        self.vocab_size = self._backend.vocab_size
        self._special_ids = set(self._backend.special.values())

        def text_of(role: str) -> str | None:
            for config in (tok_config, special_map):
                if f"{role}_token" in config:  # an explicit null means "this model has none"
                    return _token_text(config[f"{role}_token"])
            ids = gen_config.get(f"{role}_token_id")
            if ids is not None:
                return self.decode([ids[0] if isinstance(ids, list) else ids])
            return self._backend.defaults[role]

        # the special-token strings a chat template sees (transformers' special_tokens_map)
        roles = ("bos", "eos", "unk", "pad")
        self.special_tokens = {f"{r}_token": text for r in roles if (text := text_of(r))}
        self.bos_token, eos_token = text_of("bos"), text_of("eos")
        if eos_token is None:
            raise TokenizerError(f"{path}: no EOS token in the model or its config files")
        self.eos_token: str = eos_token
        # BOS exists whatever add_bos_token says: chat templates and the official pipeline
        # decide where it goes (simpo/conventions.py)
        self.bos_id = None if self.bos_token is None else self.token_id(self.bos_token)
        self.eos_id = self.token_id(eos_token)
        pad = text_of("pad")
        self.pad_id: int = self.eos_id if pad is None else self.token_id(pad)  # never scored
        try:
            self.chat_template = chat_template_source(path if path.is_dir() else None, tok_config)
        except TemplateError as e:
            raise TokenizerError(str(e)) from None
        self.model_type: str | None = model_config.get("model_type")
        extra = gen_config.get("eos_token_id", [])
        stops = [self.eos_id, *(extra if isinstance(extra, list) else [extra])]
        template = self.chat_template or self._fallback_source()
        for marker in END_OF_TURN_MARKERS:
            i = self._backend.token_id(marker) if template and marker in template else None
            stops += [] if i is None else [i]
        self.stop_ids = list(dict.fromkeys(stops))

    def _fallback_source(self) -> str | None:
        name = fallback_template(self.model_type, lambda t: self._backend.token_id(t) is not None)
        return None if name is None else TEMPLATES[name]

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from an HF checkpoint / tokenizer directory, or a bare .model / tokenizer.json."""
        return cls(Path(path))

    def __reduce__(self) -> tuple[Any, tuple[Path]]:  # worker processes reload from the files
        return Tokenizer, (self.path,)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`: no BOS/EOS, special-token text stays text (exact for SentencePiece)."""
        ids = self._backend.encode(text)
        if text and not ids:
            raise TokenizerError(f"{self.path} encoded {text[:40]!r} to no tokens")
        return ids

    def encode_chat(self, text: str) -> list[int]:
        """Ids of a rendered chat as transformers tokenises it (`add_special_tokens=False`):
        special-token text becomes the special token."""
        return self._backend.encode_chat(text)

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
            _write_config(out, self.bos_token, self.eos_token, None)


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

    Turn markers of every supported chat template are control pieces (special tokens). Writes
    tokenizer.model and a tokenizer_config.json (<s>, </s>, a chatml template that starts with
    BOS) into `out_dir`; `options` override SentencePiece trainer settings.
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
    _write_config(out, "<s>", "</s>", CHATML_BOS_JINJA)
    return Tokenizer.from_dir(out)
