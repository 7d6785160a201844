"""Sampling throughput on CPU: `simpo.generate.sample` vs `transformers.generate`.

The same tiny random Llama (saved by transformers, loaded by both: hidden 256, 4 layers, 8
heads / 4 KV heads, vocab 32,000), the same 16 prompts (the shared AlpacaEval prompts in the
Mistral chat template when ../shared is there, else random ids of similar lengths), K = 4
samples each at temperature 0.8, top-p 0.95, exactly `--new` tokens (no stop token). Both
sides run in this process, interleaved round by round after a warm-up round; the median round
gives new tokens/s (wall clock and process CPU time). transformers expands each prompt K
times before its prefill (num_return_sequences); `sample` prefills each prompt once and
shares its KV cache, which the second table measures alone: prefill of the 16 prompts vs of
the 64 rows the unshared way, each followed by one token.

    python bench/sampling.py            # 64 new tokens, 3 timed rounds
    python bench/sampling.py --quick    # 16 new tokens, 1 timed round
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import PREFS, interleaved_times, machine, median, sample_pairs, table  # noqa: E402
from simpo.draws import sample_key  # noqa: E402
from simpo.generate import sample  # noqa: E402
from simpo.hf import load_model  # noqa: E402

PROMPTS, K = 16, 4
SHAPE = dict(
    model_type="llama", vocab_size=32000, hidden_size=256, intermediate_size=1024,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
    max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip


def make_model(out: Path) -> Path:
    import transformers

    cfg = dict(SHAPE)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def prompts(n: int) -> tuple[list[list[int]], str]:
    if PREFS.is_file():  # real prompt lengths: Mistral tokenizer and chat template
        return [p.prompt_ids for p in sample_pairs(n, 0, max_length=512)], "AlpacaEval prompts"
    rng = random.Random(0)
    lengths = [max(8, round(rng.lognormvariate(0, 0.6) * 40)) for _ in range(n)]
    return [[rng.randrange(3, 32000) for _ in range(k)] for k in lengths], "random ids"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--new", type=int, default=64, help="new tokens per sample")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds")
    args = p.parse_args()
    if args.quick:
        args.new, args.rounds = 16, 1
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("sampling: SKIPPED: needs transformers (pip install -e '.[bench]')")
        return
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ids, source = prompts(PROMPTS)
    width = max(map(len, ids))
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp) / "model")
        ours = load_model(path).eval()
        ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    left = torch.zeros(PROMPTS, width, dtype=torch.long)
    mask = torch.zeros(PROMPTS, width, dtype=torch.long)
    for i, p_ in enumerate(ids):
        left[i, width - len(p_) :], mask[i, width - len(p_) :] = torch.tensor(p_), 1
    keys = [[sample_key(0, i, k) for k in range(K)] for i in range(PROMPTS)]

    def hf(new: int, rows: torch.Tensor = left, att: torch.Tensor = mask, k: int = K) -> int:
        with torch.no_grad():
            out = ref.generate(
                rows, attention_mask=att, do_sample=True, temperature=0.8, top_p=0.95,
                num_return_sequences=k, max_new_tokens=new, min_new_tokens=new,
                pad_token_id=0, eos_token_id=None,
            )  # fmt: skip
        return (out.shape[1] - width) * out.shape[0]

    def simpo(new: int, prompts_: list = ids, k: int = K, keys_: list = keys) -> int:
        out = sample(
            ours, prompts_, new, num_samples=k, temperature=0.8, top_p=0.95, keys=keys_,
            batch_prompts=len(prompts_), compile=False,
        )  # fmt: skip
        return sum(len(c.tokens) for per in out for c in per)

    torch.manual_seed(0)
    steps = {
        "transformers.generate": lambda r: hf(args.new),
        "simpo sample": lambda r: simpo(args.new),
    }
    times, outs = interleaved_times(steps, warmup=1, repeats=args.rounds)
    tokens = {n: o[-1] for n, o in outs.items()}
    assert len(set(tokens.values())) == 1, tokens  # the same work on both sides
    rate = {n: tokens[n] / median(t.wall) for n, t in times.items()}
    cpu = {n: tokens[n] / median(t.cpu) for n, t in times.items()}
    # prefill: the 16 prompts once (shared) vs the 64 rows; each then samples one token
    flat = [p_ for p_ in ids for _ in range(K)]
    flat_keys = [[key] for per in keys for key in per]
    pre = {
        "shared (16 prompts, K=4)": lambda r: simpo(1),
        "unshared (64 rows)": lambda r: simpo(1, flat, 1, flat_keys),
    }
    pre_times, _ = interleaved_times(pre, warmup=1, repeats=max(3, args.rounds))
    shared, unshared = (median(t.wall) for t in pre_times.values())
    real = sum(map(len, ids))
    speed, cpu_speed = rate["simpo sample"] / rate["transformers.generate"], (
        cpu["simpo sample"] / cpu["transformers.generate"])  # fmt: skip
    print(f"# bench/sampling.py  ({machine()})\n")
    print(f"{PROMPTS} {source} ({real} tokens, longest {width}) x K={K}, {args.new} new tokens, "
          f"temperature 0.8, top-p 0.95; median of {args.rounds} round(s)\n")  # fmt: skip
    print(table(
        ["sampler", "new tokens", "s (wall) median [min-max]", "new tokens/s", "by CPU time"],
        [[n, tokens[n], f"{median(t.wall):.2f} [{min(t.wall):.2f}-{max(t.wall):.2f}]",
          f"{rate[n]:.0f}", f"{cpu[n]:.0f}"] for n, t in times.items()],
    ))  # fmt: skip
    print()
    print(table(
        ["prefill + 1 token", "prompt tokens computed", "s (wall, median)"],
        [["shared (16 prompts, K=4)", real, f"{shared:.3f}"],
         ["unshared (64 rows)", K * real, f"{unshared:.3f}"]],
    ))  # fmt: skip
    print(
        f"\nsampling: {speed:.2f}x transformers.generate new tokens/s (by CPU time "
        f"{cpu_speed:.2f}x); shared prefill {unshared / shared:.2f}x faster, {K}x fewer tokens"
    )


if __name__ == "__main__":
    main()
