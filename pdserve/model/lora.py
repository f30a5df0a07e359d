"""LoRA adapters (PEFT's format) applied per row of a mixed batch, over any base linear.

An adapter directory holds `adapter_config.json` (r, lora_alpha, target_modules, use_rslora) and
`adapter_model.safetensors` with, per adapted linear `P` (an HF module path),
`base_model.model.P.lora_A.weight` [r, in] and `base_model.model.P.lora_B.weight` [out, r]:

    y = W x + scale * B (A x),   scale = lora_alpha / r   (lora_alpha / sqrt(r) with rsLoRA)

The engine may have fused q/k/v (or gate/up) into one linear; its LoRA then covers every slice:

    A_cat = [A_q; A_v]            [r_q + r_v, in]     (slices the adapter does not target: absent)
    B_cat = | B_q  0   |  rows of q                   [out_q + out_k + out_v, r_q + r_v]
            |  0   0   |  rows of k
            |  0   B_v |  rows of v

so one pair of small GEMMs per (layer, adapter) serves the whole fused output. A fused linear also
takes an adapter of the fused module itself (`qkv_proj`, `gate_up_proj`: Phi-3's checkpoints have
no separate q/k/v or gate/up), over all its rows. Which rows of the step's flat batch use which
adapter is `LoRAState.groups`, set by the runner before each forward.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from pdserve.model.cpu_linear import PackedLinear, can_prepack

PEFT_PREFIX = "base_model.model."
# A fused linear's output slices, in order, by the name of the fused linear.
FUSED_SLICES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", *FUSED_SLICES)


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter read from disk (CPU tensors): per target module path, (A [r, in], B [out, r] * scale)."""

    name: str
    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]


def read_adapter(path: str | Path, name: str, max_rank: int) -> AdapterWeights:
    """Read a PEFT LoRA directory; ValueError naming what is unsupported or malformed."""
    path = Path(path).expanduser()
    cfg_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise ValueError(f"no adapter_config.json in {path}")
    if not weights_file.is_file():
        raise ValueError(f"no adapter_model.safetensors in {path} (pickled .bin adapters are not loaded)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if cfg.get(key, ok) not in (ok, None):
            raise ValueError(f"{cfg_file}: {key}={cfg[key]!r} is not supported")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{cfg_file}: {key} is not supported")
    rank = int(cfg["r"])
    if rank > max_rank:
        raise ValueError(f"adapter {name!r} has rank {rank}, above --max-lora-rank {max_rank}")
    alpha = float(cfg.get("lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(weights_file), framework="pt", device="cpu") as f:
        for key in f.keys():
            if not key.startswith(PEFT_PREFIX) or not key.endswith(("lora_A.weight", "lora_B.weight")):
                raise ValueError(f"{weights_file.name}: unsupported tensor {key!r} (only LoRA A/B of linears)")
            module, _, kind = key[len(PEFT_PREFIX):].rpartition(".lora_")
            if module.rpartition(".")[2] not in SUPPORTED_TARGETS:
                raise ValueError(f"{weights_file.name}: LoRA on {module!r} is not supported "
                                 f"(targets: {', '.join(SUPPORTED_TARGETS)})")
            pairs.setdefault(module, {})[kind[0]] = f.get_tensor(key).float()
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{weights_file.name}: {module} lacks lora_{'A' if 'A' not in ab else 'B'}")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{weights_file.name}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}")
        modules[module] = (a, b * scale)
    if not modules:
        raise ValueError(f"{weights_file.name} holds no LoRA weights")
    return AdapterWeights(name, rank, modules)


@dataclass
class LoRAState:
    """The current step's adapter groups: (adapter id, the rows using it, or None for every row)."""

    groups: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)


class LoRALinear(nn.Module):
    """A base linear (plain, packed or fused) plus, per loaded adapter, its A_cat / B_cat."""

    def __init__(self, base: nn.Module, slices: list[tuple[str, int, int]], state: LoRAState) -> None:
        super().__init__()
        self.base = base
        self.slices = slices  # (module path of the slice, first output row, end row); may overlap
        self.out_features = slices[-1][2]
        self.state = state
        # Per adapter id: x -> A_cat x and h -> B_cat h (packed for oneDNN on a bf16 CPU).
        self.adapters: dict[int, tuple[Projection, Projection]] = {}

    def install(self, adapter_id: int, weights: AdapterWeights, dtype: torch.dtype, device: torch.device) -> bool:
        """Add this module's part of an adapter (False when it targets none of its slices)."""
        parts = [(weights.modules[p], start, end) for p, start, end in self.slices if p in weights.modules]
        if not parts:
            return False
        rank = sum(a.shape[0] for (a, _), _, _ in parts)
        a_cat = torch.cat([a for (a, _), _, _ in parts])
        b_cat = torch.zeros(self.out_features, rank)
        col = 0
        for (a, b), start, end in parts:
            if b.shape[0] != end - start or a.shape[1] != a_cat.shape[1]:
                raise ValueError(f"LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the base "
                                 f"linear ({end - start} outputs)")
            b_cat[start:end, col : col + a.shape[0]] = b
            col += a.shape[0]
        self.adapters[adapter_id] = (_projection(a_cat.to(device, dtype)), _projection(b_cat.to(device, dtype)))
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for adapter_id, rows in self.state.groups:
            ab = self.adapters.get(adapter_id)
            if ab is None:
                continue
            a, b = ab
            if rows is None:
                y = y.add_(b(a(x)))
            else:
                y.index_add_(0, rows, b(a(x.index_select(0, rows))))
        return y


Projection = Callable[[torch.Tensor], torch.Tensor]


def _projection(weight: torch.Tensor) -> Projection:
    """x -> x weight^T; weights prepacked once where oneDNN would otherwise re-lay them out per call."""
    if can_prepack(weight.device, weight.dtype):
        return PackedLinear(weight)
    return lambda x: F.linear(x, weight)


def wrap_lora_layers_(model: nn.Module, state: LoRAState) -> list[LoRALinear]:
    """Wrap every LoRA-targetable linear of the model's dense layers (after fusing/packing) in a
    LoRALinear; MoE expert MLPs stay as they are. Returns the wrappers."""
    wrapped: list[LoRALinear] = []
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            if name in FUSED_SLICES:
                sizes = _fused_sizes(parent, name, child)
                names = FUSED_SLICES[name]
            elif name in SUPPORTED_TARGETS and ".experts." not in path:
                sizes, names = [int(_out_features(child))], (name,)
            else:
                continue
            slices, start = [], 0
            for slice_name, size in zip(names, sizes, strict=True):
                slices.append((f"{prefix}.{slice_name}" if prefix else slice_name, start, start + size))
                start += size
            if name in FUSED_SLICES:  # an adapter of the fused module itself covers every row
                slices.append((path, 0, start))
            wrapper = LoRALinear(child, slices, state)
            setattr(parent, name, wrapper)
            wrapped.append(wrapper)
    return wrapped


def _out_features(linear: nn.Module) -> int:
    return int(linear.out_features)  # nn.Linear and PackedLinear both carry it


def _fused_sizes(parent: nn.Module, name: str, child: nn.Module) -> list[int]:
    if name == "qkv_proj":
        return list(parent._qkv_sizes)  # type: ignore[attr-defined]
    half = _out_features(child) // 2
    return [half, half]
