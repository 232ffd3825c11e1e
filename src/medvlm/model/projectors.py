"""Vision-to-language projectors, chosen by the config field ``projector_type``.

- ``linear``: one ``nn.Linear`` (LLaVA-Med v1.0, e.g. 1024 -> 4096).
- ``mlp2x_gelu``: ``nn.Sequential(Linear, GELU, Linear)`` so the state-dict keys are ``0.*`` / ``2.*``
  as in LLaVA-Med v1.5 checkpoints.
- ``cluster``: STLLaVA-Med's prototype extractor followed by an MLP; the parameter names
  (``sim_alpha``, ``sim_beta``, ``c``, ``v``, ``f``, ``ln_1``, ``mlp.0``, ``mlp.2``) match the
  published weights. It does not reduce the token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from medvlm.errors import MedvlmError
from medvlm.model.config import PROJECTOR_TYPES, MedVLMConfig


class ClusterProjector(nn.Module):
    """STLLaVA-Med's prototype ("cluster") projector: token features are refined by soft-clustered centres.

    With ``x`` of shape [B, L, D]: centres start as an adaptive average pool of ``x`` over tokens
    and are refined ``iters`` times by soft assignment to the value projection; each token then
    takes (sigmoid-scaled cosine) weight only from its most similar centre, receives that centre's
    aggregate back as a residual, and the result goes through Linear -> QuickGELU -> Linear.
    """

    def __init__(self, in_dim: int, out_dim: int, num_centers: int = 256, iters: int = 2):
        super().__init__()
        self.num_centers = num_centers
        self.iters = iters
        self.sim_alpha = nn.Parameter(torch.ones(1))
        self.sim_beta = nn.Parameter(torch.zeros(1))
        self.c = nn.Linear(in_dim, in_dim)
        self.v = nn.Linear(in_dim, in_dim)
        self.f = nn.Linear(in_dim, in_dim)
        # Present in the published checkpoints but never used in their forward; kept so weights load.
        self.ln_1 = nn.LayerNorm(in_dim)
        self.pool = nn.AdaptiveAvgPool1d(num_centers)
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), ACT2FN["quick_gelu"], nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = self.v(x).transpose(1, 2)  # [B, D, L]
        feature = self.f(x)  # [B, L, D]
        centers = self.pool(x.transpose(1, 2)).transpose(1, 2)  # [B, N, D]
        center_feat = self.pool(feature.transpose(1, 2)).transpose(1, 2)  # [B, N, D]
        value_n = F.normalize(value, dim=-1)  # [B, D, L], normalised along the token axis (as published)
        for _ in range(self.iters):
            centers = self.c(centers)  # [B, N, D]
            logits = torch.matmul(F.normalize(centers, dim=-1), value_n)  # [B, N, L]
            assign = logits.softmax(dim=1)  # [B, N, L], softmax over centres
            centers = torch.matmul(assign, feature)  # [B, N, D]
        cos = torch.matmul(F.normalize(centers, dim=-1), F.normalize(x, dim=-1).transpose(1, 2))  # [B, N, L]
        sim = torch.sigmoid(self.sim_beta + self.sim_alpha * cos)  # [B, N, L]
        # Hard assignment: each token keeps only the weight of its most similar centre.
        best = sim.argmax(dim=1, keepdim=True)  # [B, 1, L]
        mask = torch.zeros_like(sim).scatter_(1, best, 1.0)  # [B, N, L]
        sim = sim * mask  # [B, N, L]
        count = mask.sum(dim=-1, keepdim=True)  # [B, N, 1]
        agg = (torch.matmul(sim, feature) + center_feat) / (count + 1.0)  # [B, N, D]
        out = x + torch.matmul(sim.transpose(1, 2), agg)  # [B, L, D]
        return self.mlp(out)  # [B, L, H]


def build_projector(config: MedVLMConfig) -> nn.Module:
    """The projector named by ``config.projector_type`` (vision hidden -> text hidden)."""
    in_dim = config.vision_config.hidden_size
    out_dim = config.text_config.hidden_size
    kind = config.projector_type
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        if config.projector_hidden_act not in ACT2FN:
            raise MedvlmError(f"unknown projector_hidden_act {config.projector_hidden_act!r}")
        return nn.Sequential(
            nn.Linear(in_dim, out_dim), ACT2FN[config.projector_hidden_act], nn.Linear(out_dim, out_dim)
        )
    if kind == "cluster":
        return ClusterProjector(in_dim, out_dim, config.cluster_num_centers, config.cluster_iters)
    raise MedvlmError(f"unknown projector_type {kind!r}; choose one of {', '.join(PROJECTOR_TYPES)}")
