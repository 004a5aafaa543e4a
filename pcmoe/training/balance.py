"""The load-balancing loss pcmoe's models are trained with, computed per MoE layer.

transformers' own `aux_loss` concatenates the router logits of all layers before measuring the
balance, so a layer may starve half of its experts while another layer's choices make up for it
(measured on the default LM: the loss sat at its balanced value, 2.0 for top-2, while several
experts per layer received no tokens). Averaging a per-layer loss prevents that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style N * sum_e f_e * P_e averaged over layers, divided by k (1.0 = balanced), where
    f_e is the share of routing choices and P_e the mean router probability of expert e."""
    losses = []
    for logits in router_logits:                                                # [T, N]
        probs = torch.softmax(logits.float(), dim=-1)
        N = probs.shape[-1]
        idx = torch.topk(probs, top_k, dim=-1).indices                          # [T, k]
        share = F.one_hot(idx, N).float().sum(dim=1).mean(dim=0) / top_k       # [N]
        losses.append(N * (share * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


@torch.no_grad()
def expert_shares(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """[layers, N]: each layer's share of top-k routing choices per expert."""
    rows = []
    for logits in router_logits:                                                # [T, N]
        idx = torch.topk(logits.float(), top_k, dim=-1).indices
        rows.append(torch.bincount(idx.reshape(-1), minlength=logits.shape[-1]).double() / idx.numel())
    return torch.stack(rows)
