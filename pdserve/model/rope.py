"""Rotary position embedding (neox / rotate-half convention) with the HF RoPE scalings.

The table is float32 `[max_positions, 2, rotary_dim // 2]` (cos, sin), built once per device; the
frequency of pair i is `inv_freq[i]`, and scalings only change `inv_freq` (and, for YaRN and
LongRoPE, multiply cos/sin by an attention factor). `rotary_dim` is head_dim unless the model
rotates only part of each head (Phi-3's partial_rotary_factor): then the other dims pass through.
Gemma 3 has two tables, one RotaryEmbedding each (decoder.py): its local layers' (their own base,
unscaled in the released checkpoints) and its global layers'; each step looks both up once.

LongRoPE has two sets of per-frequency factors; transformers picks one per forward call from that
sequence's length, which would change the rotation of keys already in the cache. Here the choice
is static, as in vLLM: the long factors when the served context (`max_positions`: the engine's
max_model_len, `--max-model-len` or else max_position_embeddings; `serve`) exceeds
original_max_position_embeddings, the
short factors otherwise, for every position of every sequence. So it equals transformers for
every sequence when the context is at most original_max_position_embeddings, and for sequences
longer than that otherwise; a shorter sequence under a longer context gets the long factors where
transformers would use the short ones (the attention factor, from `factor`, is the same for both).
"""

from __future__ import annotations

import math

import torch

from pdserve.config import RopeScaling


def default_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """theta ** (-2i / head_dim) for i < head_dim / 2, float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Wavelengths shorter than original_len / high_freq_factor are kept, longer than
    # original_len / low_freq_factor divided by `factor`, and those between interpolated smoothly.
    original = float(s.original_max_position_embeddings or 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= original / s.high_freq_factor) & (wavelen <= original / s.low_freq_factor)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(head_dim: int, theta: float, s: RopeScaling, device: torch.device | None) -> tuple[torch.Tensor, float]:
    original = s.original_max_position_embeddings
    if original is None:
        raise ValueError("yarn RoPE scaling needs original_max_position_embeddings")
    if s.attention_factor is not None:
        attention_factor = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention_factor = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(s.factor)

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength fits `rotations` times into the original context.
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (s.factor * pos_freqs)
    keep = 1 - ramp  # 1: the original frequency (high frequencies), 0: interpolated
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def _longrope(
    head_dim: int, theta: float, s: RopeScaling, max_positions: int | None, device: torch.device | None
) -> tuple[torch.Tensor, float]:
    original = s.original_max_position_embeddings
    if original is None or s.short_factor is None or s.long_factor is None:
        raise ValueError("longrope RoPE scaling needs short_factor, long_factor and original_max_position_embeddings")
    factors = s.long_factor if max_positions is not None and max_positions > original else s.short_factor
    if len(factors) != head_dim // 2:
        raise ValueError(f"longrope factors have {len(factors)} entries; the rotary dims need {head_dim // 2}")
    if s.attention_factor is not None:
        attention_factor = s.attention_factor
    else:
        attention_factor = 1.0 if s.factor <= 1 else math.sqrt(1 + math.log(s.factor) / math.log(original))
    ext = torch.tensor(factors, dtype=torch.float32, device=device)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (ext * theta**exponents), attention_factor


def rope_inv_freq(
    head_dim: int,
    theta: float,
    scaling: RopeScaling | None,
    device: torch.device | None = None,
    max_positions: int | None = None,
) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim // 2] float32, factor applied to cos and sin) for `scaling`; head_dim is
    the rotary dim. `max_positions`, the served context, picks LongRoPE's factor set (module doc)."""
    if scaling is None:
        return default_inv_freq(head_dim, theta, device), 1.0
    if scaling.rope_type == "linear":
        return default_inv_freq(head_dim, theta, device) / scaling.factor, 1.0
    if scaling.rope_type == "llama3":
        return _llama3_inv_freq(default_inv_freq(head_dim, theta, device), scaling), 1.0
    if scaling.rope_type == "yarn":
        return _yarn(head_dim, theta, scaling, device)
    if scaling.rope_type == "longrope":
        return _longrope(head_dim, theta, scaling, max_positions, device)
    raise ValueError(f"unsupported rope_type {scaling.rope_type!r}")


class RotaryEmbedding:
    """cos/sin lookup for positions; the table is built lazily on the positions' device."""

    def __init__(self, rotary_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None = None) -> None:
        self.rotary_dim = rotary_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self._table: torch.Tensor | None = None  # [max_positions, 2, head_dim // 2] float32

    def serve(self, max_positions: int) -> None:
        """Serve contexts of up to `max_positions` tokens (the engine's max_model_len): the table's
        length, and what picks LongRoPE's factor set (module doc)."""
        if max_positions != self.max_positions:
            self.max_positions = max_positions
            self._table = None

    def _build(self, device: torch.device) -> torch.Tensor:
        inv_freq, attention_factor = rope_inv_freq(
            self.rotary_dim, self.theta, self.scaling, device, self.max_positions
        )
        pos = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(pos, inv_freq)  # [P, half]
        table = torch.stack([freqs.cos(), freqs.sin()], dim=1)
        return table * attention_factor if attention_factor != 1.0 else table

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `positions` ([T]), each [T, 1, rotary_dim // 2] in `dtype`."""
        if self._table is None or self._table.device != positions.device:
            self._table = self._build(positions.device)
        cs = self._table.index_select(0, positions).to(dtype)
        return cs[:, 0:1], cs[:, 1:2]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x ([T, heads, hd]) by the half-split (rotate_half) convention of HF Llama/Qwen; with
    cos/sin narrower than hd / 2, only the first 2 * cos.shape[-1] dims (the rest pass through)."""
    half = cos.shape[-1]
    if 2 * half < x.shape[-1]:
        rot, rest = x[..., : 2 * half], x[..., 2 * half :]
        return torch.cat((apply_rope(rot, cos, sin), rest), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
