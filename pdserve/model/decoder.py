"""Dense decoder-only causal LM over the paged KV cache: Qwen3, Qwen2, Llama, Mistral, Phi-3, Gemma,
Gemma 2 and Gemma 3.

The families share one block (pre-norm GQA attention with RoPE, gated MLP, RMSNorm) and differ
only in ModelConfig flags: Qwen3 normalizes q and k per head (`qk_norm`), Qwen2 has biases on q/k/v
(`qkv_bias`), Llama may have them on all four projections, long-context checkpoints scale RoPE
(rope.py), Phi-3 stores q/k/v and gate/up fused (`fused_projections`) and may rotate part of each
head, Gemma scales its norms by (1 + weight), its embeddings by sqrt(hidden_size) and gates with
tanh-GELU, Gemma 2 adds norms on the attention and MLP outputs and soft-caps attention scores
and final logits, and Gemma 3 is Gemma 2 with Gemma-style q/k norms, no attention soft-capping and
a second RoPE table (other base, other scaling) for its local layers. Mistral, Phi-3, Gemma 2 and 3
and Qwen (with `use_sliding_window`) window the attention of some or all layers
(ModelConfig.sliding_windows). Module and parameter names follow the Hugging
Face checkpoints exactly (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, ..., `lm_head`),
so loading weights is a name lookup. The MoE variant (qwen3_moe.py) reuses every piece here and
only swaps the MLP of sparse layers.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.config import ModelConfig
from pdserve.model import triton_fused
from pdserve.model.attention import AttentionMetadata, paged_attention
from pdserve.model.kv_quant import KVScales
from pdserve.model.rope import RotaryEmbedding, apply_rope

# Builds the inference layer that replaces fused projections: (weight [out, in], bias [out] or None).
MakeLinear = Callable[[torch.Tensor, torch.Tensor | None], nn.Module]


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension (statistics in float32, like HF).

    With `unit_offset` (Gemma) the scale is (1 + weight) and everything is computed in float32,
    rounded to the input's dtype once at the end, as Gemma's reference does."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_fused.available(x):
            return triton_fused.add_rms_norm(x, None, self.weight, self.eps, self.unit_offset)[1]
        if self.unit_offset:
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float() + 1.0, self.eps).to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, norm(s)) for s = x + delta (s = x without a delta): a residual add and the next
        norm, one kernel on CUDA (triton_fused.py)."""
        if triton_fused.available(x):
            return triton_fused.add_rms_norm(x, delta, self.weight, self.eps, self.unit_offset)
        if delta is not None:
            x = x + delta
        return x, self(x)


def make_norm(config: ModelConfig, dim: int) -> RMSNorm:
    """The model's RMSNorm over `dim` features."""
    return RMSNorm(dim, config.rms_norm_eps, config.rms_norm_unit_offset)


class SelfAttention(nn.Module):
    """GQA self-attention with RoPE (and per-head q/k RMSNorm for Qwen3 and Gemma 3), over one layer of
    the paged cache; `window`: the layer's sliding window (None: full causal attention)."""

    def __init__(self, config: ModelConfig, window: int | None = None) -> None:
        super().__init__()
        self.window = window
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = (config.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.softcap = config.attn_logit_softcapping
        self.kv_scales = KVScales()  # a float8 KV cache's (the checkpoint's k_scale / v_scale, loader.py)
        h, hd, bias = config.hidden_size, config.head_dim, config.qkv_bias
        self._qkv_sizes = (self.num_heads * hd, self.num_kv_heads * hd, self.num_kv_heads * hd)
        # q/k/v as one layer: built so when the checkpoint stores them fused (Phi-3), else set by
        # fuse_projections (inference only).
        self.qkv_proj: nn.Module | None = None
        if config.fused_projections:
            self.qkv_proj = nn.Linear(h, sum(self._qkv_sizes), bias=bias)
        else:
            self.q_proj = nn.Linear(h, self.num_heads * hd, bias=bias)
            self.k_proj = nn.Linear(h, self.num_kv_heads * hd, bias=bias)
            self.v_proj = nn.Linear(h, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=config.o_proj_bias)
        self.q_norm = make_norm(config, hd) if config.qk_norm else None
        self.k_norm = make_norm(config, hd) if config.qk_norm else None

    def fuse_projections(self, make: MakeLinear) -> None:
        """Replace q/k/v_proj by one layer over their concatenated weights (one GEMM, not three)."""
        projs = (self.q_proj, self.k_proj, self.v_proj) if self.qkv_proj is None else ()
        if not projs or not all(isinstance(p, nn.Linear) for p in projs):  # fused, or 4-bit (int4_linear.py)
            return
        bias = torch.cat([p.bias for p in projs]) if self.q_proj.bias is not None else None
        self.qkv_proj = make(torch.cat([p.weight for p in projs]), bias)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x) if self.qkv_proj is not None else None
        if qkv is not None and triton_fused.available(qkv) and triton_fused.qk_norm_rope_supported(
            qkv, self.head_dim, cos.shape[-1]
        ):
            kv_stored = self._fused_norm_rope(qkv, cos, sin, kv_layer, meta)
            q, k, v = (y.unflatten(-1, (-1, self.head_dim)) for y in qkv.split(self._qkv_sizes, dim=-1))
        else:
            kv_stored = False
            if qkv is not None:
                q, k, v = qkv.split(self._qkv_sizes, dim=-1)
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = q.unflatten(-1, (self.num_heads, self.head_dim))
            k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
            v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = paged_attention(
            q, k, v, kv_layer, meta, self.scale, self.softcap, self.window, self.kv_scales, kv_stored=kv_stored
        )
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))

    def _fused_norm_rope(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata
    ) -> bool:
        """q/k norm and rope in place on qkv, and K/V into the cache when it has qkv's dtype (one
        kernel); True when the cache was written."""
        norms = None
        eps, unit_offset = 0.0, False
        if self.q_norm is not None and self.k_norm is not None:
            norms = (self.q_norm.weight, self.k_norm.weight)
            eps, unit_offset = self.q_norm.eps, self.q_norm.unit_offset
        write = kv_layer.dtype == qkv.dtype and kv_layer.stride(-1) == 1
        triton_fused.qk_norm_rope_(
            qkv, self.num_heads, self.num_kv_heads, cos, sin, norms, eps, unit_offset,
            kv_layer if write else None, meta.slot_mapping if write else None,
        )
        return write


class GatedMLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)), act silu (SwiGLU) or tanh-approximated GELU
    (Gemma's GeGLU). With `fused`, gate and up are one layer from the start (Phi-3's checkpoint)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", fused: bool = False) -> None:
        super().__init__()
        if act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported activation {act!r}")
        self.act = act
        # Set by fuse_projections (inference only) unless built fused.
        self.gate_up_proj: nn.Module | None = None
        if fused:
            self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        else:
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
            self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def fuse_projections(self, make: MakeLinear) -> None:
        """Replace gate/up_proj by one layer over their concatenated weights."""
        if self.gate_up_proj is not None or not all(isinstance(p, nn.Linear) for p in (self.gate_proj, self.up_proj)):
            return  # fused, or 4-bit (int4_linear.py)
        self.gate_up_proj = make(torch.cat([self.gate_proj.weight, self.up_proj.weight]), None)
        del self.gate_proj, self.up_proj

    def _act(self, g: torch.Tensor, inplace: bool) -> torch.Tensor:
        if self.act == "gelu_pytorch_tanh":
            return F.gelu(g, approximate="tanh")
        return F.silu(g, inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)
            if self.act == "silu" and triton_fused.available(gate_up):
                return self.down_proj(triton_fused.silu_mul(gate_up))
            g, u = gate_up.chunk(2, dim=-1)
            return self.down_proj(self._act(g, inplace=False).mul_(u))
        g = self.gate_proj(x)
        if torch.is_grad_enabled():
            return self.down_proj(self._act(g, inplace=False) * self.up_proj(x))
        return self.down_proj(self._act(g, inplace=True).mul_(self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); calls meta.layer_hook after attention.

    With sandwich_norms (Gemma 2 and 3) each block's output is normalized too:
    x + norm(attn(norm(x))), then x + norm(mlp(norm(x))).

    The residual stream travels as (x, delta) with the block's last add left to the next norm
    (the next layer's input norm, or the final one), which does add and norm in one kernel on CUDA:
    forward(x, delta) returns (x', delta') with x' + delta' the block's output."""

    def __init__(self, config: ModelConfig, layer_idx: int, mlp: nn.Module) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.local_rope = config.local_rope(layer_idx)  # rotates by DecoderModel.local_rotary's table
        self.self_attn = SelfAttention(config, config.sliding_window(layer_idx))
        self.mlp = mlp
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.post_attention_layernorm = make_norm(config, config.hidden_size)
        self.pre_feedforward_layernorm: RMSNorm | None = None
        self.post_feedforward_layernorm: RMSNorm | None = None
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = make_norm(config, config.hidden_size)
            self.post_feedforward_layernorm = make_norm(config, config.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, h = self.input_layernorm.add_forward(x, delta)
        attn = self.self_attn(h, cos, sin, kv_layer, meta)
        if meta.layer_hook is not None:
            meta.layer_hook(self.layer_idx)
        if self.pre_feedforward_layernorm is None or self.post_feedforward_layernorm is None:
            x, h = self.post_attention_layernorm.add_forward(x, attn)
            return x, self.mlp(h)
        x, h = self.pre_feedforward_layernorm.add_forward(x, self.post_attention_layernorm(attn))
        return x, self.post_feedforward_layernorm(self.mlp(h))


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig, layers: list[DecoderLayer]) -> None:
        super().__init__()
        # _weight skips nn.Embedding's random init: weights come from the loader.
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(layers)
        self.norm = make_norm(config, config.hidden_size)
        self.rotary = RotaryEmbedding(
            config.rotary_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.local_rotary: RotaryEmbedding | None = None
        if config.local_rope_layers:
            self.local_rotary = RotaryEmbedding(
                config.rotary_dim, config.max_position_embeddings, config.local_rope_theta, config.local_rope_scaling
            )
        self.embed_scale = config.hidden_size**0.5 if config.scale_embeddings else None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            x = x * _in_dtype(self.embed_scale, x.dtype)
        rope = self.rotary(positions, x.dtype)
        local_rope = rope if self.local_rotary is None else self.local_rotary(positions, x.dtype)
        delta: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            cos, sin = local_rope if layer.local_rope else rope
            x, delta = layer(x, delta, cos, sin, kv_cache[i], meta)
        return self.norm.add_forward(x, delta)[1]


@cache
def _in_dtype(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to `dtype` (Gemma 1-3 scale their embeddings by sqrt(hidden_size) in the model's
    dtype; rounding through float32 first, as Gemma 3's reference does, gives the same value for every
    hidden size below 40000 in bf16 and fp16)."""
    return torch.tensor(value, dtype=dtype).item()


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


@torch.no_grad()
def fuse_projections_(module: nn.Module) -> None:
    """Fuse q/k/v and gate/up of every layer into one nn.Linear each (inference only): fewer,
    larger GEMMs, which on a GPU read the weights closer to full bandwidth at decode batch sizes."""
    for m in list(module.modules()):
        fuse = getattr(m, "fuse_projections", None)
        if fuse is not None:
            fuse(_plain_linear)


class DecoderForCausalLM(nn.Module):
    """Dense causal LM over a paged KV cache.

    forward(input_ids [T], positions [T], kv_cache [layers, blocks, 2, kvh, block_size, hd], meta)
    returns the final hidden states [T, hidden]; compute_logits maps selected rows to float32 logits.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        layers = [DecoderLayer(config, i, self.make_mlp(config, i)) for i in range(config.num_hidden_layers)]
        self.model = DecoderModel(config, layers)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    def serve_context(self, max_model_len: int) -> None:
        """Size the RoPE tables for contexts of up to `max_model_len` tokens, which also picks
        LongRoPE's factor set as vLLM does (rope.py)."""
        for rotary in (self.model.rotary, self.model.local_rotary):
            if rotary is not None:
                rotary.serve(max_model_len)

    @staticmethod
    def make_mlp(config: ModelConfig, layer_idx: int) -> nn.Module:
        """The feed-forward block of layer `layer_idx` (overridden by the MoE variant)."""
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.fused_projections)

    @property
    def kv_scales(self) -> tuple[KVScales, ...]:
        """Each layer's KV-cache scales (1.0 unless the checkpoint had them), for a float8 cache."""
        return tuple(layer.self_attn.kv_scales for layer in self.model.layers)

    def tie_weights(self) -> None:
        """Share the input embedding with lm_head (after loading or materializing)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Run the flat batch; writes this step's K/V into kv_cache; returns hidden [T, hidden]."""
        return self.model(input_ids, positions, kv_cache, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32 (soft-capped for Gemma 2, and Gemma 3 if its
        config says so)."""
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else logits.div_(cap).tanh_().mul_(cap)
