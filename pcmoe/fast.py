"""A lean forward pass for llama-style decoder MoEs (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE).

At batch 1 on a CPU, transformers' per-call machinery (decorators, keyword plumbing, mask
construction, cache objects, separate norm and rotary ops) costs more than the weights' memory
traffic on small and mid-size models. This path runs the same modules' weights with a minimal
sequence of ops and a preallocated KV cache, and calls the same CommitteeMoE blocks. The
transformers forward (`engine.model`) is its slow twin; tests keep the two equal.

Dimension legend: n new tokens, p cached positions, H hidden, D head dim, Hq / Hkv query / KV heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pcmoe.native import ops  # ctypes wrappers: importing them loads no library


def supports(model) -> bool:
    """Whether a model of a `lean_decoder` family has nothing the lean path leaves out."""
    cfg = model.config
    types = getattr(cfg, "layer_types", None) or ["full_attention"]
    if any(t != "full_attention" for t in types):
        return False  # sliding-window layers: keep the transformers path
    return getattr(cfg, "_attn_implementation", "sdpa") in ("sdpa", "eager", None)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in one fused op (accumulated in float32 by torch; transformers rounds once more
    before scaling, a difference of at most one bf16 unit and none in float32)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding x*cos + rotate_half(x)*sin in three ops: rotate_half(x) = cat(-x2, x1) is
    roll(x, D/2) with the first half negated, which `signed_sin` (= cat(-sin1, sin2)) carries."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class KVCache:
    """Keys and values of every layer in preallocated buffers [1, Hkv, capacity, D], grown by
    doubling when a sequence outgrows them."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, capacity: int = 256):
        self.shape = (1, kv_heads, capacity, head_dim)
        self.k = [torch.empty(self.shape, dtype=dtype) for _ in range(layers)]
        self.v = [torch.empty(self.shape, dtype=dtype) for _ in range(layers)]
        self.length = 0

    def reserve(self, total: int) -> None:
        capacity = self.k[0].shape[2]
        if total <= capacity:
            return
        while capacity < total:
            capacity *= 2
        for buffers in (self.k, self.v):
            for i, old in enumerate(buffers):
                new = torch.empty((*old.shape[:2], capacity, old.shape[3]), dtype=old.dtype)
                new[:, :, :self.length] = old[:, :, :self.length]
                buffers[i] = new


def _fuse_qkv(attn) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """One [Hq*D + 2*Hkv*D, H] projection instead of three (one call per layer instead of three).
    The three modules' weights become views of the fused tensor, so no memory is added and the
    transformers forward (the slow twin) reads the very same numbers."""
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    split = [p.weight.shape[0] for p in projs]
    weight = torch.cat([p.weight.detach() for p in projs])
    has_bias = [p.bias is not None for p in projs]
    bias = torch.cat([p.bias.detach() for p in projs]) if all(has_bias) else None
    if any(has_bias) and bias is None:
        raise ValueError("q/k/v projections with and without bias")
    start = 0
    for p, rows in zip(projs, split):
        p.weight.data = weight[start:start + rows]
        if bias is not None:
            p.bias.data = bias[start:start + rows]
        start += rows
    return weight, bias, split


class FastDecoder:
    """The registry says which families it runs (Family.lean_decoder) and how they normalise
    queries and keys (Family.qk_norm)."""

    def __init__(self, model, family, native=None):
        cfg = model.config
        self.native = native        # pcmoe.native kernels for one-token steps (bf16), or None
        self.model = model
        self.config = cfg
        base = model.model
        self.embed = base.embed_tokens
        self.rotary = base.rotary_emb
        self.final_norm = base.norm
        self.lm_head = model.lm_head
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.q_heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.per_head_norm = family.qk_norm == "per_head"      # Qwen3; OLMoE normalises the whole projection
        self.projection_norm = family.qk_norm == "projection"
        self.clip = getattr(cfg, "clip_qkv", None)
        self.layers = list(base.layers)
        # pcmoe.nonexpert replaced q/k/v by one quantised projection (attn.qkv_quant), o_proj and
        # the LM head by QuantLinear modules: their forward is torch's int8/int4 kernels.
        self.quantized = getattr(self.layers[0].self_attn, "qkv_quant", None) is not None
        if self.quantized:
            self.qkv = [(layer.self_attn.qkv_quant, None, layer.self_attn.qkv_split) for layer in self.layers]
        else:
            self.qkv = [_fuse_qkv(layer.self_attn) for layer in self.layers]
        # With quantised non-expert weights the attention block runs the quantised products in the same
        # one call (pcmoe_attention_block_quant); fused_quantized=False runs its op-by-op twin instead.
        self.fused_quantized = True
        if native is not None:
            mode = 1 if self.per_head_norm else 2 if self.projection_norm else 0
            self.attention_blocks = [ops.AttentionBlock(native, layer, qkv, mode, self.clip, self.head_dim)
                                     for layer, qkv in zip(self.layers, self.qkv)]

    def new_cache(self, capacity: int = 256) -> KVCache:
        dtype = self.lm_head.dtype if self.quantized else self.embed.weight.dtype
        return KVCache(len(self.layers), self.kv_heads, self.head_dim, dtype, capacity)

    def forward(self, ids: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """ids [1, n] -> logits [n, V] (or [1, V] with last_only), appending to the cache."""
        if self.native is not None and ids.shape[1] == 1:
            return self._forward_one_native(ids, cache)
        n, p = ids.shape[1], cache.length
        cache.reserve(p + n)
        x = self.embed(ids)                                                   # [1, n, H]
        cos, sin = self.rotary(x, torch.arange(p, p + n).unsqueeze(0))       # [1, n, D]
        half = sin.shape[-1] // 2
        cos, sin = cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)  # [1,1,n,D]
        mask = None
        if n > 1 and p > 0:  # a chunk after cached tokens: causal within the chunk, all of the past
            mask = torch.ones(n, p + n, dtype=torch.bool).tril(diagonal=p)
        D, Hq, Hkv = self.head_dim, self.q_heads, self.kv_heads
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = _rms(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            weight, bias, split = self.qkv[i]
            qkv = weight(h) if self.quantized else F.linear(h, weight, bias)
            q, k, v = qkv.split(split, dim=-1)                              # [1, n, Hq*D], [1, n, Hkv*D] x2
            if self.projection_norm:                                        # OLMoE
                q = _rms(q, attn.q_norm.weight, attn.q_norm.variance_epsilon)
                k = _rms(k, attn.k_norm.weight, attn.k_norm.variance_epsilon)
            if self.clip is not None:
                q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
            q, k, v = q.view(1, n, Hq, D), k.view(1, n, Hkv, D), v.view(1, n, Hkv, D)
            if self.per_head_norm:                                          # Qwen3: RMSNorm per head
                q = _rms(q, attn.q_norm.weight, attn.q_norm.variance_epsilon)
                k = _rms(k, attn.k_norm.weight, attn.k_norm.variance_epsilon)
            qk = _rotate(torch.cat((q, k), dim=2).transpose(1, 2), cos, sin)  # [1, Hq+Hkv, n, D] in one pass
            keys, values = cache.k[i], cache.v[i]                               # [1, Hkv, capacity, D]
            keys.narrow(2, p, n).copy_(qk.narrow(1, Hq, Hkv))
            values.narrow(2, p, n).copy_(v.transpose(1, 2))
            a = F.scaled_dot_product_attention(qk.narrow(1, 0, Hq), keys.narrow(2, 0, p + n),
                                               values.narrow(2, 0, p + n), attn_mask=mask,
                                               is_causal=mask is None and n > 1, scale=attn.scaling,
                                               enable_gqa=Hq != Hkv)             # [1, Hq, n, D]
            a = a.transpose(1, 2).reshape(1, n, Hq * D)
            x = x + (attn.o_proj(a) if self.quantized else F.linear(a, attn.o_proj.weight, attn.o_proj.bias))
            h = _rms(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
            x = x + layer.mlp(h)
        cache.length = p + n
        if last_only:
            x = x[:, -1:]
        x = _rms(x, self.final_norm.weight, self.final_norm.variance_epsilon)
        return self.lm_head(x)[0]                                             # [n, V]

    def _forward_one_native(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step with the native kernels: per layer one call for the attention block
        (norm, q/k/v, q/k norms, rotary, cache write, attention, o_proj, residual, the next norm)
        and the same CommitteeMoE block as the eager path. Logits [1, V] in float32."""
        k, p = self.native, cache.length
        cache.reserve(p + 1)
        x = self.embed(ids)                                                   # [1, 1, H]
        cos, sin = self.rotary(x, torch.tensor([[p]]))                        # [1, 1, D]
        cos, sin = cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous()
        if self.quantized and not self.fused_quantized:
            return self._forward_one_quantized(x, cos, sin, cache, p)
        cos_ptr, sin_ptr = cos.data_ptr(), sin.data_ptr()
        for i, (layer, block) in enumerate(zip(self.layers, self.attention_blocks)):
            h = block(x, cos_ptr, sin_ptr, cache.k[i], cache.v[i], p)
            x = x + layer.mlp(h)
        cache.length = p + 1
        x = ops.rmsnorm(k, x, self.final_norm.weight, self.final_norm.variance_epsilon)
        if self.quantized:
            return self.lm_head.native(k, x).view(1, -1)                       # [1, V] float32
        return ops.linear(k, x, self.lm_head.weight, None, torch.float32)[0]  # [1, V]

    def _forward_one_quantized(self, x, cos, sin, cache: KVCache, p: int) -> torch.Tensor:
        """The native step with quantised non-expert weights, op by op: the twin of the fused
        quantised attention block (each step a torch op around the quantised products, VNNI gemv,
        with the kernel's roundings: bf16 q/k/v, rotary in float32 then bf16, bf16 o_proj output)."""
        k, D, Hq, Hkv = self.native, self.head_dim, self.q_heads, self.kv_heads
        half = D // 2
        cos = cos.float()
        signed_sin = torch.cat((-sin[:half], sin[half:])).float()                # [D]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            norm = layer.input_layernorm
            h = ops.rmsnorm(k, x, norm.weight, norm.variance_epsilon)           # [1, 1, H]
            qkv_proj, _, split = self.qkv[i]
            qkv = qkv_proj.native(k, h).to(x.dtype)                              # [Hq*D + 2*Hkv*D]
            q, key, v = qkv.split(split)
            if self.projection_norm:                                            # OLMoE
                q = ops.rmsnorm(k, q, attn.q_norm.weight, attn.q_norm.variance_epsilon)
                key = ops.rmsnorm(k, key, attn.k_norm.weight, attn.k_norm.variance_epsilon)
            if self.clip is not None:
                q, key, v = (t.clamp(-self.clip, self.clip) for t in (q, key, v))
            q, key = q.reshape(Hq, D), key.reshape(Hkv, D)
            if self.per_head_norm:                                              # Qwen3
                q = ops.rmsnorm(k, q, attn.q_norm.weight, attn.q_norm.variance_epsilon)
                key = ops.rmsnorm(k, key, attn.k_norm.weight, attn.k_norm.variance_epsilon)
            qk = torch.cat((q, key)).float()                                    # [Hq+Hkv, D]
            qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), signed_sin).to(x.dtype)
            cache.k[i][0, :, p] = qk[Hq:]
            cache.v[i][0, :, p] = v.view(Hkv, D)
            a = ops.attention(k, qk[:Hq].contiguous(), cache.k[i], cache.v[i], p + 1, attn.scaling)  # [Hq, D]
            x = x + attn.o_proj.native(k, a).to(x.dtype).view_as(x)
            post = layer.post_attention_layernorm
            x = x + layer.mlp(ops.rmsnorm(k, x, post.weight, post.variance_epsilon))
        cache.length = p + 1
        x = ops.rmsnorm(k, x, self.final_norm.weight, self.final_norm.variance_epsilon)
        return self.lm_head.native(k, x).view(1, -1)                           # [1, V] float32
