"""Preference optimisation (SimPO, DPO and relatives, SFT) of a decoder LLM with FSDP2.

    python train.py --config configs/tiny-cpu.toml                       # one process
    torchrun --nproc_per_node 8 train.py --config configs/llama3-8b-instruct-simpo.toml \\
        --model.path /ckpt/Meta-Llama-3-8B-Instruct --data.train prefs.jsonl
    python train.py --help                                               # every config key

One optimizer step takes the next `train.batch_size` pairs (all ranks together) in a seeded
order, deals them to the ranks, packs each rank's share into micro-batches of at most
`data.max_tokens` tokens, and sums the per-pair losses of all micro-batches divided by the
pairs of the whole step: gradient accumulation is implicit and the result does not depend on
the number of ranks. Writes metrics.jsonl, config.toml, checkpoints/step_N/ and final/ (HF).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from simpo import exits
from simpo.checkpoint import (
    TrainingError,
    choose_checkpoint,
    export_final,
    latest_checkpoint,
    prepare_output_dir,
    save_checkpoint,
    sigterm_flag,
)
from simpo.config import Config, ConfigError, check_data_fits, parse_args, to_toml
from simpo.data import DataError, load_datasets
from simpo.demo.tiny import fill_in_defaults
from simpo.fsdp import build_model
from simpo.hf import ModelFileError
from simpo.losses import check_loss_config, get_loss
from simpo.metrics import (
    matmul_params,
    peak_flops,
    peak_mem_gb,
    reduce_scalars,
    train_flops,
)
from simpo.model_card import write_model_card
from simpo.packing import plan_micro_batches
from simpo.progress import progress_bar
from simpo.reference import precompute_reference, reference_for
from simpo.resume import (
    check_resumable,
    data_identity,
    out_of_memory,
    record_overrides,
    resume_changes,
    resume_state,
)
from simpo.runfiles import FolderInUseError, WriteError, release_folders, write_atomic
from simpo.sampler import epoch_of, global_batch, steps_for
from simpo.schedule import lr_at
from simpo.scoring import heldout_metrics
from simpo.step import train_step
from simpo.tokenizer import Tokenizer, TokenizerError
from simpo.trackers import check_trackers, open_trackers
from simpo.world import World, init_world, print0, shutdown, unwrap_norm

BF16_PURE_WARNING = (
    "train.precision=bf16-pure keeps the weights in bf16, where an update smaller than ~1/256 "
    "of a weight rounds to nothing: at SimPO/DPO learning rates (3e-7 … 1e-6) almost every "
    "AdamW update (~lr per weight) vanishes. Use bf16-mixed (fp32 master weights) unless you "
    "know why."
)
NOT_PER_PAIR = ("loss", "tokens", "ctx", "stop", "logit_sum/", "logit_count/")  # see train_step


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse the config, run training in a process group, leave it cleanly; final metrics."""
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    world = init_world()
    try:
        result = train(cfg, world)
    except BaseException:
        shutdown(clean=False)  # other ranks may never reach a barrier
        raise
    finally:
        release_folders()  # the output_dir lock (also dropped by the OS if we die)
    shutdown()  # train() has returned: no model or optimizer is referenced any more
    return result


def train(cfg: Config, world: World) -> dict[str, float]:
    tc, spec = cfg.train, get_loss(cfg.loss.name)
    for w in check_loss_config(cfg.loss, has_reference=spec.needs_reference):
        print0(f"warning: {w}")
    if tc.precision == "bf16-pure":
        print0(f"warning: {BF16_PURE_WARNING}")
    torch.manual_seed(tc.seed)
    out = Path(tc.output_dir)
    check_trackers(tc.report_to)  # a missing wandb / tensorboard fails now, not after loading
    prepare_output_dir(out, tc.resume)  # writable, ours alone, no stale checkpoints if fresh
    ckpt_root = out / "checkpoints"
    latest = choose_checkpoint(ckpt_root) if tc.resume else None  # newest readable one
    start_step = check_resumable(latest, cfg) if latest else 0  # before any expensive work

    # --- data: tokenised once by rank 0 (which fills the cache), then read by the others ---
    model_dir, data_cfg = fill_in_defaults(cfg, out, world.is_main)  # tiny demo inputs if empty
    tokenizer_dir = Path(cfg.model.tokenizer or model_dir)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    identity = data_identity(data_cfg.train, tokenizer.fingerprint)  # checked on resume
    if latest is not None:
        check_resumable(latest, cfg, identity)
    if world.is_main:
        pairs, eval_pairs, reports = load_datasets(data_cfg, tokenizer, tc.seed)
    torch.distributed.barrier()
    if not world.is_main:
        pairs, eval_pairs, reports = load_datasets(data_cfg, tokenizer, tc.seed, progress=False)
    for report in reports:
        print0(report.summary())
    check_data_fits(cfg, [(data_cfg.train, pairs), (data_cfg.eval or data_cfg.train, eval_pairs)])
    if tc.batch_size > len(pairs):
        raise ConfigError(
            f"train.batch_size = {tc.batch_size} exceeds the {len(pairs)} training pairs of "
            f"{data_cfg.train}"
        )
    total = steps_for(len(pairs), tc.batch_size, tc.epochs, tc.max_steps)

    # --- reference policy (DPO family): precomputed table, or a frozen sharded model ---
    ref_tables, ref_model = {}, None
    if spec.needs_reference:
        ref_dir = Path(cfg.loss.reference_path or model_dir)
        if cfg.loss.reference == "precompute":
            splits = {"train": pairs, "eval": eval_pairs} if eval_pairs else {"train": pairs}
            ref_tables = precompute_reference(ref_dir, splits, cfg, world, Path(data_cfg.cache_dir))
        else:
            ref_model = build_model(
                ref_dir, world, tc.precision, attention=cfg.model.attention, trainable=False
            )
            ref_model.logits_chunk_bytes = cfg.model.logits_chunk_mib * 2**20
    reference = reference_for(ref_tables.get("train"), ref_model)

    # --- policy: built on meta, FSDP2-sharded, loaded shard-wise; AdamW with fp32 state ---
    ac = tc.activation_checkpointing == "on" or (
        tc.activation_checkpointing == "auto" and world.device.type == "cuda"
    )
    model = build_model(model_dir, world, tc.precision, ac, tc.compile, cfg.model.attention)
    model.logits_chunk_bytes = cfg.model.logits_chunk_mib * 2**20
    matrices = [p for p in model.parameters() if p.ndim >= 2]  # no decay on norms and biases
    others = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": tc.weight_decay}, {"params": others}],
        lr=tc.lr,
        betas=(tc.adam_beta1, tc.adam_beta2),
        weight_decay=0.0,
        fused=True,  # one kernel over all parameters, on CUDA and CPU alike
    )
    if latest is not None:  # an unreadable one is skipped for the one before it
        latest, start_step = resume_state(latest, cfg, model, optimizer, identity)
        print0(f"resumed from {latest} at step {start_step}")
    if world.is_main:
        write_atomic(out / "config.toml", to_toml(cfg))
    writer = open_trackers(cfg, out, world.is_main, start_step if latest else None)
    if latest is not None:  # keys changed under train.resume_override: said and logged
        record_overrides(out, cfg, start_step, resume_changes(latest, cfg, identity))
    print0(
        f"{spec.name}: {len(pairs)} train / {len(eval_pairs)} eval pairs, {total} steps of "
        f"{tc.batch_size} pairs, {world.world_size} x {world.device.type}, {tc.precision}, "
        f"activation checkpointing {'on' if ac else 'off'}"
    )

    n_matmul, peak = matmul_params(model), peak_flops(world.device)
    bar = progress_bar(total=total, initial=start_step, disable=not world.is_main, desc=spec.name)
    record: dict[str, float] = {}
    with sigterm_flag() as stop:  # preemption: finish the step, save a checkpoint, return
        for step in range(start_step, total):
            t0 = time.perf_counter()
            lr = lr_at(step, total, tc.lr, tc.warmup_ratio, tc.min_lr_ratio, tc.warmup_style)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = global_batch(pairs, step, tc.batch_size, tc.seed)  # same on every rank
            micro = plan_micro_batches(
                batch, cfg.data.max_tokens, world.world_size, world.rank, cfg.data.packing
            )  # this rank's share; all ranks get as many micro-batches (some maybe empty)
            try:
                sums = train_step(
                    model, micro, cfg.loss, tc.batch_size, world, reference,
                    grad_sync=tc.grad_sync, fused_loss=tc.fused_loss,
                )  # fmt: skip
            except torch.OutOfMemoryError as e:
                raise out_of_memory(step + 1, cfg, latest_checkpoint(ckpt_root)) from e
            max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
            grad_norm = unwrap_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            # one collective and one host synchronisation for all of the step's sums
            totals = reduce_scalars(sums | {"stop": float(stop.is_set())})
            loss = totals["loss"] / tc.batch_size
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise TrainingError(
                    f"step {step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                    f"stopped before the update. Last good checkpoint: "
                    f"{latest_checkpoint(ckpt_root) or 'none'}. To go on with a lower learning "
                    "rate: --train.resume=true --train.resume_override=train.lr --train.lr=..."
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done, dt = step + 1, time.perf_counter() - t0

            record = {"step": done, "epoch": epoch_of(step, tc.batch_size, len(pairs))}
            record |= {"loss": loss, "lr": lr, "grad_norm": grad_norm}
            record |= {
                k: v / tc.batch_size for k, v in totals.items() if not k.startswith(NOT_PER_PAIR)
            }
            for name in ("chosen", "rejected"):  # token-weighted, over response positions
                n = totals.get(f"logit_count/{name}", 0.0)
                record[f"logits/{name}"] = totals.get(f"logit_sum/{name}", 0.0) / max(n, 1.0)
            record["tokens_per_s"] = totals["tokens"] / dt
            if peak is not None:
                flops = train_flops(model.args, n_matmul, int(totals["tokens"]), int(totals["ctx"]))
                record["mfu"] = flops / dt / (peak * world.world_size)
            record["peak_mem_gb"] = reduce_scalars({"m": peak_mem_gb(world.device)}, "max")["m"]
            if eval_pairs and tc.eval_every > 0 and (done % tc.eval_every == 0 or done == total):
                eval_ref = ref_tables.get("eval")
                record |= heldout_metrics(model, eval_pairs, cfg, world, eval_ref, ref_model)
            if done % tc.log_every == 0 or done == total:
                writer.write(record)
            bar.set_postfix(
                loss=f"{loss:.4f}",
                margin=f"{record['rewards/margins']:.3f}",
                acc=f"{record['rewards/accuracies']:.2f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
            )
            bar.update(1)
            if totals["stop"]:
                path = save_checkpoint(
                    ckpt_root, done, model, optimizer, cfg, tc.keep_checkpoints, identity
                )
                bar.close()
                writer.close()
                print0(f"SIGTERM: saved {path} after step {done}; resume with --train.resume=true")
                return record | {"interrupted": 1.0}
            if tc.save_every > 0 and done % tc.save_every == 0 and done < total:
                save_checkpoint(
                    ckpt_root, done, model, optimizer, cfg, tc.keep_checkpoints, identity
                )
    bar.close()
    writer.close()

    if start_step < total or latest_checkpoint(ckpt_root) is None:
        save_checkpoint(ckpt_root, total, model, optimizer, cfg, tc.keep_checkpoints, identity)
    if tc.export:
        dtype = getattr(torch, model.args.dtype, torch.float32)  # the checkpoint's own dtype
        export_final(model, out / "final", tokenizer_dir, dtype)  # complete, or the old one
        if world.is_main:  # final/README.md: what a hub reader needs to trust the weights
            write_model_card(
                out / "final", cfg, model_dir=model_dir, data_cfg=data_cfg, reports=reports,
                steps=total, world_size=world.world_size, metrics=record,
            )  # fmt: skip
        print0(f"exported {out / 'final'} (Hugging Face format)")
    return record


# How the script ends (simpo/exits.py): one line per error; these exit 2, those 1.
USAGE_ERRORS = (ConfigError, FolderInUseError)
RUN_ERRORS = (DataError, TokenizerError, ModelFileError, TrainingError, WriteError)

if __name__ == "__main__":
    sys.exit(exits.run(main, USAGE_ERRORS, RUN_ERRORS))
