"""Evaluate a checkpoint on preference pairs, and generate answers for AlpacaEval.

    python eval.py --model runs/simpo/final --data heldout.jsonl [--ref runs/sft/final]
    python eval.py --model runs/simpo/final --prompts alpaca_eval.json --max-new-tokens 2048
    torchrun --nproc_per_node 8 eval.py --model DIR --data prefs.jsonl     # data-parallel

Works on any Hugging Face-format directory (config.json, safetensors, tokenizer). On a
preference file it reports preference accuracy and mean margin under SimPO's reward
β·avg log π(y|x) and, with --ref, under DPO's reward β_dpo·(log π(y|x) − log π_ref(y|x));
mean per-token log-probs; and the length diagnostics that motivate SimPO: the Pearson
correlation between reward and response length, and accuracy split by which response is
longer (a length-exploiting model wins the chosen-longer pairs and loses the others).
Generation (greedy or top-p sampling with a KV cache, the checkpoint's chat template and
stop tokens) writes AlpacaEval's model_outputs.json. Outputs go to --out: metrics.json,
scores.jsonl (per pair log-prob sums and token counts) and model_outputs.json; when --model
is a train.py export, its model card (README.md) gets a row of results per data file
(--no-card leaves it alone).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from simpo import exits
from simpo.config import EVAL_PRESETS, ConfigError, DataConfig, EvalConfig
from simpo.conventions import encode_prompt, with_system
from simpo.data import DataError, load_pairs
from simpo.generate import generate
from simpo.hf import ModelFileError, load_model
from simpo.model import Transformer
from simpo.model_card import add_eval_results
from simpo.progress import progress_bar
from simpo.readers import Fields, Skip, detect_format, parse_row, read_records, to_example
from simpo.runfiles import FolderInUseError, WriteError, hold_folder, release_folders, write_atomic
from simpo.scoring import score_pairs
from simpo.templates import TemplateError
from simpo.tokenizer import Tokenizer, TokenizerError
from simpo.world import World, init_world, print0, shutdown

OUTPUT_FILES = ("metrics.json", "scores.jsonl", "model_outputs.json")
SCORE_CHUNK = 512  # pairs per score_pairs call: the progress bar advances per chunk


class EvalError(ValueError):
    """Bad input to eval.py; the message names the file, line and field."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    e, d = EvalConfig(), DataConfig()
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF-format checkpoint directory")
    p.add_argument("--data", help="preference file (.jsonl, .json, .gz, .parquet)")
    p.add_argument("--out", default="runs/eval", help="output directory")
    p.add_argument("--ref", help="reference checkpoint: adds the DPO-reward metrics")
    p.add_argument("--tokenizer", help="tokenizer directory, if not inside --model")
    p.add_argument("--beta", type=float, default=2.0, help="β of SimPO's reward β·avg logp")
    p.add_argument("--dpo-beta", type=float, default=0.1, help="β of DPO's reward")
    p.add_argument("--limit", type=int, default=0, help="score only the first N pairs (0 = all)")
    p.add_argument("--prompts", help="generate for this file: .jsonl / .json of {instruction}")
    p.add_argument(
        "--num-prompts", type=int, default=-1,
        help="prompts to generate for: default all of --prompts, none from --data",
    )  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=e.max_new_tokens)
    p.add_argument("--temperature", type=float, default=e.temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=e.top_p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--gen-batch", type=int, default=e.gen_batch, help="prompts decoded together")
    p.add_argument("--generator", help="name in model_outputs.json (default: the model's dir)")
    p.add_argument("--template", default=d.template, help="chat template (default: detected)")
    p.add_argument("--chat-template", default="", help="Jinja chat template file (or text)")
    p.add_argument(
        "--system",
        default=None,
        help="a system message first in every generation prompt; --system= (empty) matches "
        "the official convention's training prompts, which carry an empty system turn",
    )
    p.add_argument("--mask", default=d.mask, choices=("official", "trl"))
    p.add_argument("--truncation-rule", default=d.truncation_rule, choices=("fit", "official"))
    p.add_argument(
        "--preset", choices=sorted(EVAL_PRESETS),
        help="AlpacaEval generation settings of an official SimPO run (temperature, top-p, "
        "max new tokens); explicit flags win",
    )  # fmt: skip
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--max-prompt-length", type=int, default=d.max_prompt_length)
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--no-card", action="store_true",
        help="leave the model card alone (default: add the results to --model's README.md "
        "when train.py wrote it)",
    )  # fmt: skip
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**EVAL_PRESETS[preset])
    args = p.parse_args(argv)
    check_args(args)
    return args


# flag -> (test, what is expected): values argparse accepts but that make the run meaningless
ARG_RANGES = {
    "beta": (lambda v: v > 0, "> 0 (the reward is beta x avg log-prob: 0 makes every pair a tie)"),
    "dpo_beta": (lambda v: v > 0, "> 0"),
    "limit": (lambda v: v >= 0, ">= 0 (0 = all)"),
    "num_prompts": (lambda v: v >= -1, ">= -1 (-1 = the default)"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "temperature": (lambda v: v >= 0, ">= 0 (0 = greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "0 < x <= 1"),
    "gen_batch": (lambda v: v >= 1, ">= 1"),
    "max_length": (lambda v: v >= 2, ">= 2"),
    "max_prompt_length": (lambda v: v >= 1, ">= 1"),
}


def check_args(args: argparse.Namespace) -> None:
    """A ConfigError (exit 2) naming the first flag whose value makes the run meaningless."""
    for name, (ok, expected) in ARG_RANGES.items():
        value = getattr(args, name)
        if not ok(value):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"command line: {flag} {value}: expected {expected}")
    if args.max_prompt_length >= args.max_length:
        raise ConfigError(
            f"command line: --max-prompt-length {args.max_prompt_length}: expected < "
            f"--max-length {args.max_length} (the response gets what is left)"
        )


def check_checkpoint(path: Path, tokenizer_dir: Path) -> None:
    """Fail early, naming every missing piece, if `path` is not a usable HF checkpoint."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json (the architecture)")
    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").exists():
        missing.append("model.safetensors or model.safetensors.index.json (the weights)")
    if not any((tokenizer_dir / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        missing.append(f"tokenizer.model or tokenizer.json in {tokenizer_dir} (see --tokenizer)")
    if not path.is_dir():
        raise EvalError(f"{path}: checkpoint directory does not exist")
    if missing:
        raise EvalError(f"{path} is not a Hugging Face checkpoint: missing {'; '.join(missing)}")


def read_prompt_file(path: Path) -> list[dict[str, Any]]:
    """Rows of a prompt file (.jsonl, or a .json list like AlpacaEval's), each with a string
    'instruction'; other fields (e.g. AlpacaEval's 'dataset') are carried to the outputs."""
    try:
        records, unit = read_records(path)
    except DataError as e:
        raise EvalError(str(e)) from None
    prompts = []
    for i, value in records:
        where = f"{path}:{i + 1}" if unit == "line" else f"{path} row {i + 1}"
        try:
            row = parse_row(value)
        except Skip as e:
            raise EvalError(f"{where}: {e.reason.replace('_', ' ')}: {e.detail}") from None
        if not isinstance(row.get("instruction"), str):
            got = (
                f"it is {type(row['instruction']).__name__}"
                if "instruction" in row
                else f"the row has {sorted(row)}"
            )
            raise EvalError(f"{where}: expected a string field 'instruction'; {got}")
        prompts.append({**row, "messages": [{"role": "user", "content": row["instruction"]}]})
    return prompts


def prompts_from_prefs(path: Path, limit: int, fields: Fields) -> list[dict[str, Any]]:
    """The first `limit` distinct prompts of a preference file (rows that do not parse are
    skipped, as the data loader skips them)."""
    records, _ = read_records(path)
    rows = []
    for _, value in records:
        try:
            rows.append(parse_row(value))
        except Skip:
            continue
    fmt, out, seen = detect_format(rows, fields), [], set()
    for row in rows:
        try:
            messages = to_example(row, fmt, fields).prompt
        except Skip:
            continue
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            out.append({"instruction": messages[-1]["content"], "messages": messages})
        if len(out) == limit:
            break
    return out


def pearson(x: Tensor, y: Tensor) -> float | None:
    """Pearson correlation of two 1-D tensors; None when either is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    return None if denom == 0 else float((x * y).sum() / denom)


def preference_metrics(rewards: Tensor, lengths: Tensor) -> dict[str, float | None]:
    """Accuracy, margin and length diagnostics of per-pair rewards (P, 2) [chosen, rejected]
    with response lengths (P, 2) in tokens."""
    correct = (rewards[:, 0] > rewards[:, 1]).double()  # (P,) ties count as wrong
    chosen_longer = lengths[:, 0] > lengths[:, 1]
    rejected_longer = lengths[:, 1] > lengths[:, 0]

    return {
        "accuracy": mean(correct),
        "margin": mean(rewards[:, 0] - rewards[:, 1]),
        "reward_chosen": mean(rewards[:, 0]),
        "reward_rejected": mean(rewards[:, 1]),
        "length_corr": pearson(rewards.flatten(), lengths.flatten()),
        "accuracy_chosen_longer": mean(correct[chosen_longer]),
        "accuracy_rejected_longer": mean(correct[rejected_longer]),
    }


def mean(x: Tensor) -> float | None:
    return float(x.double().mean()) if x.numel() else None


def score_in_chunks(
    model: Transformer, pairs: list, max_tokens: int, world: World, bar: bool
) -> tuple[Tensor, Tensor]:
    """Log-prob sums and token counts (P, 2) each, columns [chosen, rejected], in the order
    of `pairs` (file order); every rank scores its share of each chunk."""
    sums, counts = [], []
    chunks = range(0, len(pairs), SCORE_CHUNK)
    for i in progress_bar(chunks, desc="scoring", unit="chunk", disable=not bar):
        chunk = pairs[i : i + SCORE_CHUNK]
        _, s, c = score_pairs(model, chunk, max_tokens, "shared_prompt", world)  # sorted by index
        sums.append(s)
        counts.append(c)
    return torch.cat(sums), torch.cat(counts)


def load_for_eval(path: Path, args: argparse.Namespace, world: World) -> Transformer:
    cuda = world.device.type == "cuda"
    dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and cuda) else None
    return load_model(path, dtype=dtype or torch.float32, device=world.device).eval()


@torch.no_grad()
def restrict_vocab(model: Transformer, n: int) -> None:
    """Keep only the head rows of the tokenizer's `n` ids, so generation never emits an id the
    tokenizer cannot decode (Gemma and Qwen2 pad the embedding past their tokenizers)."""
    if model.head_weight.shape[0] <= n:
        return
    if model.lm_head is None:  # tied: the inputs come from the tokenizer, so all are < n
        model.model.embed_tokens.weight = nn.Parameter(model.model.embed_tokens.weight[:n])
    else:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight[:n])


def generate_outputs(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[dict],
    args: argparse.Namespace,
    world: World,
) -> tuple[list[dict[str, Any]], list[int]]:
    """AlpacaEval rows {instruction, output, generator, ...} and generated token counts.

    Batches are dealt to ranks round-robin; batch b samples with seed + b, so the outputs do
    not depend on the number of ranks."""
    ids = [
        encode_prompt(with_system(p["messages"], args.system), tokenizer, args.template,
                      args.chat_template)
        for p in prompts
    ]  # fmt: skip
    restrict_vocab(model, tokenizer.vocab_size)
    starts = range(0, len(ids), args.gen_batch)
    mine: list[tuple[int, list[int]]] = []
    bar = progress_bar(total=len(starts), desc="generating", disable=not show(args, world))
    for b, start in enumerate(starts):
        if b % world.world_size == world.rank:
            batch = ids[start : start + args.gen_batch]
            out = generate(
                model, batch, args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, stop_ids=tokenizer.stop_ids, seed=args.seed + b,
            )  # fmt: skip
            mine += list(zip(range(start, start + len(batch)), out, strict=True))
        bar.update(1)
    bar.close()
    gathered = [mine]
    if world.world_size > 1:
        gathered = [None] * world.world_size
        dist.all_gather_object(gathered, mine)
    tokens = dict(item for part in gathered for item in part)
    name = args.generator or model_name(Path(args.model))
    rows = []
    for i, p in enumerate(prompts):
        extra = {k: v for k, v in p.items() if k not in ("messages", "output", "generator")}
        text = tokenizer.decode(tokens[i], skip_special=True)
        rows.append({**extra, "output": text, "generator": name})
    return rows, [len(tokens[i]) for i in range(len(prompts))]


def model_name(path: Path) -> str:
    """runs/simpo/final -> 'simpo'; any other directory -> its own name."""
    path = path.resolve()
    return path.parent.name if path.name == "final" else path.name


def check_inputs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Validate the command line before any process group or model exists; the prompts to
    generate for (possibly none)."""
    if not args.data and not args.prompts:
        raise EvalError("nothing to do: give --data (a preference file) and/or --prompts")
    tok_dir = Path(args.tokenizer or args.model)
    for path in (args.model, args.ref) if args.ref else (args.model,):
        check_checkpoint(Path(path), tok_dir)
    if args.prompts:
        prompts = read_prompt_file(Path(args.prompts))
    elif args.num_prompts > 0:
        prompts = prompts_from_prefs(Path(args.data), args.num_prompts, Fields())
    else:
        return []
    return prompts[: args.num_prompts] if args.num_prompts >= 0 else prompts


def run_eval(
    args: argparse.Namespace, prompts: list[dict[str, Any]], world: World
) -> tuple[dict[str, Any], list[dict], list[dict]]:
    """(metrics, per-pair scores, AlpacaEval outputs); every rank returns the same."""
    model_dir, tok_dir = Path(args.model), Path(args.tokenizer or args.model)
    tokenizer = Tokenizer.from_dir(tok_dir)
    metrics: dict[str, Any] = {"model": str(model_dir), "data": args.data, "ref": args.ref}
    per_pair: list[dict] = []
    outputs: list[dict] = []
    model = load_for_eval(model_dir, args, world)
    if args.data:
        cfg = DataConfig(
            template=args.template, chat_template=args.chat_template, mask=args.mask,
            truncation_rule=args.truncation_rule, max_length=args.max_length,
            max_prompt_length=args.max_prompt_length, num_workers=1,
        )  # fmt: skip
        pairs, report = load_pairs(args.data, tokenizer, cfg, progress=show(args, world))
        pairs = pairs[: args.limit] if args.limit > 0 else pairs
        print0(report.summary())
        max_tokens = 2 * args.max_length  # fits any pair: a pair has <= 2 x max_length tokens
        sums, counts = score_in_chunks(
            model, pairs, max_tokens, world, show(args, world)
        )  # (P, 2) each
        metrics |= {"num_pairs": len(pairs), "num_skipped": report.num_skipped}
        metrics |= {"beta": args.beta} | preference_metrics(args.beta * sums / counts, counts)
        metrics |= {
            "logp_chosen": mean(sums[:, 0] / counts[:, 0]),
            "logp_rejected": mean(sums[:, 1] / counts[:, 1]),
            "length_chosen": mean(counts[:, 0]),
            "length_rejected": mean(counts[:, 1]),
        }
        per_pair = [
            {"index": p.index, "logp_sum": s, "length": c}
            for p, s, c in zip(pairs, sums.tolist(), counts.long().tolist(), strict=True)
        ]
    if prompts:
        outputs, lengths = generate_outputs(model, tokenizer, prompts, args, world)
        n = max(len(outputs), 1)
        metrics |= {
            "gen_num": len(outputs),
            "gen_mean_tokens": sum(lengths) / n,
            "gen_mean_chars": sum(len(o["output"]) for o in outputs) / n,
            "gen_hit_max_tokens": sum(k >= args.max_new_tokens for k in lengths) / n,
        }
    del model  # before the reference is loaded: never two models in memory
    if args.data and args.ref:
        ref_model = load_for_eval(Path(args.ref), args, world)
        ref_sums, _ = score_in_chunks(ref_model, pairs, max_tokens, world, show(args, world))
        del ref_model
        dpo = preference_metrics(args.dpo_beta * (sums - ref_sums), counts)
        metrics |= {"dpo_beta": args.dpo_beta} | {f"dpo_{k}": v for k, v in dpo.items()}
        for row, ref in zip(per_pair, ref_sums.tolist(), strict=True):
            row["ref_logp_sum"] = ref
    return metrics, per_pair, outputs


def show(args: argparse.Namespace, world: World) -> bool:
    """Progress bars: on rank 0 unless --quiet."""
    return world.is_main and not args.quiet


TABLE = (
    ("pairs", "num_pairs", "{:d}"),
    ("skipped", "num_skipped", "{:d}"),
    ("accuracy (SimPO reward)", "accuracy", "{:.3f}"),
    ("margin (SimPO reward)", "margin", "{:.3f}"),
    ("  chosen-longer pairs", "accuracy_chosen_longer", "{:.3f}"),
    ("  rejected-longer pairs", "accuracy_rejected_longer", "{:.3f}"),
    ("  corr(reward, length)", "length_corr", "{:+.3f}"),
    ("accuracy (DPO reward)", "dpo_accuracy", "{:.3f}"),
    ("margin (DPO reward)", "dpo_margin", "{:.3f}"),
    ("  chosen-longer pairs", "dpo_accuracy_chosen_longer", "{:.3f}"),
    ("  rejected-longer pairs", "dpo_accuracy_rejected_longer", "{:.3f}"),
    ("  corr(reward, length)", "dpo_length_corr", "{:+.3f}"),
    ("logp/token chosen", "logp_chosen", "{:.3f}"),
    ("logp/token rejected", "logp_rejected", "{:.3f}"),
    ("length chosen (tokens)", "length_chosen", "{:.1f}"),
    ("length rejected (tokens)", "length_rejected", "{:.1f}"),
    ("generated", "gen_num", "{:d}"),
    ("generated length (tokens)", "gen_mean_tokens", "{:.1f}"),
    ("hit max-new-tokens", "gen_hit_max_tokens", "{:.3f}"),
)


def format_table(metrics: dict[str, Any]) -> str:
    """The metrics present, one per line: label and value."""
    lines = []
    for label, key, fmt in TABLE:
        value = metrics.get(key)
        if key in metrics:
            lines.append(f"{label:<28} {'-' if value is None else fmt.format(value)}")
    return "\n".join(lines)


def write_outputs(out: Path, metrics: dict, per_pair: list[dict], outputs: list[dict]) -> None:
    """Each file replaced atomically; a file this run does not produce is removed, so an
    earlier run's scores or generations never sit beside new metrics."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"metrics.json": json.dumps(metrics, indent=2) + "\n"}
    if per_pair:
        files["scores.jsonl"] = "".join(json.dumps(r) + "\n" for r in per_pair)
    if outputs:
        files["model_outputs.json"] = json.dumps(outputs, indent=2, ensure_ascii=False) + "\n"
    for name in OUTPUT_FILES:
        if name in files:
            write_atomic(out / name, files[name])
        else:
            (out / name).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the evaluation in a process group (one rank without torchrun); the metrics."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    prompts = check_inputs(args)
    world = init_world()
    try:
        if world.is_main:  # before any work: a second eval into the same --out stops here
            hold_folder(Path(args.out), "--out")
        metrics, per_pair, outputs = run_eval(args, prompts, world)
        if world.is_main:
            write_outputs(Path(args.out), metrics, per_pair, outputs)
    except BaseException:
        shutdown(clean=False)
        raise
    finally:
        release_folders()
    shutdown()
    if world.is_main:
        print(format_table(metrics) + f"\nwrote {args.out}/", flush=True)
        if not args.no_card:
            update_card(args, metrics)
    return metrics


def update_card(args: argparse.Namespace, metrics: dict[str, Any]) -> None:
    """Add the results to the model card train.py wrote in --model (a row per data file)."""
    name = Path(args.data or args.prompts).name
    try:
        card = add_eval_results(Path(args.model), name, metrics)
    except OSError as e:  # a read-only checkpoint: the results are in --out all the same
        print(f"warning: model card of {args.model} not updated: {e}", file=sys.stderr)
        return
    if card:
        print(f"added the results on {name} to {card}", flush=True)


# How the script ends (simpo/exits.py): one line per error; these exit 2, those 1.
USAGE_ERRORS = (ConfigError, FolderInUseError)
RUN_ERRORS = (EvalError, DataError, TemplateError, TokenizerError, ModelFileError, WriteError)

if __name__ == "__main__":
    sys.exit(exits.run(main, USAGE_ERRORS, RUN_ERRORS))
