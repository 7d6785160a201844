"""On-policy preference data: the policy answers each prompt K times, a reward scores the
answers, the best and the worst become a pair (SimPO's Instruct pipeline).

    python onpolicy.py --policy runs/sft/final --reward ArmoRM-Llama3-8B-v0.1 \\
        --prompts ultrafeedback_prompts.jsonl --out runs/onpolicy
    torchrun --nproc_per_node 8 onpolicy.py ...              # shards dealt to ranks
    python onpolicy.py ... --reward mypkg.checks:reward      # a verifiable reward function
    python train.py --config configs/X.toml --data.train=runs/onpolicy/pairs.jsonl

The prompts file has a string `prompt` per row (UltraFeedback rows work as they are);
repeated prompts are sampled once. Stages (--stage all, or one of them):
  generate  OUT/generate/NNNNN.jsonl: K sampled responses per prompt (simpo.generate). The
            defaults are the official decode.py's: 5 samples, temperature 0.8, top-p 0.95, up
            to 4096 new tokens. Sample k of prompt i is seeded by (--seed, i, k).
  score     OUT/score/NNNNN.jsonl: a reward per response, from a reward model directory
            (*ForSequenceClassification or ArmoRM, in its own chat template; simpo.reward)
            or from `module:function` called as function(prompt, response) -> float.
  binarize  OUT/samples.jsonl (per prompt: prompt, responses, rewards), OUT/pairs.jsonl
            (chosen = highest reward, rejected = lowest, the UltraFeedback schema train.py
            reads) and OUT/summary.json; prompts that give no pair are counted by reason
            (simpo.binarize).
Resumable (simpo.shards): shards of --shard-size prompts are written whole as they finish; a
rerun of the same command skips finished shards, and a rerun of a finished one changes nothing.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from simpo.binarize import binarize
from simpo.conventions import encode_prompt, with_system
from simpo.data import DataError
from simpo.generate import release_pool, sample, sample_key
from simpo.hf import load_model
from simpo.model import Transformer
from simpo.progress import progress_bar
from simpo.readers import Skip, parse_row, read_records
from simpo.reward import (
    RewardError,
    call_reward_function,
    encode_group,
    load_reward_function,
    load_reward_model,
    reward_tokenizer,
    score_groups,
)
from simpo.shards import (
    ShardError,
    check_settings,
    finished_shards,
    jsonl,
    read_jsonl,
    remove_temporary,
    shard_path,
    write_atomic,
    write_if_changed,
)
from simpo.templates import ChatTemplate, TemplateError, get_template
from simpo.tokenizer import Tokenizer, TokenizerError

STAGES = ("all", "generate", "score", "binarize")


class OnPolicyError(ValueError):
    """Bad input to onpolicy.py; the message names the file, line or option."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="onpolicy.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", help="HF-format checkpoint that answers the prompts")
    p.add_argument("--reward", help="reward model directory, or module:function")
    p.add_argument("--prompts", help="prompt file (.jsonl / .json / .gz / .parquet), `prompt`")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--stage", default="all", choices=STAGES)
    p.add_argument("--samples", type=int, default=5, help="responses per prompt (K)")
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit", type=int, default=0, help="only the first N prompts (0 = all)")
    p.add_argument("--template", default="auto", help="the policy's chat template (named)")
    p.add_argument("--chat-template", default="", help="the policy's: a Jinja file (or text)")
    p.add_argument(
        "--system", default=None,
        help="a system message first in every prompt (default none, as the official decode.py;"
        " --system= matches training prompts of the official convention)",
    )  # fmt: skip
    p.add_argument("--tokenizer", help="the policy's tokenizer directory, if not --policy")
    p.add_argument(
        "--reward-template", default="auto",
        help="the reward model's chat template: auto (its own), a name, or a Jinja file",
    )  # fmt: skip
    p.add_argument("--shard-size", type=int, default=256, help="prompts per output shard")
    p.add_argument("--batch-prompts", type=int, default=32, help="prompts decoded together")
    p.add_argument(
        "--max-batch-slots", type=int, default=0,
        help="KV-cache slots per batch (rows x length); 0 = half the free GPU memory",
    )  # fmt: skip
    p.add_argument("--reward-batch-tokens", type=int, default=16384)
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--no-compile", action="store_true", help="eager decoding on CUDA too")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def read_prompts(path: Path, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Distinct prompts in file order ({"prompt", and "prompt_id" if the row has one}) and the
    number of repeats dropped. Errors name the file, line and field."""
    try:
        records, unit = read_records(path)
    except DataError as e:
        raise OnPolicyError(str(e)) from None
    prompts, seen, repeats = [], set(), 0
    for i, value in records:
        where = f"{path}:{i + 1}" if unit == "line" else f"{path} row {i + 1}"
        try:
            row = parse_row(value)
        except Skip as e:
            raise OnPolicyError(f"{where}: {e.reason.replace('_', ' ')}: {e.detail}") from None
        if not isinstance(row.get("prompt"), str):
            got = type(row["prompt"]).__name__ if "prompt" in row else f"fields {sorted(row)}"
            raise OnPolicyError(f"{where}: expected a string field 'prompt', got {got}")
        if row["prompt"] in seen:
            repeats += 1
            continue
        seen.add(row["prompt"])
        prompts.append({"prompt": row["prompt"]} | {k: row[k] for k in ("prompt_id",) if k in row})
        if len(prompts) == limit:
            break
    if not prompts:
        raise OnPolicyError(f"{path}: no prompts (expected rows with a string field 'prompt')")
    return prompts, repeats


def check_inputs(args: argparse.Namespace) -> None:
    """Fail before any model is loaded, naming what is missing."""
    if args.samples < 1 or args.max_new_tokens < 1 or args.shard_size < 1:
        raise OnPolicyError("--samples, --max-new-tokens and --shard-size must be >= 1")
    if args.stage in ("all", "generate"):
        for flag in ("policy", "prompts"):
            if not getattr(args, flag):
                raise OnPolicyError(f"--stage {args.stage} needs --{flag}")
        policy = Path(args.policy)
        tok = Path(args.tokenizer or policy)
        if not (policy / "config.json").is_file() or not any(policy.glob("*.safetensors")):
            raise OnPolicyError(f"{policy}: not a HF checkpoint (config.json + safetensors)")
        if not any((tok / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
            raise OnPolicyError(f"{tok}: no tokenizer.model or tokenizer.json (see --tokenizer)")
        get_template(Tokenizer.from_dir(tok), args.template, args.chat_template)  # or names why
        read_prompts(Path(args.prompts), args.limit)
    if args.stage in ("all", "score"):
        if not args.reward:
            raise OnPolicyError(f"--stage {args.stage} needs --reward")
        if Path(args.reward).is_dir():
            reward_tokenizer(args.reward, args.reward_template)
        else:
            if os.getcwd() not in sys.path:  # a module beside the caller imports
                sys.path.insert(0, os.getcwd())
            load_reward_function(args.reward)


def rank_and_device() -> tuple[int, int, torch.device]:
    """This process's rank and world size (torchrun's environment, or 0 of 1) and device. Ranks
    share work through the shard files only: no process group, so no collective can time out
    while one rank is still sampling."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return rank, world, device
    return rank, world, torch.device("cpu")


def model_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def wait_for(path: Path, args: argparse.Namespace, world: int, what: str) -> None:
    """Wait for a shard another rank is writing (--stage all, several ranks); else fail."""
    while not path.is_file():
        if args.stage != "all" or world == 1:
            raise OnPolicyError(f"{path} is missing: run the {what} stage first")
        time.sleep(5)


def recorded(out: Path, stage: str) -> dict[str, Any]:
    """The settings a stage ran with (settings.json), or an error if it has not run."""
    path = out / "settings.json"
    settings = json.loads(path.read_text()) if path.is_file() else {}
    if stage not in settings:
        raise OnPolicyError(f"{out}: the {stage} stage has not run here (no {stage} in {path})")
    return settings[stage]


def log(out: Path, rank: int, record: dict[str, Any]) -> None:
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with open(out / "logs" / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def kv_slot_budget(model: Transformer, device: torch.device) -> int:
    """KV-cache slots that fit in half the free accelerator memory (CPU: 2**22)."""
    if device.type != "cuda":
        return 1 << 22
    a = model.args
    per_slot = 2 * a.n_layers * a.n_kv_heads * a.head_dim * model.head_weight.element_size()
    return int(0.5 * torch.cuda.mem_get_info(device)[0] / per_slot)


def sample_shard(
    args: argparse.Namespace, model: Transformer, tokenizer: Tokenizer, rows: list[dict],
    slots: int, bar: Any,
) -> None:  # fmt: skip
    """Add `responses`, `stopped`, `num_tokens` to each row (or a `skipped` reason)."""
    context, todo = model.args.max_position_embeddings, []
    for row in rows:
        messages = [{"role": "user", "content": row["prompt"]}]
        ids = encode_prompt(
            with_system(messages, args.system), tokenizer, args.template, args.chat_template
        )
        if len(ids) + args.max_new_tokens <= context:
            todo.append((row, ids))
            continue
        detail = f"{len(ids)} prompt tokens + {args.max_new_tokens} new > context {context}"
        row |= {"skipped": "prompt_too_long", "detail": detail}
        bar.update(1)
    K = args.samples
    completions = sample(
        model, [ids for _, ids in todo], args.max_new_tokens, num_samples=K,
        temperature=args.temperature, top_p=args.top_p, stop_ids=tokenizer.stop_ids,
        keys=[[sample_key(args.seed, row["index"], k) for k in range(K)] for row, _ in todo],
        batch_prompts=args.batch_prompts, max_slots=slots,
        vocab_size=min(tokenizer.vocab_size, model.head_weight.shape[0]),
        compile=False if args.no_compile else None, progress=bar.update,
    )  # fmt: skip
    for (row, _), per_prompt in zip(todo, completions, strict=True):
        row["responses"] = [tokenizer.decode(c.tokens, skip_special=True) for c in per_prompt]
        row["stopped"] = [c.stopped for c in per_prompt]
        row["num_tokens"] = [len(c.tokens) for c in per_prompt]


def generate_stage(
    args: argparse.Namespace, out: Path, rank: int, world: int, device: torch.device
) -> None:
    prompts, repeats = read_prompts(Path(args.prompts), args.limit)
    settings = {
        "policy": str(Path(args.policy).resolve()), "prompts": str(Path(args.prompts).resolve()),
        "prompts_sha256": hashlib.sha256(Path(args.prompts).read_bytes()).hexdigest(),
        "num_prompts": len(prompts), "repeated_prompts": repeats, "limit": args.limit,
        "samples": args.samples, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
        "template": args.template, "chat_template": args.chat_template,
        "shard_size": args.shard_size,
        "dtype": str(model_dtype(args, device)).removeprefix("torch."),
    }  # fmt: skip
    check_settings(out, "generate", settings)
    size, n = args.shard_size, len(prompts)
    done = finished_shards(out / "generate")
    mine = [s for s in range(math.ceil(n / size)) if s % world == rank and s not in done]
    if not mine:
        return
    tokenizer = Tokenizer.from_dir(args.tokenizer or args.policy)
    model = load_model(args.policy, model_dtype(args, device), device).eval()
    slots = args.max_batch_slots or kv_slot_budget(model, device)
    total = sum(len(range(s * size, min(n, (s + 1) * size))) for s in mine)
    bar = progress_bar(total=total, desc=f"sampling (rank {rank})", disable=args.quiet or rank != 0)
    for s in mine:
        t0 = time.perf_counter()
        rows = [{"index": i, **prompts[i]} for i in range(s * size, min(n, (s + 1) * size))]
        sample_shard(args, model, tokenizer, rows, slots, bar)
        write_atomic(shard_path(out / "generate", s), jsonl(rows))
        new, seconds = sum(sum(r.get("num_tokens", [])) for r in rows), time.perf_counter() - t0
        record = {"stage": "generate", "shard": s, "prompts": len(rows), "new_tokens": new}
        log(out, rank, record | {"seconds": seconds, "tokens_per_s": new / seconds})
    bar.close()
    del model
    release_pool()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def score_with_function(rows: list[dict], fn: Any, spec: str) -> None:
    """rewards = fn(prompt, response) for each sampled row; a failure skips the prompt."""
    for row in rows:
        if "skipped" in row:
            continue
        try:
            row["rewards"] = [call_reward_function(fn, row["prompt"], r) for r in row["responses"]]
        except RewardError as e:
            row |= {"skipped": "reward_error", "detail": f"{spec}: {e}"}


def score_with_model(rows: list[dict], rm: Any, tokenizer: Tokenizer, chat: ChatTemplate,
                     max_tokens: int) -> None:  # fmt: skip
    """rewards from a reward model, a prompt's responses in one row of a batch."""
    todo, context = [], rm.args.max_position_embeddings
    for row in rows:
        if "skipped" in row:
            continue
        messages = [{"role": "user", "content": row["prompt"]}]
        try:
            group = encode_group(rm, tokenizer, chat, messages, row["responses"])
        except RewardError as e:
            row |= {"skipped": "reward_error", "detail": str(e)}
            continue
        longest = max(len(ids) for ids, _ in group)
        if longest > context:
            row |= {"skipped": "reward_context", "detail": f"{longest} tokens > {context}"}
        else:
            todo.append((row, group))
    rewards = score_groups(rm, [g for _, g in todo], max_tokens) if todo else []
    for (row, _), r in zip(todo, rewards, strict=True):
        row["rewards"] = r


def score_stage(
    args: argparse.Namespace, out: Path, rank: int, world: int, device: torch.device
) -> None:
    gen = recorded(out, "generate")
    is_model = Path(args.reward).is_dir()
    reward = str(Path(args.reward).resolve()) if is_model else args.reward
    template = args.reward_template if is_model else None
    check_settings(out, "score", {"generate": gen, "reward": reward, "reward_template": template})
    n_shards = math.ceil(gen["num_prompts"] / gen["shard_size"])
    done = finished_shards(out / "score")
    mine = [s for s in range(n_shards) if s % world == rank and s not in done]
    if not mine:
        return
    if is_model:
        tokenizer, chat = reward_tokenizer(args.reward, args.reward_template)
        rm = load_reward_model(args.reward, model_dtype(args, device), device)
    else:
        fn = load_reward_function(args.reward)
    bar = progress_bar(
        total=len(mine), desc=f"scoring shards (rank {rank})", disable=args.quiet or rank != 0
    )
    for s in mine:
        wait_for(shard_path(out / "generate", s), args, world, "generate")
        t0, rows = time.perf_counter(), read_jsonl(shard_path(out / "generate", s))
        for row in rows:  # as the official post-processing: dropped before scoring
            if "skipped" not in row and len(set(row["responses"])) == 1:
                row["skipped"] = "identical_responses"
        if is_model:
            score_with_model(rows, rm, tokenizer, chat, args.reward_batch_tokens)
        else:
            score_with_function(rows, fn, args.reward)
        write_atomic(shard_path(out / "score", s), jsonl(rows))
        log(out, rank, {"stage": "score", "shard": s, "prompts": len(rows),
                        "seconds": time.perf_counter() - t0})  # fmt: skip
        bar.update(1)
    bar.close()


def binarize_stage(args: argparse.Namespace, out: Path, world: int) -> dict[str, Any]:
    gen = recorded(out, "score")["generate"]
    rows = []
    for s in range(math.ceil(gen["num_prompts"] / gen["shard_size"])):
        wait_for(shard_path(out / "score", s), args, world, "score")
        rows += read_jsonl(shard_path(out / "score", s))
    samples, pairs, summary = binarize(rows)
    summary["repeated_prompts"] = gen["repeated_prompts"]
    write_if_changed(out / "samples.jsonl", jsonl(samples))
    write_if_changed(out / "pairs.jsonl", jsonl(pairs))
    write_if_changed(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the stages; rank 0 returns the summary (None elsewhere, or without binarize)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_inputs(args)
    out = Path(args.out)
    rank, world, device = rank_and_device()
    if world == 1:  # several ranks: another one may be writing its temporary file right now
        for stage in ("generate", "score"):
            remove_temporary(out / stage)
    if args.stage in ("all", "generate"):
        generate_stage(args, out, rank, world, device)
    if args.stage in ("all", "score"):
        score_stage(args, out, rank, world, device)
    if args.stage in ("all", "binarize") and rank == 0:
        summary = binarize_stage(args, out, world)
        if not args.quiet:
            print(json.dumps(summary, indent=2) + f"\nwrote {out / 'pairs.jsonl'}", flush=True)
        return summary
    return None


if __name__ == "__main__":
    try:
        main()
    except (OnPolicyError, RewardError, ShardError, TemplateError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
