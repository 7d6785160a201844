"""Benchmark: one SimPO forward+backward step on real preference lengths, per packing layout.

The same pairs of `../shared/data/alpaca_eval_prefs.jsonl` (Mistral tokenizer and chat
template, max_length 1024 / max_prompt_length 512) go through a small llama-shaped model as
`shared_prompt`, `plain` and `padded` micro-batches of at most `--max-tokens` token slots each,
with gradient accumulation over the step. Throughput is counted in data tokens: a pair is
prompt+chosen and prompt+rejected, |x|+|y_w|+|x|+|y_l| tokens, whatever the layout does with
them. `padded` takes pairs in file order, as many per micro-batch as fit the same slot budget.
The layouts interleave step by step, so a busy machine slows all of them alike.

    .venv/bin/python bench/packing.py [--quick]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import MISTRAL_SIMPO, MISTRAL_SPM, PREFS, machine, table  # noqa: E402
from simpo.config import DataConfig  # noqa: E402
from simpo.data import TokenizedPair, load_pairs  # noqa: E402
from simpo.losses import simpo_loss  # noqa: E402
from simpo.model import ModelArgs, Transformer  # noqa: E402
from simpo.packing import PACKINGS, PackedBatch, pack_pairs, pack_stats  # noqa: E402
from simpo.tokenizer import Tokenizer  # noqa: E402

REPORT = Path("/tmp/readme/bench_packing.md")
BETA, GAMMA_BETA_RATIO = 2.0, 0.8  # the Mistral-7B base recipe


def sample_pairs(n: int, seed: int) -> list[TokenizedPair]:
    """`n` pairs drawn at random (fixed seed) from the file, tokenised as training does."""
    cfg = DataConfig(
        chat_template=str(MISTRAL_SIMPO), max_length=1024, max_prompt_length=512, num_workers=2
    )
    pairs, _ = load_pairs(PREFS, Tokenizer.from_dir(MISTRAL_SPM), cfg, progress=False)
    return random.Random(seed).sample(pairs, n)


def make_model(dim: int, n_layers: int) -> Transformer:
    args = ModelArgs(
        model_type="llama", vocab_size=32000, dim=dim, n_layers=n_layers, n_heads=dim // 64,
        n_kv_heads=dim // 64, head_dim=64, intermediate_size=dim * 8 // 3,
        layer_types=("full_attention",) * n_layers,
    )  # fmt: skip
    model = Transformer(args)
    model.init_weights(seed=0)
    return model


def step(model: Transformer, batches: list[PackedBatch], num_pairs: int) -> tuple[float, float]:
    """Forward+backward over the micro-batches of one step; returns (loss, grad norm)."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b in batches:
        sums, counts = model(b.input_ids, b.layout, b.score)  # (2P,)
        avg = sums / counts
        losses, _, _ = simpo_loss(avg[0::2], avg[1::2], BETA, GAMMA_BETA_RATIO)  # (P,)
        loss = losses.sum() / num_pairs  # normalised by the step's pairs, not the micro-batch's
        loss.backward()
        total += loss.item()
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    return total, norm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 1 step of 4 pairs, a 1-layer model"
    )
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=16, help="pairs per optimizer step")
    ap.add_argument("--max-tokens", type=int, default=2048, help="token slots per micro-batch")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not PREFS.exists():
        print(f"skipped: {PREFS} is absent (the shared reference data is not part of the repo)")
        return
    if a.quick:
        a.steps, a.pairs, a.dim, a.layers = 1, 4, 64, 1
    torch.manual_seed(a.seed)
    pairs = sample_pairs(a.steps * a.pairs, a.seed)
    steps = [pairs[i : i + a.pairs] for i in range(0, len(pairs), a.pairs)]
    data_tokens = sum(
        2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs
    )
    model = make_model(a.dim, a.layers)
    plans = {lay: [pack_pairs(s, a.max_tokens, lay) for s in steps] for lay in PACKINGS}
    step(model, pack_pairs(pairs[:1], a.max_tokens), 1)  # warm-up: allocator, thread pools

    seconds, cpu_seconds = dict.fromkeys(PACKINGS, 0.0), dict.fromkeys(PACKINGS, 0.0)
    results: dict[str, list[tuple[float, float]]] = {lay: [] for lay in PACKINGS}
    for k in range(len(steps)):
        for lay in PACKINGS:  # interleaved, so load from other processes hits every layout
            t0, c0 = time.perf_counter(), time.process_time()
            results[lay].append(step(model, plans[lay][k], len(steps[k])))
            seconds[lay] += time.perf_counter() - t0
            cpu_seconds[lay] += time.process_time() - c0

    rows, ref = [], results["padded"]
    for lay in PACKINGS:
        # accumulation order differs between layouts, so equal up to fp32 rounding
        loss_diff = max(abs(x[0] - r[0]) / abs(r[0]) for x, r in zip(results[lay], ref))
        norm_diff = max(abs(x[1] - r[1]) / r[1] for x, r in zip(results[lay], ref))
        if loss_diff > 1e-4 or norm_diff > 1e-3:
            sys.exit(
                f"{lay}: loss / grad norm differ from padded by {loss_diff:.1e} / {norm_diff:.1e}"
            )
        st = pack_stats([b for plan in plans[lay] for b in plan], a.max_tokens)
        rows.append([
            lay, st.num_batches, st.num_rows, st.slots, f"{st.fill:.3f}",
            f"{seconds[lay] / a.steps:.2f}", f"{cpu_seconds[lay] / a.steps:.2f}",
            f"{data_tokens / seconds[lay]:.0f}",
            f"{loss_diff:.1e}", f"{norm_diff:.1e}",
        ])  # fmt: skip
    command = " ".join([".venv/bin/python bench/packing.py", *sys.argv[1:]])
    speedup = {lay: seconds["padded"] / seconds[lay] for lay in PACKINGS}
    cpu_speedup = cpu_seconds["padded"] / cpu_seconds["shared_prompt"]
    text = "\n".join([
        f"`{command}` — {machine()}",
        "",
        f"Model: llama-shaped, dim {a.dim}, {a.layers} layers, vocab 32000, fp32. {a.steps} steps "
        f"x {a.pairs} pairs, micro-batches of <= {a.max_tokens} token slots. Data tokens "
        f"(|x|+|y_w|+|x|+|y_l| per pair): {data_tokens}. Loss / grad norm: largest relative "
        "difference to `padded` over the steps.",
        "",
        table(
            ["layout", "micro-batches", "rows", "slots", "fill", "s/step", "CPU s/step",
             "data tok/s", "loss diff", "grad-norm diff"],
            rows,
        ),  # fmt: skip
        "",
        f"plain = {speedup['plain']:.2f}x padded tokens/s",
        f"by process CPU time: shared_prompt = {cpu_speedup:.2f}x padded",
        f"headline: shared_prompt = {speedup['shared_prompt']:.2f}x padded tokens/s",
    ])  # fmt: skip
    print(text)
    if not a.quick:
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text(f"## Benchmark: packing layouts (bench/packing.py)\n\n{text}\n")


if __name__ == "__main__":
    main()
