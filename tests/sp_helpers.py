"""A SentencePiece tokenizer trained in-process on a few KB of text (no ../shared needed)."""

from __future__ import annotations

import random
from pathlib import Path

from simpo.tokenizer import Tokenizer, train_sentencepiece

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MISTRAL_MODEL = SHARED / "tokenizers" / "mistral-7b-v0.1.model"
WORDS = (
    "the a model answer question hello world please write short poem about cats dogs rain "
    "python code list three reasons why is are was good bad because and or not helpful"
).split()


def corpus(lines: int = 200, seed: int = 0) -> list[str]:
    """~8 KB of sentences, plus one line of unicode, markup and code."""
    rng = random.Random(seed)
    out = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "."
        for _ in range(lines)
    ]
    return [*out, "Ünïcödé café 東京 🙂 “quotes” [INST] [/INST] <|user|> def f(x): return x**2"]


def train_tokenizer(out_dir: Path, vocab_size: int = 400) -> Tokenizer:
    return train_sentencepiece(corpus(), out_dir, vocab_size)
