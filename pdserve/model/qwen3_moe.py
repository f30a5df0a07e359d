"""Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3 with a top-k softmax-routed expert MLP on sparse layers.

Checkpoint names as in HF: `mlp.gate` (the router) and `mlp.experts.E.{gate,up,down}_proj`. Which layers
are sparse follows `ModelConfig.is_sparse_layer` (decoder_sparse_step, mlp_only_layers).
"""

from __future__ import annotations

import torch
from torch import nn

from pdserve.config import ModelConfig
from pdserve.model.decoder import DecoderForCausalLM, GatedMLP


class Qwen3MoeSparseMoeBlock(nn.Module):
    """Router + experts. Each token goes to its top-k experts; outputs are weighted and summed."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            GatedMLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # [T, E]
        weights, experts = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)

        # Group the (token, slot) pairs by expert; only experts that received tokens run.
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = torch.div(order, self.top_k, rounding_mode="floor")
        sorted_weights = weights.flatten().index_select(0, order).unsqueeze(-1)
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = tokens[start : start + n]
            y = self.experts[e](x.index_select(0, idx))
            out.index_add_(0, idx, y * sorted_weights[start : start + n])
            start += n
        return out


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    """Qwen3-MoE causal LM; same interface as DecoderForCausalLM."""

    @staticmethod
    def make_mlp(config: ModelConfig, layer_idx: int) -> nn.Module:
        if config.is_sparse_layer(layer_idx):
            return Qwen3MoeSparseMoeBlock(config)
        return GatedMLP(config.hidden_size, config.intermediate_size)
