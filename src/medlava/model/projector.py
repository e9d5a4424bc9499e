"""The multimodal projector: maps vision features into the decoder's embedding space."""

from __future__ import annotations

import re

import torch
from torch import nn

from medlava.model.vision import activation


class Projector(nn.Module):
    """`linear` (one layer) or LLaVA's `mlpNx_gelu` (N linear layers with GELU between)."""

    def __init__(self, projector_type: str, in_dim: int, out_dim: int, bias: bool = True, act: str = "gelu"):
        super().__init__()
        if projector_type == "linear":
            depth = 1
        elif m := re.fullmatch(r"mlp(\d+)x_gelu", projector_type):
            depth = int(m.group(1))
        else:
            raise ValueError(f"unsupported projector type {projector_type!r}; use 'linear' or 'mlp2x_gelu'")
        self.projector_type = projector_type
        dims = [in_dim] + [out_dim] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(dims, dims[1:], strict=False))
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x if i == 0 else self.act(x))
        return x
