"""Our SimPO training step vs TRL's `CPOTrainer(loss_type="simpo", cpo_alpha=0)`, fp32 on CPU.

Same objective, same tiny Llama checkpoint (random init, saved once by transformers, loaded by
both), same pairs (a fixed random sample of ../shared/data/alpaca_eval_prefs.jsonl, real
lengths, in a Mistral `[INST]` prompt, tokenised by TRL's own `tokenize_row` with the Mistral
tokenizer; our side gets TRL's token ids), same pairs per step, fused AdamW and clipping at 1
(transformers' defaults).
- TRL: `trainer.compute_loss` + `accelerator.backward` (the core of `Trainer.training_step`)
  on a batch from its collator: 2B right-padded sequences, full (2B, T, V) fp32 logits.
- Ours: train.py's step: `simpo.fsdp.build_model` (FSDP2, one rank), the B pairs packed with
  the shared prompt into micro-batches of `--max-tokens`, `simpo.step.train_step` (the model's
  log-prob head, whichever kernel the model's forward uses, `compute_loss`, backward).
First the two losses of the first batch (before any update) must agree to 1e-4 (TRL's
`simpo_gamma` is the absolute γ, so it gets β · gamma_beta_ratio); then pairs/s (median step;
the two sides run alternately in `--rounds` pairs of child processes) and peak RSS (each side
in its own process) at each vocabulary.

    pip install -e '.[bench]'          # transformers, trl, tokenizers, protobuf
    python bench/vs_trl.py [--quick] [--vocab 32000 256000] [--pairs-per-step 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    MISTRAL_SPM,
    PREFS,
    ChildResult,
    Timings,
    emit,
    machine,
    median,
    rss_gb,
    run_child,
    spread,
    table,
    timed,
)

BETA, GAMMA_BETA_RATIO, LR = 2.0, 0.5, 1e-6
LOSS_TOL = 1e-4
DIMS = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 4}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 timed step, 1 round (make bench)")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 256000])
    p.add_argument("--pairs-per-step", type=int, default=2, help="B, the same on both sides")
    p.add_argument("--steps", type=int, default=3, help="timed steps per child, after 1 warmup")
    p.add_argument("--rounds", type=int, default=2, help="TRL, ours, TRL, ours, ... children")
    p.add_argument("--max-length", type=int, default=512, help="max tokens of prompt + answer")
    p.add_argument("--max-tokens", type=int, default=4096, help="our micro-batch row length")
    p.add_argument("--cap-gb", type=float, default=14.0, help="kill a child above this RSS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["trl", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.steps, args.rounds = 1, 1
    return args


# ----------------------------------------------------------------------------------- parent


def missing_requirements() -> str | None:
    """Why the benchmark cannot run here, or None."""
    # protobuf: transformers needs it to turn a SentencePiece tokenizer.model into a tokenizer
    needed = {"transformers": "transformers", "trl": "trl", "google.protobuf": "protobuf"}
    for module, package in needed.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package is missing
            found = False
        if not found:
            return f"{package} is not installed: pip install -e '.[bench]'"
    if not PREFS.is_file() or not MISTRAL_SPM.is_file():
        return f"{PREFS.parent} is absent (../shared/data beside the repository)"
    return None


def write_inputs(work: Path, num_pairs: int, seed: int) -> None:
    """The sampled pairs as text (work/text.json) and an HF tokenizer dir (work/tokenizer)."""
    lines = PREFS.read_text().splitlines()
    rows = []
    for i in sorted(random.Random(seed).sample(range(len(lines)), num_pairs)):
        row = json.loads(lines[i])
        rows.append(
            {
                "index": i,
                "prompt": f"[INST] {row['prompt']} [/INST]",
                "chosen": " " + row["chosen"][-1]["content"],
                "rejected": " " + row["rejected"][-1]["content"],
            }
        )
    (work / "text.json").write_text(json.dumps(rows))
    tok = work / "tokenizer"
    tok.mkdir()
    (tok / "tokenizer.model").write_bytes(MISTRAL_SPM.read_bytes())
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "legacy": False}
    config |= {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (tok / "tokenizer_config.json").write_text(json.dumps(config))


def write_model(path: Path, vocab: int, seed: int) -> None:
    """A random Llama checkpoint with tiny dims, so that the vocabulary dominates the step."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **DIMS, **HEADS
    )
    torch.manual_seed(seed)
    transformers.utils.logging.disable_progress_bar()
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def main() -> None:
    args = parse_args()
    if args.child:
        return trl_child(args) if args.child == "trl" else ours_child(args)
    why = missing_requirements()
    if why:
        print(f"vs_trl: SKIPPED: {why}")
        return
    print(f"# vs_trl  ({machine()})", flush=True)
    results: dict[int, dict[str, list[ChildResult]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # spare pairs: TRL may tokenise a prompt differently for its two answers (then skipped)
        write_inputs(work, args.pairs_per_step * (args.steps + 2), args.seed)
        for vocab in args.vocab:
            model = work / f"model-{vocab}"
            write_model(model, vocab, args.seed)
            results[vocab] = {"trl": [], "ours": []}
            for r in range(args.rounds):
                for side in ("trl", "ours"):
                    argv = [sys.executable, __file__, *sys.argv[1:], "--child", side]
                    argv += ["--work", str(work), "--model", str(model)]
                    child = run_child(argv, args.cap_gb)
                    state = "killed" if child.killed else "ok" if child.result else "FAILED"
                    print(f"vocab {vocab} round {r} {side}: {state}, peak {child.peak_gb:.2f} GB")
                    if state == "FAILED":
                        print(child.log_tail)
                    sys.stdout.flush()
                    results[vocab][side].append(child)
    report(args, results)


def report(args: argparse.Namespace, results: dict[int, dict[str, list[ChildResult]]]) -> None:
    rows, headline, notes = [], [], []
    B = args.pairs_per_step
    for vocab, sides in results.items():
        stats = {}
        for side, children in sides.items():
            done = [c.result for c in children if c.result]
            peak = max(c.peak_gb for c in children)
            if not done:
                killed = any(c.killed for c in children)
                cells = ["killed", "-", "-", f"> {peak:.1f}"] if killed else ["failed"] + ["-"] * 3
                rows.append([vocab, side, *cells, "-", "-"])
                continue
            wall = [t for d in done for t in d["wall"]]
            cpu = [t for d in done for t in d["cpu"]]
            stats[side] = (B / median(wall), B / median(cpu), peak, done[0]["loss0"])
            stats[side] += (done[0]["rows"],)
            above = peak - max(d["base_gb"] for d in done)
            rows.append(
                [vocab, side, f"{B / median(wall):.3f}", spread(wall), f"{median(cpu):.1f}",
                 f"{peak:.2f}", f"{above:.2f}", f"{done[0]['loss0']:.6f}"]
            )  # fmt: skip
        if len(stats) == 2:
            ours, trl = stats["ours"], stats["trl"]
            diff = abs(ours[3] - trl[3])
            notes.append(f"vocab {vocab}: |loss ours - TRL| = {diff:.1e}")
            notes.append(
                f"vocab {vocab}: head rows per step (each through 3 vocabulary GEMMs) TRL "
                f"{trl[4]:.0f}, ours {ours[4]:.0f}: {trl[4] / ours[4]:.2f}x"
            )
            if diff > LOSS_TOL:
                sys.exit(f"vs_trl: FAILED: vocab {vocab}: first-batch losses differ by {diff:.2e}")
            headline.append(
                f"vocab {vocab}: {ours[0] / trl[0]:.2f}x TRL pairs/s (by CPU time "
                f"{ours[1] / trl[1]:.2f}x), {ours[2] / trl[2]:.2f}x its peak RSS"
            )
        elif "ours" in stats:
            headline.append(
                f"vocab {vocab}: TRL killed above {args.cap_gb:g} GB, ours peaked at "
                f"{stats['ours'][2]:.2f} GB"
            )
    headers = ["vocab", "side", "pairs/s (wall)", "step s median [min-max]", "CPU s/step"]
    headers += ["peak RSS GB", "above baseline GB", "loss (1st batch)"]
    print("\n" + table(headers, rows))
    print(
        f"\nB = {B} pairs/step, max_length {args.max_length}, {args.steps} timed steps x "
        f"{args.rounds} rounds; " + "; ".join(notes)
    )
    print("vs_trl: " + "; ".join(headline))


# ----------------------------------------------------------------------------------- children


def time_steps(
    step: Callable[[Any], float], batches: list, steps: int, base_gb: float, head_rows: list[int]
) -> None:
    """One warmup step (its loss, before any update, is the parity loss), then `steps` timed.
    head_rows[k]: the rows batch k sends through the vocabulary GEMMs (3 GEMMs each side)."""
    if len(batches) < steps + 1:
        sys.exit(f"only {len(batches)} batches for 1 warmup + {steps} steps: sample more pairs")
    loss0 = step(batches[0])
    times = Timings()
    for batch in batches[1 : steps + 1]:
        times.add(*timed(step, batch)[1:])
    rows = median(head_rows[1 : steps + 1])
    emit({"loss0": loss0, "wall": times.wall, "cpu": times.cpu, "base_gb": base_gb, "rows": rows})


def trl_child(args: argparse.Namespace) -> None:
    """TRL side: tokenise with the trainer, check or write the pairs, time its steps."""
    import datasets
    import torch
    import transformers

    try:
        from trl.experimental.cpo import CPOConfig, CPOTrainer
    except ImportError:  # TRL before 1.0
        from trl import CPOConfig, CPOTrainer

    transformers.logging.set_verbosity_error()
    base = rss_gb()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.work / "tokenizer")
    tokenizer.pad_token = tokenizer.eos_token  # as TRL's collator asks (Mistral has no pad)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = CPOConfig(
        output_dir=str(args.work / "trl-out"),
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=BETA,
        simpo_gamma=BETA * GAMMA_BETA_RATIO,  # TRL's γ is absolute
        max_length=args.max_length,
        per_device_train_batch_size=args.pairs_per_step,
        learning_rate=LR,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
    )
    text = datasets.Dataset.from_list(json.loads((args.work / "text.json").read_text()))
    trainer = CPOTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=text)
    rows = [r for r in trainer.train_dataset if as_pair(r) is not None]
    pairs_file = args.work / f"pairs-{args.max_length}.json"
    if pairs_file.exists():  # every child scores the very same token ids
        assert json.loads(pairs_file.read_text()) == [as_pair(r) for r in rows]
    else:
        pairs_file.write_text(json.dumps([as_pair(r) for r in rows]))
    B = args.pairs_per_step
    batches = [trainer.data_collator(rows[s : s + B]) for s in range(0, len(rows) - B + 1, B)]
    optimizer = trainer.create_optimizer()  # transformers' default: fused AdamW, no decay
    model.train()

    def step(batch: dict) -> float:
        loss = trainer.compute_loss(model, batch)
        trainer.accelerator.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    # CPO's concatenated forward: chosen and rejected padded to one length, every position
    # through the head: (2B, T) rows
    widths = [
        max(b["chosen_input_ids"].shape[1], b["rejected_input_ids"].shape[1]) for b in batches
    ]
    time_steps(step, batches, args.steps, base, [2 * B * t for t in widths])


def as_pair(row: dict) -> dict | None:
    """A TRL-tokenised row as prompt / chosen / rejected ids; None if TRL tokenised the prompt
    differently for the two answers (a merge at the boundary) or truncated an answer away."""

    def split(key: str) -> tuple[list[int], list[int]]:
        n = sum(1 for x in row[f"{key}_labels"] if x == -100)  # the prompt's tokens
        return row[f"{key}_input_ids"][:n], row[f"{key}_input_ids"][n:]

    (prompt, chosen), (prompt_r, rejected) = split("chosen"), split("rejected")
    if prompt != prompt_r or not chosen or not rejected:
        return None
    return {"index": row["index"], "prompt": prompt, "chosen": chosen, "rejected": rejected}


def ours_child(args: argparse.Namespace) -> None:
    """Our side: train.py's step on the same token ids, in a one-rank process group."""
    from simpo.world import init_world, shutdown

    run_ours(args, init_world())
    shutdown()  # after run_ours returned: no model is referenced any more


def run_ours(args: argparse.Namespace, world: Any) -> None:
    import torch

    from simpo.config import LossConfig
    from simpo.data import TokenizedPair
    from simpo.fsdp import build_model
    from simpo.packing import PackedBatch, plan_micro_batches
    from simpo.step import train_step

    base = rss_gb()
    pairs = [
        TokenizedPair(p["prompt"], p["chosen"], p["rejected"], p["index"])
        for p in json.loads((args.work / f"pairs-{args.max_length}.json").read_text())
    ]
    model = build_model(args.model, world, "fp32")
    cfg = LossConfig(name="simpo", beta=BETA, gamma_beta_ratio=GAMMA_BETA_RATIO)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)  # as TRL's default
    B = args.pairs_per_step
    batches = [
        plan_micro_batches(pairs[s : s + B], args.max_tokens)
        for s in range(0, len(pairs) - B + 1, B)
    ]

    def step(micro: list[PackedBatch]) -> float:  # train.py's step, without logging
        sums = train_step(model, micro, cfg, B, world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(sums["loss"]) / B

    scored = [  # our head scores the response tokens only: the N rows of the ScoreIndex
        sum(mb.score.targets.numel() for mb in micro) for micro in batches
    ]
    time_steps(step, batches, args.steps, base, scored)


if __name__ == "__main__":
    main()
