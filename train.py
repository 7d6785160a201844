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

import dataclasses
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from simpo.checkpoint import save_hf
from simpo.config import Config, ConfigError, parse_args, to_toml
from simpo.data import DataError, check_config, load_datasets
from simpo.dist import Dist, build_model, init_distributed, print0, shutdown, unwrap_norm
from simpo.losses import check_loss_config, compute_loss, get_loss
from simpo.metrics import (
    MetricsWriter,
    attention_context,
    matmul_params,
    peak_flops,
    peak_mem_gb,
    reduce_sums,
    train_flops,
)
from simpo.packing import plan_micro_batches
from simpo.reference import precompute_reference
from simpo.sampler import epoch_of, global_batch, steps_for
from simpo.schedule import lr_at
from simpo.scoring import evaluate
from simpo.synthetic import write_synthetic_prefs
from simpo.tiny import SYNTHETIC_PAIRS, build_tiny_model_dir, texts_from_file
from simpo.tokenizer import Tokenizer, TokenizerError
from simpo.trainstate import (
    TrainingError,
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    prepare_output_dir,
    save_checkpoint,
    sigterm_flag,
)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse the config, run training in a process group, leave it cleanly; final metrics."""
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    d = init_distributed()
    try:
        result = train(cfg, d)
    except BaseException:
        shutdown(clean=False)  # other ranks may never reach a barrier
        raise
    shutdown()  # train() has returned: no model or optimizer is referenced any more
    return result


def train(cfg: Config, d: Dist) -> dict[str, float]:
    tc = cfg.train
    try:
        spec = get_loss(cfg.loss.name)
        warnings = check_loss_config(cfg.loss, has_reference=spec.needs_reference)
        check_config(cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for w in warnings:
        print0(f"warning: {w}")
    if tc.precision == "bf16-pure":
        print0(
            "warning: train.precision=bf16-pure keeps the weights in bf16, where an update "
            "smaller than ~1/256 of a weight rounds to nothing: at SimPO/DPO learning rates "
            "(3e-7 … 1e-6) almost every AdamW update (~lr per weight) vanishes. Use bf16-mixed "
            "(fp32 master weights) unless you know why."
        )
    torch.manual_seed(tc.seed)
    out = Path(tc.output_dir)
    prepare_output_dir(out, tc.resume)  # writable, and no stale checkpoints on a fresh run
    ckpt_root = out / "checkpoints"
    latest = latest_checkpoint(ckpt_root) if tc.resume else None
    start_step = check_resumable(latest, cfg) if latest else 0  # before any expensive work

    # --- model and data: a tiny random model and the synthetic task when none are given ---
    if cfg.data.eval and cfg.data.eval_fraction:
        raise ConfigError("set data.eval or data.eval_fraction, not both")
    model_dir = Path(cfg.model.path) if cfg.model.path else out / "tiny_model"
    if cfg.model.path and not (model_dir / "config.json").is_file():
        raise ConfigError(f"model.path = '{model_dir}' is not a Hugging Face checkpoint dir")
    data_cfg = dataclasses.replace(
        cfg.data,
        train=cfg.data.train or str(out / "data" / "train.jsonl"),
        cache_dir=cfg.data.cache_dir or str(out / "cache"),
    )
    if d.is_main and not cfg.data.train and not Path(data_cfg.train).exists():
        write_synthetic_prefs(data_cfg.train, SYNTHETIC_PAIRS, tc.seed)
    if d.is_main and not cfg.model.path and not (model_dir / "config.json").exists():
        m = cfg.model
        texts = texts_from_file(data_cfg.train)
        build_tiny_model_dir(model_dir, texts, m.tiny_vocab, m.tiny_dim, m.tiny_layers, tc.seed)
    torch.distributed.barrier()
    tokenizer_dir = Path(cfg.model.tokenizer or model_dir)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    if d.is_main:  # rank 0 tokenises and fills the cache, the other ranks then read it
        pairs, eval_pairs, reports = load_datasets(data_cfg, tokenizer, tc.seed)
    torch.distributed.barrier()
    if not d.is_main:
        pairs, eval_pairs, reports = load_datasets(data_cfg, tokenizer, tc.seed, progress=False)
    for report in reports:
        print0(report.summary())
    if tc.batch_size < 1 or tc.batch_size > len(pairs):
        raise ConfigError(
            f"train.batch_size = {tc.batch_size} must be between 1 and the {len(pairs)} "
            f"training pairs of {data_cfg.train}"
        )
    total = steps_for(len(pairs), tc.batch_size, tc.epochs, tc.max_steps)
    if cfg.model.logits_chunk_mib < 1:
        raise ConfigError(f"model.logits_chunk_mib = {cfg.model.logits_chunk_mib} must be >= 1")

    # --- reference policy (DPO family): precomputed table, or a frozen sharded model ---
    ref_tables, ref_model = {}, None
    if spec.needs_reference:
        ref_dir = Path(cfg.loss.reference_path or model_dir)
        if cfg.loss.reference == "precompute":
            splits = {"train": pairs, "eval": eval_pairs} if eval_pairs else {"train": pairs}
            ref_tables = precompute_reference(ref_dir, splits, cfg, d, Path(data_cfg.cache_dir))
        else:
            ref_model = build_model(
                ref_dir, d, tc.precision, attention=cfg.model.attention, trainable=False
            )
            ref_model.logits_chunk_bytes = cfg.model.logits_chunk_mib * 2**20

    # --- policy: built on meta, FSDP2-sharded, loaded shard-wise; AdamW with fp32 state ---
    ac = tc.activation_checkpointing == "on" or (
        tc.activation_checkpointing == "auto" and d.device.type == "cuda"
    )
    model = build_model(model_dir, d, tc.precision, ac, tc.compile, cfg.model.attention)
    model.logits_chunk_bytes = cfg.model.logits_chunk_mib * 2**20
    matrices = [p for p in model.parameters() if p.ndim >= 2]  # no decay on norms and biases
    others = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": tc.weight_decay}, {"params": others}],
        lr=tc.lr,
        betas=(tc.adam_beta1, tc.adam_beta2),
        weight_decay=0.0,
        fused=d.device.type == "cuda",
    )
    if latest is not None:
        load_checkpoint(latest, model, optimizer)
        print0(f"resumed from {latest} at step {start_step}")
    if d.is_main:
        (out / "config.toml").write_text(to_toml(cfg))
    writer = MetricsWriter(out / "metrics.jsonl", d.is_main, start_step if latest else None)
    print0(
        f"{spec.name}: {len(pairs)} train / {len(eval_pairs)} eval pairs, {total} steps of "
        f"{tc.batch_size} pairs, {d.world_size} x {d.device.type}, {tc.precision}, "
        f"activation checkpointing {'on' if ac else 'off'}"
    )

    n_matmul, peak = matmul_params(model), peak_flops(d.device)
    bar = tqdm(total=total, initial=start_step, disable=not d.is_main, desc=spec.name)
    record: dict[str, float] = {}
    with sigterm_flag() as stop:  # preemption: finish the step, save a checkpoint, return
        for step in range(start_step, total):
            t0 = time.perf_counter()
            lr = lr_at(step, total, tc.lr, tc.warmup_ratio, tc.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = global_batch(pairs, step, tc.batch_size, tc.seed)  # same on every rank
            micro = plan_micro_batches(
                batch, cfg.data.max_tokens, d.world_size, d.rank, cfg.data.packing
            )  # this rank's share; all ranks get as many micro-batches (some maybe empty)
            sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=d.device))
            tokens = context = 0
            for mb in micro:
                mb = mb.to(d.device)
                inputs = (mb.input_ids, mb.layout.position_ids, mb.layout, mb.score)
                policy_sum, policy_count = model(*inputs)  # (2P,) each
                ref_sum = ref_count = None
                if ref_model is not None:
                    with torch.no_grad():
                        ref_sum, ref_count = ref_model(*inputs)
                elif spec.needs_reference:
                    ref_sum, ref_count = ref_tables["train"].lookup(mb.pair_index)
                losses, metrics = compute_loss(
                    cfg.loss, policy_sum, policy_count, ref_sum, ref_count
                )  # (P,) per pair
                # Sum over this micro-batch / pairs of the whole step; x world size because
                # FSDP averages gradients over ranks where we want their sum.
                (losses.sum() * d.world_size / tc.batch_size).backward()
                sums["loss"] += losses.detach().sum()
                for k, v in metrics.items():
                    sums[k] += v.sum()
                tokens += mb.num_real_tokens
                context += attention_context(mb.layout)
            max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
            grad_norm = unwrap_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            local = {k: v.item() for k, v in sums.items()} | {"tokens": tokens, "ctx": context}
            totals = reduce_sums(local | {"stop": float(stop.is_set())})
            loss = totals["loss"] / tc.batch_size
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise TrainingError(
                    f"step {step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                    f"stopped before the update. Last good checkpoint: "
                    f"{latest_checkpoint(ckpt_root) or 'none'} (resume with --train.resume=true, "
                    "perhaps with a lower train.lr)"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done, dt = step + 1, time.perf_counter() - t0

            record = {"step": done, "epoch": epoch_of(step, tc.batch_size, len(pairs))}
            record |= {"loss": loss, "lr": lr, "grad_norm": grad_norm}
            record |= {k: totals[k] / tc.batch_size for k in sums if k != "loss"}
            record["tokens_per_s"] = totals["tokens"] / dt
            if peak is not None:
                flops = train_flops(model.args, n_matmul, int(totals["tokens"]), int(totals["ctx"]))
                record["mfu"] = flops / dt / (peak * d.world_size)
            record["peak_mem_gb"] = reduce_sums({"m": peak_mem_gb(d.device)}, op="max")["m"]
            if eval_pairs and tc.eval_every > 0 and (done % tc.eval_every == 0 or done == total):
                record |= evaluate(model, eval_pairs, cfg, d, ref_tables.get("eval"), ref_model)
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
                path = save_checkpoint(ckpt_root, done, model, optimizer, cfg, tc.keep_checkpoints)
                bar.close()
                print0(f"SIGTERM: saved {path} after step {done}; resume with --train.resume=true")
                return record | {"interrupted": 1.0}
            if tc.save_every > 0 and done % tc.save_every == 0 and done < total:
                save_checkpoint(ckpt_root, done, model, optimizer, cfg, tc.keep_checkpoints)
    bar.close()

    if start_step < total or latest_checkpoint(ckpt_root) is None:
        save_checkpoint(ckpt_root, total, model, optimizer, cfg, tc.keep_checkpoints)
    if tc.export:
        dtype = getattr(torch, model.args.dtype, torch.float32)  # the checkpoint's own dtype
        save_hf(model, out / "final", tokenizer_dir=tokenizer_dir, dtype=dtype)
        print0(f"exported {out / 'final'} (Hugging Face format)")
    return record


if __name__ == "__main__":
    try:
        result = main()
    except (ConfigError, DataError, TokenizerError, TrainingError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    sys.exit(143 if result.get("interrupted") else 0)
