"""Which LoRA adapters are loaded, and which rows of each step use which (vLLM's multi-LoRA).

Up to `max_loras` adapters live on the device at once, each under its own id; a request names one
(`LoRARequest`, or the server's `model` field) and only its rows get that adapter's delta
(model/lora.py). Loading past the limit evicts the least recently used adapter that no unfinished
request uses. The KV a request computes depends on its adapter, so the prefix cache keys blocks
by adapter too (prefix_cache.py): two adapters never share cached KV.

Reading an adapter (disk) may run anywhere; installing and removing it run on the engine thread.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from pdserve.config import LoRAConfig
from pdserve.engine.lora_request import LoRARequest
from pdserve.engine.request import Request
from pdserve.engine.staging import to_device
from pdserve.model.lora import AdapterWeights, LoRALinear, LoRAState, read_adapter, wrap_lora_layers_


class LoRAManager:
    def __init__(self, model: nn.Module, config: LoRAConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.state = LoRAState()
        self.layers: list[LoRALinear] = wrap_lora_layers_(model, self.state)
        self._covered = {path for layer in self.layers for path, _, _ in layer.slices}
        self.loaded: OrderedDict[int, LoRARequest] = OrderedDict()  # by id, least recently used first

    def read(self, name: str, path: str) -> AdapterWeights:
        """An adapter's weights from disk, checked against this model (ValueError). Touches no
        mutable state: may run off the engine thread."""
        weights = read_adapter(path, name, self.config.max_lora_rank)
        missing = sorted(set(weights.modules) - self._covered)
        if missing:
            raise ValueError(f"adapter {name!r} targets modules this model cannot adapt: "
                             f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        return weights

    def install(self, lora: LoRARequest, weights: AdapterWeights, in_use: set[int]) -> None:
        """Put an adapter on the device (engine thread); ValueError when max_loras are loaded and in use."""
        if lora.lora_int_id in self.loaded:
            self.remove(lora.lora_int_id)
        if len(self.loaded) >= self.config.max_loras:
            idle = next((i for i in self.loaded if i not in in_use), None)
            if idle is None:
                raise ValueError(f"{self.config.max_loras} LoRA adapters (--max-loras) are loaded and in use")
            self.remove(idle)
        for layer in self.layers:
            layer.install(lora.lora_int_id, weights, self.dtype, self.device)
        self.loaded[lora.lora_int_id] = lora

    def remove(self, lora_int_id: int) -> None:
        for layer in self.layers:
            layer.adapters.pop(lora_int_id, None)
        self.loaded.pop(lora_int_id, None)

    def ensure(self, lora: LoRARequest, in_use: set[int]) -> None:
        """Load `lora` unless an adapter of that id is loaded (the offline API's on-demand load)."""
        if lora.lora_int_id in self.loaded:
            self.loaded.move_to_end(lora.lora_int_id)
            return
        self.install(lora, self.read(lora.lora_name, lora.lora_path), in_use)

    def by_name(self, name: str) -> LoRARequest | None:
        return next((lo for lo in self.loaded.values() if lo.lora_name == name), None)

    def prepare(self, rows: list[tuple[Request, int, int]]) -> bool:
        """Set the step's groups from (request, first row, end row) in flat-batch order; True when
        any row uses an adapter."""
        by_id: dict[int, list[int]] = {}
        for req, start, end in rows:
            if req.lora is not None:
                by_id.setdefault(req.lora.lora_int_id, []).extend(range(start, end))
        total = rows[-1][2] if rows else 0
        self.state.groups = [
            (i, None if len(r) == total else to_device(r, torch.long, self.device)) for i, r in by_id.items()
        ]
        for i in by_id:
            if i in self.loaded:
                self.loaded.move_to_end(i)
        return bool(by_id)
