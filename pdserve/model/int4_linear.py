"""GPTQ / AWQ linears at run time: 4-bit weights kept as 4 bits on CPU (torch's int4 kernels), every
other case dequantized at load into the model's dtype.

On CPU, a 4-bit layer (Int4Linear) keeps only torch's int4 pack (half a byte a weight, a quarter of
bf16) and its scales and zeros, and runs a batch of M rows one of two ways (measured on the 2-core
VM, one thread, 4096 x 4096, benchmarks/RESULTS.md "GPTQ / AWQ 4-bit weights"):

    M <= KERNEL_MAX_ROWS   torch's int4 GEMM (`_weight_int4pack_mm_for_cpu`): reads half a byte a
                           weight, about 2x faster than the prepacked bf16 GEMM at M = 1 and 1.4x at
                           M = 4, slower from M ~ 16 on (its cost grows ~linearly with M)
    M >  KERNEL_MAX_ROWS   dequantize the pack to the model's dtype DEQUANT_ROWS output features at a
                           time (each chunk stays in cache: ~10 ms for 4096 x 4096, against ~60 ms
                           whole) and run a dense GEMM per chunk: prefill pays ~1.2x bf16's time

Keeping a bf16 copy too would cost 1.25x bf16's memory, the opposite of what a 4-bit checkpoint is
for, so there is none. torch's kernel computes W = (q - 8) * scale + zero with one (scale, zero) per
group of input features and output feature, so a checkpoint's zero point Z becomes
zero = (8 - Z) * scale. Act-order checkpoints (GPTQ desc_act) are run with their input features
permuted so that each group is contiguous (x[:, perm] @ W[:, perm]^T = x @ W^T).

torch's CPU pack, for a block of 64 output features n0 .. n0+63 (N must be a multiple of 64):

    pack.view(N / 64, K, 32) uint8:  byte [b, k, j] = W[64b + j, k]  (low nibble)
                                                    | W[64b + 32 + j, k] << 4  (high nibble)

Layers the kernel cannot run (8 bits, N % 64 != 0, a group size that is not a multiple of 32, act-
order groups of unequal sizes) and every layer on CUDA or with `kernels` off are dequantized at load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import nn

from pdserve.model.gptq_awq import IntWeight, concat_outputs, dequantize_into_

log = logging.getLogger(__name__)

KERNEL_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu takes
BLOCK_N = 64  # output features per block of torch's CPU pack
# Batches of up to this many rows run the int4 kernel; larger ones dequantize chunk by chunk (the two
# cost the same near 64-96 rows on the 2-core VM).
KERNEL_MAX_ROWS = 64
DEQUANT_ROWS = 256  # output features dequantized at a time on the large-batch path
# q/k/v and gate/up run as one layer (decoder.fuse_projections), fused here before packing.
FUSED_GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def cpu_int4_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """True where Int4Linear runs: CPU, a float model dtype, a torch with the CPU int4 kernels."""
    ops = torch.ops.aten
    return (
        device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float16, torch.float32)
        and hasattr(ops, "_weight_int4pack_mm_for_cpu")
        and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
    )


class Int4Linear(nn.Module):
    """Inference-only 4-bit linear on CPU (module doc): y = x W^T (+ bias)."""

    def __init__(
        self,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        group_size: int,
        perm: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.out_features = packed.shape[0]
        self.in_features = scales_and_zeros.shape[0] * group_size
        self.packed = packed  # [N, K / 2] uint8, torch's CPU layout
        self.scales_and_zeros = scales_and_zeros  # [K / group_size, N, 2] in the model dtype
        self.group_size = group_size
        self.perm = perm  # input features in kernel order (act-order checkpoints), else None
        self.bias = bias

    @classmethod
    def from_int_weight(cls, w: IntWeight, dtype: torch.dtype, bias: torch.Tensor | None = None) -> Int4Linear | None:
        """The layer of `w` in `dtype`, or None when the kernel cannot run it (module doc)."""
        n, k = w.shape
        if w.bits != 4 or n % BLOCK_N:
            return None
        q, g_idx, perm = w.q, w.g_idx, None
        if w.contiguous_groups() is None:  # act-order: sort the input features by group
            perm = torch.argsort(g_idx, stable=True)
            g_idx = g_idx.index_select(0, perm)
            if not torch.equal(g_idx, torch.arange(k) // w.group_size):
                return None
            q = q.index_select(1, perm)
        if k % w.group_size:
            return None
        kernel_group = next((g for g in KERNEL_GROUP_SIZES if w.group_size % g == 0), None)
        if kernel_group is None:
            return None
        scales = w.scales.float().repeat_interleave(w.group_size // kernel_group, dim=0)  # [K / kg, N]
        zeros = (8 - w.zeros.float()).repeat_interleave(w.group_size // kernel_group, dim=0) * scales
        sz = torch.stack([scales, zeros], dim=-1).to(dtype).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
        return cls(packed, sz, kernel_group, perm, None if bias is None else bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if x2.shape[0] <= KERNEL_MAX_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.contiguous(), self.packed, self.group_size, self.scales_and_zeros
            )
        else:
            y = self._dequantized_mm(x2)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.reshape(*lead, self.out_features)

    def _dequantize_rows(self, b0: int, b1: int, buf: torch.Tensor) -> torch.Tensor:
        """W^T [K, n] of output blocks b0 .. b1 - 1 (n = 64 (b1 - b0)), in kernel input order, written
        into buf's first K * n elements: q * scale + (zero - 8 scale), the kernel's value."""
        k, n = self.in_features, (b1 - b0) * BLOCK_N
        n0 = b0 * BLOCK_N
        pk = self.packed.view(-1, k, BLOCK_N // 2)[b0:b1].transpose(0, 1)  # [K, blocks, 32]
        wt = buf.view(-1)[: k * n].view(k, n)
        halves = wt.view(k, b1 - b0, 2, BLOCK_N // 2)
        halves[:, :, 0].copy_(pk & 15)
        halves[:, :, 1].copy_(pk >> 4)
        sz = self.scales_and_zeros[:, n0 : n0 + n].float()
        scale = sz[..., 0].unsqueeze(1)  # [K / g, 1, n]
        shift = (sz[..., 1] - 8 * sz[..., 0]).to(wt.dtype).unsqueeze(1)
        grouped = wt.view(k // self.group_size, self.group_size, n)
        torch.addcmul(shift, grouped, scale.to(wt.dtype), out=grouped)
        return wt

    def _dequantized_mm(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
        step = DEQUANT_ROWS // BLOCK_N
        blocks = self.out_features // BLOCK_N
        buf = torch.empty(self.in_features * min(DEQUANT_ROWS, self.out_features), dtype=x.dtype)
        for b0 in range(0, blocks, step):
            b1 = min(blocks, b0 + step)
            out[:, b0 * BLOCK_N : b1 * BLOCK_N] = x @ self._dequantize_rows(b0, b1, buf)
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """W [N, K] in the model dtype and the checkpoint's input order (what the kernel computes with)."""
        buf = torch.empty(self.in_features * self.out_features, dtype=self.scales_and_zeros.dtype)
        wt = self._dequantize_rows(0, self.out_features // BLOCK_N, buf)
        w = wt.t()
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.contiguous()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"act_order={self.perm is not None}, bias={self.bias is not None}")


def _replace(module: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, name, new)


def _dequantize_into_linear(linear: nn.Module, w: IntWeight, dtype: torch.dtype, device: torch.device) -> None:
    weight = torch.empty(w.shape, dtype=dtype, device=device)
    dequantize_into_(weight, w)
    linear.weight = nn.Parameter(weight, requires_grad=False)


@torch.no_grad()
def install_int_weights_(
    module: nn.Module,
    weights: Mapping[str, Callable[[], IntWeight]],
    dtype: torch.dtype,
    device: torch.device,
    kernels: bool = True,
) -> tuple[int, int]:
    """Give each quantized linear of `module` (`weights`: its path -> a reader of its IntWeight, called
    once) its weight: an Int4Linear in its place where the CPU kernel runs it and `kernels` is on,
    with q/k/v and gate/up fused first when all of them are quantized alike; else its weight
    dequantized into `dtype` (one at a time). Returns (4-bit layers, dequantized linears)."""
    readers = dict(weights)

    def read(path: str) -> IntWeight:
        w = readers[path]()
        linear = module.get_submodule(path)
        if w.shape != (linear.out_features, linear.in_features):
            raise ValueError(f"{path}: quantized weight of shape {list(w.shape)}, model layer "
                             f"{[linear.out_features, linear.in_features]}")
        return w

    pending: dict[str, Callable[[], IntWeight]] = {p: partial(read, p) for p in readers}
    int4 = 0
    if kernels and cpu_int4_supported(device, dtype):
        for name, m in list(module.named_modules()):
            if getattr(m, "fuse_projections", None) is None:
                continue
            for fused_name, parts in FUSED_GROUPS.items():
                paths = [f"{name}.{p}" if name else p for p in parts]
                if getattr(m, fused_name, 0) is not None or not all(p in pending for p in paths):
                    continue
                ints = [pending.pop(p)() for p in paths]
                biases = [getattr(m, p).bias for p in parts]
                bias = torch.cat(biases) if all(b is not None for b in biases) else None
                fused = concat_outputs(ints)
                layer = None if fused is None or (bias is None and any(b is not None for b in biases)) \
                    else Int4Linear.from_int_weight(fused, dtype, bias)
                if layer is None:  # run them apart
                    pending.update({p: (lambda w=w: w) for p, w in zip(paths, ints, strict=True)})
                    continue
                setattr(m, fused_name, layer)
                for p in parts:
                    delattr(m, p)
                int4 += 1
        for path in list(pending):
            linear = module.get_submodule(path)
            w = pending[path]()
            layer = Int4Linear.from_int_weight(w, dtype, getattr(linear, "bias", None))
            if layer is not None:
                _replace(module, path, layer)
                int4 += 1
                del pending[path]
            else:
                pending[path] = lambda w=w: w
    for path, read in pending.items():
        _dequantize_into_linear(module.get_submodule(path), read(), dtype, device)
    return int4, len(pending)
