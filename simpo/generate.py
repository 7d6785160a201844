"""The sampler: K samples per prompt from one prefill, length batches, per-sample seeds.

    out = sample(model, prompts, 256, num_samples=5, temperature=0.8, top_p=0.95,
                 stop_ids=tokenizer.stop_ids, keys=[[sample_key(42, i, k) for k in range(5)]
                                                    for i in range(len(prompts))])
    out[i][k].tokens, out[i][k].stopped       # new ids of prompt i's sample k, without the stop
    generate(model, prompts, 64)              # eval.py: one greedy (or seeded) answer each

Shared prompt: a batch of B prompts is left-padded to (B, P) and prefilled once; its keys and
values are written K times into a preallocated cache of B*K rows (`simpo.kvcache`), and a
prompt's K samples draw their first token from its one set of last-position logits. Each
sequence keeps its own positions (0 at its first real token) and padded slots are masked, so a
prompt decodes as it would alone. Each row stops at its own first stop token; a batch stops
when all have. Batches are formed longest prompt first, within a prompt and a cache budget.

Seeds: `simpo.draws` (a sample's text is a function of its key and its logits only).
CUDA: the decode step is compiled to CUDA graphs (`simpo.kvcache`); shapes are kept static by
bucketing the cache length to a power of two and padding the last batch to full size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from simpo.attention import Layout
from simpo.draws import choose, sample_key
from simpo.kvcache import (
    KVBuffers,
    KVCache,
    compile_failed,
    decode_step,
    head,
    release_pool,
    step_function,
)

__all__ = ["Completion", "KVCache", "generate", "length_batches", "release_pool", "sample",
           "sample_key"]  # fmt: skip


@dataclass(frozen=True)
class Completion:
    tokens: list[int]  # the new ids, without the stop token
    stopped: bool  # ended at a stop token (False: reached max_new_tokens)


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-padded ids (B, P) and real-token mask (B, P)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        valid[i, width - len(p) :] = True
    return ids.to(device), valid.to(device)


PREFILL_TOKENS = 16384  # padded prompt tokens per prefill forward (bounds its activations)


def bucket(n: int) -> int:
    """Cache length for compiled decoding: the next power of two >= n, at least 256."""
    return max(256, 1 << (n - 1).bit_length())


@torch.no_grad()
def sample_batch(
    model: nn.Module, prompts: Sequence[Sequence[int]], keys: Tensor, max_new_tokens: int,
    temperature: float, top_p: float, stop_ids: Sequence[int], vocab_size: int | None,
    compile: bool | dict[str, Any],
) -> list[Completion]:  # fmt: skip
    """Completions of one batch: `prompts` (B), keys (B, K) -> B*K completions, prompt-major."""
    device = model.head_weight.device
    B, K = keys.shape
    R, N = B * K, max_new_tokens
    ids, valid = _left_pad(prompts, device)  # (B, P)
    P = ids.shape[1]
    windows = set(model.args.windows)
    static = compile is not False
    buf = KVBuffers.allocate(model, R, bucket(P + N) if static else P + N, static=static)
    step_fn = step_function(compile)
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, P): 0 at each first real token
    hidden = []  # (B, dim): each prompt once, in chunks of prompts
    for b in range(0, B, max(1, PREFILL_TOKENS // P)):
        chunk = slice(b, b + max(1, PREFILL_TOKENS // P))
        cache = KVCache.prefill(buf, windows, pos[chunk], valid[chunk], K, row0=b * K)
        h = model.hidden_states(ids[chunk], cache=cache, position_ids=pos[chunk])
        hidden.append(h[:, -1])
    logits = head(model, torch.cat(hidden)).repeat_interleave(K, 0)  # (R, V)
    keys, pos = keys.flatten().to(device), pos[:, -1:].repeat_interleave(K, 0) + 1  # (R,), (R, 1)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    out = torch.zeros(R, N, dtype=torch.long, device=device)
    length = torch.full((R,), N, dtype=torch.long, device=device)  # index of the first stop
    done = torch.zeros(R, dtype=torch.bool, device=device)
    for t in range(N):
        logits = logits[:, :vocab_size] if vocab_size else logits
        nxt = choose(logits, temperature, top_p, keys, t)  # (R,)
        out[:, t] = nxt
        hit = torch.isin(nxt, stop) & ~done
        length = torch.where(hit, t, length)
        done |= hit
        if t == N - 1 or ((not static or t % 8 == 7) and bool(done.all())):  # CUDA: fewer syncs
            break
        slot = torch.tensor([P + t], device=device)
        if compile is True:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed
        try:
            logits = step_fn(model, buf, nxt[:, None], pos, slot, None if static else P + t + 1)
        except Exception as e:  # torch.compile on an untried setup must not lose the run
            if step_fn is decode_step or t > 0:
                raise
            step_fn = compile_failed(e)
            logits = step_fn(model, buf, nxt[:, None], pos, slot, None)
        pos = pos + 1
    out, length = out.tolist(), length.tolist()
    return [Completion(row[:n], n < N) for row, n in zip(out, length, strict=True)]


def length_batches(lengths: Sequence[int], capacity: Callable[[int], int]) -> list[list[int]]:
    """Prompt indices grouped longest first; a batch whose first (longest) prompt has length L
    holds at most capacity(L) prompts (at least one)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < capacity(lengths[batches[-1][0]]):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def sample(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    keys: Sequence[Sequence[int]] | None = None,
    batch_prompts: int = 16,
    max_slots: int = 1 << 22,
    vocab_size: int | None = None,
    compile: bool | dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[list[Completion]]:
    """`num_samples` completions of each prompt (a list per prompt, in prompt order).

    keys: per prompt, one key per sample (`sample_key`); default sample_key(0, i, k).
    Prompts are batched longest first (`length_batches`), at most `batch_prompts` per batch
    and at most `max_slots` KV-cache slots (rows x cache length). `vocab_size` limits sampling
    to the tokenizer's ids when the head has more rows. compile: None = on CUDA only; a dict
    gives torch.compile options. `progress` is called with the number of prompts per batch.
    """
    K = num_samples
    if any(len(p) == 0 for p in prompts):
        raise ValueError("sample: every prompt needs at least one token")
    if keys is None:
        keys = [[sample_key(0, i, k) for k in range(K)] for i in range(len(prompts))]
    if len(keys) != len(prompts) or any(len(k) != K for k in keys):
        raise ValueError(f"sample: expected {K} keys for each of the {len(prompts)} prompts")
    if compile is None:
        compile = model.head_weight.is_cuda
    N, static = max_new_tokens, compile is not False

    def capacity(longest: int) -> int:  # prompts whose K rows of cache slots fit max_slots
        slots = bucket(longest + N) if static else longest + N
        return max(1, min(batch_prompts, max_slots // (K * slots)))

    results: list[list[Completion]] = [[] for _ in prompts]
    lengths = [len(p) for p in prompts]
    for batch in length_batches(lengths, capacity):
        # static shapes: a batch is padded to its length bucket's capacity (one graph each)
        full = capacity(lengths[batch[0]]) if static else len(batch)
        padded = batch + batch[-1:] * (full - len(batch))
        key_t = torch.tensor([keys[i] for i in padded], dtype=torch.long)  # (B, K)
        done = sample_batch(
            model, [prompts[i] for i in padded], key_t, max_new_tokens, temperature, top_p,
            stop_ids, vocab_size, compile,
        )  # fmt: skip
        for j, i in enumerate(batch):
            results[i] = done[j * K : (j + 1) * K]
        if progress is not None:
            progress(len(batch))
    return results


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    use_cache: bool = True,
) -> list[list[int]]:
    """One continuation per prompt: the new token ids (prompt and stop token not included).

    temperature 0 is greedy; otherwise top-p sampling with keys sample_key(seed, i, 0).
    use_cache=False recomputes the whole sequence at each step (the reference the cache is
    tested against)."""
    keys = [[sample_key(seed, i, 0)] for i in range(len(prompts))]
    if use_cache:
        out = sample(
            model, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
            stop_ids=stop_ids, keys=keys, batch_prompts=max(1, len(prompts)),
        )  # fmt: skip
        release_pool()  # the caller may load another model next
        return [c[0].tokens for c in out]
    key_t = torch.tensor(keys, dtype=torch.long).flatten()
    return [c.tokens for c in sample_no_cache(model, prompts, key_t, max_new_tokens,
                                              temperature, top_p, stop_ids)]  # fmt: skip


@torch.no_grad()
def sample_no_cache(
    model: nn.Module, prompts: Sequence[Sequence[int]], keys: Tensor, max_new_tokens: int,
    temperature: float, top_p: float, stop_ids: Sequence[int],
) -> list[Completion]:  # fmt: skip
    """The reference: each step recomputes every whole sequence (R prompts, keys (R,))."""
    device = model.head_weight.device
    ids, valid = _left_pad(prompts, device)
    keys, out = keys.to(device), [[] for _ in prompts]
    stopped = [False] * len(prompts)
    for t in range(max_new_tokens):
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        layout = Layout(torch.where(valid, 0, -1), torch.zeros_like(ids), pos)
        logits = model(ids, layout)[:, -1]  # (R, V)
        nxt = choose(logits, temperature, top_p, keys, t)
        for i, tok in enumerate(nxt.tolist()):
            stopped[i] = stopped[i] or tok in stop_ids
            if not stopped[i]:
                out[i].append(tok)
        if all(stopped):
            break
        ids = torch.cat([ids, nxt[:, None]], 1)
        valid = torch.cat([valid, torch.ones_like(nxt[:, None], dtype=torch.bool)], 1)
    return [Completion(o, s) for o, s in zip(out, stopped, strict=True)]
