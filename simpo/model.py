"""One decoder Transformer: the llama, mistral, qwen2, gemma and gemma2 families as features.

`ModelArgs` lists the architecture's features (norm style, embedding scale, MLP activation,
sandwich norms, soft-caps, per-layer windows); `simpo.hf` maps each config.json family onto
them, so this file never reads a family name. Parameter names equal Hugging Face's, so
checkpoints load without a rename table (`simpo.hf.load_model`). RoPE uses HF's rotate-half
convention, computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simpo.attention import Layout, attend, masked_attention
from simpo.fused_loss import FusedLoss, HeadLoss, fused_preference_loss
from simpo.logprobs import DEFAULT_CHUNK_BYTES, ScoreIndex, response_logprobs
from simpo.world import copy_full_

if TYPE_CHECKING:
    from simpo.generate import KVCache

SLIDING, FULL = "sliding_attention", "full_attention"
MLP_ACTS = ("silu", "gelu_tanh")


@dataclass
class ModelArgs:
    """Everything `Transformer` needs to know about a checkpoint's architecture."""

    vocab_size: int  # embedding rows; may exceed the tokenizer's size
    dim: int  # hidden_size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None, or {"rope_type": "linear"|"llama3", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    mlp_act: str = "silu"  # one of MLP_ACTS: SwiGLU, or GeGLU with tanh GELU (gemma)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), weights start at 0 (gemma)
    scale_embeddings: bool = False  # embeddings x sqrt(dim), rounded to the activation dtype
    sandwich_norm: bool = False  # extra norms after attention and after the MLP (gemma2)
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # SLIDING or FULL per layer
    query_pre_attn_scalar: float | None = None  # scores scaled by this ** -0.5 (else head_dim)
    attn_softcap: float | None = None  # tanh soft-cap on attention scores
    final_softcap: float | None = None  # tanh soft-cap on the output logits
    # Not read by the model: what simpo.hf needs to write config.json back.
    model_type: str = "llama"
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def windows(self) -> list[int | None]:
        """Per layer: the sliding window in positions, or None for full attention."""
        types = self.layer_types or (FULL,) * self.n_layers
        return [self.sliding_window if t == SLIDING else None for t in types]


def rope_cos_sin(args: ModelArgs, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin (B, 1, T, head_dim) in fp32 for positions (B, T); HF's inv_freq formulas."""
    scaling = tuple(sorted((args.rope_scaling or {}).items()))
    inv = _inv_freq(args.head_dim, args.rope_theta, scaling, position_ids.device)  # (d/2,)
    freqs = position_ids[..., None].float() * inv  # (B, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, d)
    return emb.cos(), emb.sin()


_INV_FREQ: dict[tuple[Any, ...], Tensor] = {}  # a plain dict: compiled code reads the tensor


def _inv_freq(
    d: int, theta: float, scaling: tuple[tuple[str, Any], ...], device: torch.device
) -> Tensor:
    """RoPE inverse frequencies (d/2,) fp32 on `device`: computed on the CPU, as HF does (the
    same bits), and copied to the device once per process rather than in every forward (a
    copy from the host memory of a fresh tensor makes the host wait for the GPU). A plain dict,
    not functools.cache: torch.compile traces through a cache wrapper and would put the CPU
    computation inside the graph (no CUDA graph then); it reads a dict's tensor as a constant."""
    key = (d, theta, scaling, device)
    if key not in _INV_FREQ:
        with torch.inference_mode(False):  # a normal tensor, even if first made for generation
            _INV_FREQ[key] = _cpu_inv_freq(d, theta, dict(scaling) or None).to(device)
    return _INV_FREQ[key]


def _cpu_inv_freq(d: int, theta: float, sc: dict[str, Any] | None) -> Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    if sc is not None and sc["rope_type"] == "linear":
        inv = inv / sc["factor"]
    elif sc is not None:  # llama3: low frequencies / factor, smooth blend in between
        ctx, factor = sc["original_max_position_embeddings"], sc["factor"]
        lo, hi = sc["low_freq_factor"], sc["high_freq_factor"]
        wavelen = 2 * torch.pi / inv
        scaled = torch.where(wavelen > ctx / lo, inv / factor, inv)
        smooth = (ctx / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < ctx / hi) & ~(wavelen > ctx / lo)
        inv = torch.where(medium, blended, scaled)
    return inv


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on x (B, H, T, D), computed in fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: bool) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset  # offset: gemma's (1 + w) scaling
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.type_as(x)


def _norm(args: ModelArgs) -> RMSNorm:
    return RMSNorm(args.dim, args.norm_eps, offset=args.norm_plus_one)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, attn_backend: str) -> None:
        super().__init__()
        self.args, self.layer_idx, self.window = args, layer_idx, args.windows[layer_idx]
        self.attn_backend = attn_backend
        hd, dim = args.head_dim, args.dim
        self.q_proj = nn.Linear(dim, args.n_heads * hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(dim, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(dim, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * hd, dim, bias=args.o_bias)
        self.scale = (args.query_pre_attn_scalar or hd) ** -0.5

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], layout: Layout | None, cache: KVCache | None
    ) -> Tensor:
        B, T, _ = x.shape
        hd, softcap = self.args.head_dim, self.args.attn_softcap
        q = self.q_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:
            out = attend(
                q, k, v, layout, window=self.window, softcap=softcap, scale=self.scale,
                backend=self.attn_backend,
            )  # fmt: skip
        else:  # decoding: keys are everything cached so far, (B, Hkv, S, D)
            k, v = cache.update(self.layer_idx, k, v)
            out = masked_attention(q, k, v, cache.mask(self.window), self.scale, softcap)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        dim, hidden, bias = args.dim, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.gelu = args.mlp_act == "gelu_tanh"

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, attn_backend: str) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer_idx, attn_backend)
        self.mlp = MLP(args)
        self.input_layernorm = _norm(args)
        self.post_attention_layernorm = _norm(args)  # llama-style: the pre-MLP norm
        self.sandwich = args.sandwich_norm
        if self.sandwich:
            self.pre_feedforward_layernorm = _norm(args)
            self.post_feedforward_layernorm = _norm(args)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], layout: Layout | None, cache: KVCache | None
    ) -> Tensor:
        attn = self.self_attn(self.input_layernorm(x), rope, layout, cache)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """HF's `model.` prefix: embed_tokens, layers, norm."""

    def __init__(self, args: ModelArgs, attn_backend: str) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i, attn_backend) for i in range(args.n_layers))
        self.norm = _norm(args)


class Transformer(nn.Module):
    """attn_backend: "auto" (flex on CUDA, SDPA on CPU), "sdpa", "flex" or "dense"; a run-time
    choice. logits_chunk_bytes: the fused head's chunk budget (train.py: model.logits_chunk_mib)."""

    def __init__(
        self,
        args: ModelArgs,
        attn_backend: str = "auto",
        logits_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        super().__init__()
        self.args, self.attn_backend = args, attn_backend
        self.logits_chunk_bytes = logits_chunk_bytes
        self.model = Backbone(args, attn_backend)
        self.lm_head: nn.Linear | None = None  # tied: the head is the embedding
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def head_weight(self) -> Tensor:
        """(V, dim): lm_head.weight, or the embedding when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(
        self,
        input_ids: Tensor,
        layout: Layout | None = None,
        cache: KVCache | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Final-norm hidden states (B, T, dim) for input_ids (B, T).

        Positions come from `layout` when given; `position_ids` (B, T) serve decoding with a
        KV cache (and plain causal rows); neither: 0..T-1.
        """
        B, T = input_ids.shape
        if layout is not None:
            position_ids = layout.position_ids
        elif position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        if layout is None and cache is None:
            layout = Layout.causal(position_ids)
        if layout is not None:  # build each mask once, outside the checkpointed/compiled blocks
            for window in set(self.args.windows):
                layout.mask(window, self.args.attn_softcap, self.attn_backend)
        h = self.model.embed_tokens(input_ids)  # (B, T, dim)
        if self.args.scale_embeddings:  # the scale is rounded to the activation dtype, as in HF
            h = h * torch.tensor(self.args.dim**0.5).to(h.dtype)
        rope = rope_cos_sin(self.args, position_ids)
        for block in self.model.layers:
            h = block(h, rope, layout, cache)
        return self.model.norm(h)

    def forward(
        self,
        input_ids: Tensor,
        layout: Layout | None = None,
        score: ScoreIndex | None = None,
        cache: KVCache | None = None,
        position_ids: Tensor | None = None,
        logit_sums: Tensor | None = None,
        loss: HeadLoss | None = None,
    ) -> Tensor | tuple[Tensor, Tensor] | FusedLoss:
        """Logits (B, T, V); or, with `score`, per-response (sum, count) of target log-probs;
        or, with `score` and `loss`, the training loss fused into the head pass (FusedLoss:
        3 vocabulary GEMMs per scored token, the head's gradients computed in this forward).

        The chunked head runs here, inside forward, so FSDP2 unshards its weight. `logit_sums`
        (R,), optional: gets each response's sum of mean logits (the official logits/* metric).
        """
        hidden = self.hidden_states(input_ids, layout, cache, position_ids)  # (B, T, dim)
        cap = self.args.final_softcap
        if score is None:
            if loss is not None:
                raise ValueError("a fused loss needs `score` (which tokens to score)")
            logits = F.linear(hidden, self.head_weight)  # (B, T, V)
            return logits if cap is None else torch.tanh(logits / cap) * cap
        if loss is not None:
            return fused_preference_loss(
                hidden.flatten(0, 1), self.head_weight, score, loss.loss_fn, loss.scale,
                loss.ref_sums, loss.ref_counts, softcap=cap, chunk_bytes=self.logits_chunk_bytes,
                response_lengths=loss.response_lengths, logit_sums=logit_sums,
            )  # fmt: skip
        return response_logprobs(
            hidden.flatten(0, 1), self.head_weight, score.hidden_index, score.targets,
            score.response_ids, score.num_responses, softcap=cap,
            chunk_bytes=self.logits_chunk_bytes, logit_sums=logit_sums,
        )  # fmt: skip

    @torch.no_grad()
    def init_weights(self, seed: int, std: float = 0.02) -> None:
        """Deterministic random init (same on every rank, and for sharded DTensor params)."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                full = torch.full(p.shape, 0.0 if self.args.norm_plus_one else 1.0)
            elif name.endswith(".bias"):
                full = torch.zeros(p.shape)
            else:
                full = torch.randn(p.shape, generator=gen) * std
            copy_full_(p, full)
