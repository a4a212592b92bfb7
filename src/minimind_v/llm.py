"""The MiniMind decoder: dense or mixture-of-experts, numerically identical to the reference implementation.

Shapes: B batch, T new tokens, S = cached + new tokens (key length), H hidden size, nh query heads,
nkv key/value heads, hd head size, V vocabulary, E experts.

Attention goes through `scaled_dot_product_attention` with one boolean mask per forward (built in
`attention_mask_for`: causality, left padding and packed documents), shared by every layer and head; packed
training rows on CUDA go through a compiled `flex_attention` instead, with a block mask that skips the blocks
between documents. RoPE angles are computed from position ids on every call, so no table can be left
uninitialised by a meta-device load.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .config import MiniMindConfig

# transformers 5.24 renamed the output's `past_key_values` to `cache` (the old name still works, with a warning)
CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with optional YaRN frequency scaling. Holds no state_dict entries."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.table_len = config.max_position_embeddings
        self.scaling = config.yarn_scaling

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """[hd/2] float32 inverse frequencies, computed on `device` on every call (a handful of tiny ops, and
        nothing cached that a meta-device load could leave empty or that torch.compile would guard on)."""
        d = self.head_dim
        freqs = 1.0 / (self.theta ** (torch.arange(0, d, 2, device=device)[: d // 2].float() / d))
        s = self.scaling
        if s is not None and self.table_len / s["original_max_position_embeddings"] > 1:
            freqs = freqs * self._yarn_multipliers(s, device)
        return freqs

    def _yarn_multipliers(self, s: dict, device: torch.device) -> torch.Tensor:
        d, orig = self.head_dim, s["original_max_position_embeddings"]

        def inv_dim(beta: float) -> float:
            return (d * math.log(orig / (beta * 2 * math.pi))) / (2 * math.log(self.theta))

        low = max(math.floor(inv_dim(s["beta_fast"])), 0)
        high = min(math.ceil(inv_dim(s["beta_slow"])), d // 2 - 1)
        ramp = ((torch.arange(d // 2, device=device).float() - low) / max(high - low, 0.001)).clamp(0, 1)
        return 1 - ramp + ramp / s["factor"]

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> (cos, sin), each [B, T, 1, hd] float32."""
        angles = position_ids.float().unsqueeze(-1) * self.inv_freq(position_ids.device)
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)
        scale = self.scaling["attention_factor"] if self.scaling else 1.0
        return angles.cos() * scale, angles.sin() * scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, hd] rotated by the angles of its positions."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values for every layer, each [B, nkv, capacity, hd].

    `length` positions are filled. Writes go in place; when a call needs more room the storage doubles,
    so decoding costs amortised O(1) copies rather than one concatenation per step.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0

    @classmethod
    def for_model(cls, config: MiniMindConfig, batch: int, capacity: int, dtype: torch.dtype,
                  device: torch.device | str) -> KVCache:
        return cls(config.num_hidden_layers, batch, config.num_key_value_heads, config.head_dim, capacity, dtype,
                   device)

    @classmethod
    def from_legacy(cls, legacy: list | tuple) -> KVCache:
        """Build from the reference format: a list of (k, v) per layer, each [B, S, nkv, hd]."""
        k0 = legacy[0][0]
        batch, length, num_kv, head_dim = k0.shape
        cache = cls(len(legacy), batch, num_kv, head_dim, length, k0.dtype, k0.device)
        for i, (k, v) in enumerate(legacy):
            cache.keys[i].copy_(k.transpose(1, 2))
            cache.values[i].copy_(v.transpose(1, 2))
        cache.length = length
        return cache

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, needed: int) -> None:
        """Make room for `needed` positions in total, doubling the storage if it is too small."""
        if needed <= self.capacity:
            return
        new_capacity = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_empty(*old.shape[:2], new_capacity, old.shape[3])
                grown[:, :, : self.length] = old[:, :, : self.length]
                store[i] = grown

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, nkv, T, hd] after the first `length` positions; return views [B, nkv, length+T, hd]."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference layout: (k, v), each [B, length, nkv, hd] (views)."""
        return (self.keys[layer][:, :, : self.length].transpose(1, 2),
                self.values[layer][:, :, : self.length].transpose(1, 2))


def as_kv_cache(past_key_values) -> KVCache | None:
    if past_key_values is None or isinstance(past_key_values, KVCache):
        return past_key_values
    if isinstance(past_key_values, (list, tuple)) and past_key_values and len(past_key_values[0]) == 2:
        return KVCache.from_legacy(past_key_values)
    raise TypeError(
        f"past_key_values must be a KVCache returned by this model or a list of (k, v) pairs, "
        f"got {type(past_key_values).__name__}"
    )


def attention_mask_for(
    batch: int, new: int, past: int, device: torch.device,
    attention_mask: torch.Tensor | None, packed_positions: torch.Tensor | None,
) -> torch.Tensor | None:
    """Boolean mask [B, 1, T, S] (True = may attend), or None when plain causal attention is exact.

    attention_mask [B, S]: 1 for real tokens, 0 for padding (left padding in batched generation).
    packed_positions [B, T] (position ids of packed documents, never with a cache or attention_mask): every 0
    starts a new document and tokens attend only inside their own document.
    Each query may always attend to itself, so no softmax row is empty (padding rows give unused values).
    """
    total = past + new
    if attention_mask is None and packed_positions is None and (past == 0 or new == 1):
        return None
    query_pos = torch.arange(past, total, device=device).unsqueeze(1)
    key_pos = torch.arange(total, device=device).unsqueeze(0)
    mask = (key_pos <= query_pos).expand(batch, new, total)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, :].bool()
    if packed_positions is not None:
        doc = (packed_positions == 0).cumsum(dim=1)
        mask = mask & (doc.unsqueeze(2) == doc.unsqueeze(1))
    mask = mask | (key_pos == query_pos)
    return mask.unsqueeze(1)


def packed_block_mask(position_ids: torch.Tensor) -> BlockMask:
    """flex_attention's block mask for packed documents, position_ids [B, T]: causal inside each document (every
    0 starts one). Built once per forward; blocks outside every document are skipped, not masked."""
    document = (position_ids == 0).cumsum(dim=1)

    def same_document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (document[b, q_idx] == document[b, kv_idx])

    batch, length = position_ids.shape
    return create_block_mask(same_document_causal, batch, None, length, length, device=position_ids.device)


def use_flex_attention(device: torch.device, packed: bool, dropout: float) -> bool:
    """Packed training rows on CUDA go through flex_attention (block-sparse); elsewhere, and with dropout, which
    flex_attention lacks, the dense mask goes to scaled_dot_product_attention (on a CPU, flex_attention has no
    backward)."""
    return packed and device.type == "cuda" and dropout == 0.0


_compiled_flex_attention = None


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """q [B, nh, T, hd]; k, v [B, nkv, T, hd] -> [B, nh, T, hd], through a compiled flex_attention (its eager
    form materialises the scores)."""
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None,
         dropout_p: float) -> torch.Tensor:
    """q [B, nh, T, hd]; k, v [B, nkv, S, hd]; mask [B, 1, T, S], a BlockMask or None -> [B, nh, T, hd].

    Query head j uses key/value head j // (nh / nkv). With a cache the query heads are folded onto their
    key/value head ([B, nkv, rep*T, hd]) so the cache is read in place instead of being repeated.
    """
    if isinstance(mask, BlockMask):
        return flex(q, k, v, mask)
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # CPU bf16 autocast: the bf16 attention kernels are slower than float32 ones (the backward ~2x).
        with torch.autocast("cpu", enabled=False):
            return sdpa(q.float(), k.float(), v.float(), mask, dropout_p).to(q.dtype)
    batch, heads, new, hd = q.shape
    kv_heads, total = k.shape[1], k.shape[2]
    if total == new:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and new > 1,
                                              dropout_p=dropout_p, enable_gqa=True)
    rep = heads // kv_heads
    folded = q.reshape(batch, kv_heads, rep * new, hd)
    if mask is not None:
        mask = mask.repeat(1, 1, rep, 1)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, dropout_p=dropout_p)
    return out.reshape(batch, heads, new, hd)


class Attention(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: KVCache | None) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]; new keys/values are appended to `cache` when given."""
        batch, new, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, new, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(batch, new, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(batch, new, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        q, k, v = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = sdpa(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.resid_dropout(self.o_proj(out.transpose(1, 2).reshape(batch, new, -1)))


class FeedForward(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: MiniMindConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MOEFeedForward(nn.Module):
    """Top-k routed experts. Tokens are sorted by expert so each expert runs once on a contiguous slice."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_loss_coef = config.router_aux_loss_coef
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            FeedForward(config, config.moe_intermediate_size) for _ in range(config.num_experts)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> (output [B, T, H], auxiliary load-balancing loss, a scalar)."""
        tokens = x.reshape(-1, x.shape[-1])  # [N, H]
        probs = F.softmax(self.gate(tokens), dim=-1)  # [N, E]
        weights, chosen = torch.topk(probs, self.top_k, dim=-1, sorted=False)  # [N, k]
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        flat_expert = chosen.reshape(-1)  # [N*k], slot i belongs to token i // k
        order = flat_expert.argsort(stable=True)
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        out = torch.zeros_like(tokens)
        aux = x.new_zeros((), dtype=torch.float32)
        for expert, slots in zip(self.experts, order.split(counts)):
            if slots.numel() == 0:
                if self.training:  # keeps every expert in the graph for DDP; adds exactly zero
                    aux = aux + 0 * sum(p.sum() for p in expert.parameters())
                continue
            rows = slots // self.top_k
            y = expert(tokens[rows]) * weights.reshape(-1)[slots].unsqueeze(-1)
            out.index_add_(0, rows, y.to(out.dtype))
        if self.training and self.aux_loss_coef > 0:
            load = F.one_hot(chosen, self.num_experts).float().mean(dim=0)  # [k, E]
            importance = probs.float().mean(dim=0)  # [E]
            aux = aux + self.num_experts * self.aux_loss_coef * (load * importance).sum()
        return out.view_as(x), aux


class MiniMindBlock(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MOEFeedForward(config) if config.use_moe else FeedForward(config, config.intermediate_size)

    def forward(self, h, rope, mask, cache) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = h + self.self_attn(self.input_layernorm(h), rope, mask, cache)
        mlp_out = self.mlp(self.post_attention_layernorm(h))
        if isinstance(mlp_out, tuple):
            return h + mlp_out[0], mlp_out[1]
        return h + mlp_out, None


def positions_for(batch: int, new: int, past: int, device, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Position ids [B, T]: counted over real tokens when a padding mask is given, so a left-padded row gets
    the same positions as the row alone."""
    if attention_mask is None:
        return torch.arange(past, past + new, device=device).expand(batch, new)
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -new:]


class MiniMindModel(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(MiniMindBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T] (or embeddings [B, T, H], already dropped out) -> (final normed hidden [B, T, H], aux loss).

        `cache` holds the previous tokens; the new keys/values are written into it.
        """
        h = self.dropout(self.embed_tokens(input_ids)) if inputs_embeds is None else inputs_embeds
        batch, new = h.shape[:2]
        past = cache.length if cache is not None else 0
        if cache is not None:
            cache.reserve(past + new)
        packed = position_ids is not None and attention_mask is None and past == 0
        if position_ids is None:
            position_ids = positions_for(batch, new, past, h.device, attention_mask)
        if use_flex_attention(h.device, packed, self.config.dropout if self.training else 0.0):
            mask = packed_block_mask(position_ids)
        else:
            mask = attention_mask_for(batch, new, past, h.device, attention_mask, position_ids if packed else None)
        rope = self.rotary(position_ids)
        aux = h.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            h, layer_aux = layer(h, rope, mask, cache)
            if layer_aux is not None:
                aux = aux + layer_aux
        if cache is not None:
            cache.length = past + new
        return self.norm(h), aux


class MiniMindForCausalLM(PreTrainedModel):
    """The MiniMind language model. `forward` matches the reference signature and outputs."""

    config_class = MiniMindConfig
    base_model_prefix = "model"
    _no_split_modules = ["MiniMindBlock"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _supports_sdpa = True

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Reference initialisation: N(0, initializer_range) for linear and embedding weights (0.02, the
        transformers default the reference relies on), ones for RMSNorm."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def generate(self, input_ids: torch.Tensor | None = None, **kwargs):
        """Reference-compatible generation; see `generate.reference_generate` for the arguments."""
        from .generate import reference_generate

        return reference_generate(self, input_ids, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | list | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        compute_logits: bool = True,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """input_ids [B, T] -> logits [B, T or logits_to_keep, V].

        labels [B, T] are not shifted: position t is scored on predicting labels[t+1]; -100 is ignored.
        With `use_cache`, `past_key_values` of the output is a `KVCache` to pass back with the next tokens.
        `compute_logits=False` returns only the final hidden states [B, T, H] (`logits` None), for losses that
        apply `lm_head` themselves on the positions they need.
        """
        cache = as_kv_cache(past_key_values)
        if use_cache and cache is None:
            ref = inputs_embeds if inputs_embeds is not None else self.model.embed_tokens.weight
            batch, new = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
            cache = KVCache.for_model(self.config, batch, new, ref.dtype, ref.device)
        hidden, aux_loss = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        logits = self.lm_head(kept) if compute_logits else None
        loss = None
        if labels is not None and logits is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=hidden,
            **{CACHE_FIELD: cache if use_cache else None},
        )


MiniMindForCausalLM.register_for_auto_class("AutoModelForCausalLM")
