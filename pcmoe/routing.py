"""Routing rules of the supported MoE families, and masked gating on top of them.

Pure tensor functions: logits and a committee mask in, a `Route` out; no model objects.

Dimension legend:  T tokens, N experts in the layer, k experts per token.

Every rule takes `mask` ([N] bool, True = the expert may be chosen, i.e. is in the committee) or
None for the unmasked routing, and returns a Route whose `idx` is -1 (with weight 0) where fewer than
k members could be chosen. With `mask=None` each rule reproduces the transformers router exactly.

`renorm` selects the masked-gating arithmetic where it matters (paper.md §2.2): True (option A)
applies the model's rule to the masked logits, so a softmax is renormalised over the members;
False (option B) keeps each member's probability from the full softmax. The two coincide for
routers that renormalise over the chosen k (Mixtral, Qwen with norm_topk_prob, gpt-oss, DeepSeek).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pcmoe.options import STRATEGIES

NEG_INF = float("-inf")


@dataclass
class Route:
    idx: torch.Tensor      # [T, k] long, global expert ids, -1 = no expert
    weights: torch.Tensor  # [T, k] combine weights, 0 where idx == -1
    gates: torch.Tensor    # [T, N] the unmasked per-expert gate value G(x) (softmax prob / sigmoid score)


def _drop_non_members(idx: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None):
    if mask is None:
        return idx, weights
    ok = mask[idx]                                                    # [T, k]
    return idx.masked_fill(~ok, -1), weights.masked_fill(~ok, 0.0)


def softmax_topk(logits, k: int, norm_topk: bool, mask=None, renorm: bool = True, out_dtype=None) -> Route:
    """Mixtral, Qwen2/3-MoE, OLMoE: softmax over experts, top-k, optional renormalisation."""
    probs_full = torch.softmax(logits.float(), dim=-1)                # [T, N]
    if mask is None:
        probs = probs_full
    elif renorm:
        probs = torch.softmax(logits.float().masked_fill(~mask, NEG_INF), dim=-1)
    else:
        probs = probs_full.masked_fill(~mask, 0.0)
    top, idx = torch.topk(probs, k, dim=-1)                           # [T, k]
    idx, top = _drop_non_members(idx, top, mask)
    if norm_topk:
        top = top / top.sum(dim=-1, keepdim=True)
    return Route(idx, top if out_dtype is None else top.to(out_dtype), probs_full)


def sigmoid_group_topk(logits, bias, k: int, n_group: int, topk_group: int, norm_topk: bool,
                       scale: float, mask=None) -> Route:
    """DeepSeek-V3: sigmoid scores, a selection bias, group-limited top-k; weights are the
    un-biased scores. Non-members are masked before group selection: a group is scored by the sum
    of its best two *members* and a group without members is never chosen."""
    T, N = logits.shape
    scores = logits.float().sigmoid()                                 # [T, N]
    choice = scores + bias                                            # [T, N]
    if mask is not None:
        choice = choice.masked_fill(~mask, NEG_INF)
    per_group = choice.view(T, n_group, N // n_group)                 # [T, G, N/G]
    top2 = per_group.topk(2, dim=-1).values                           # [T, G, 2]
    if mask is None:
        group_scores = top2.sum(dim=-1)                               # [T, G]
    else:
        group_scores = top2.masked_fill(torch.isinf(top2), 0.0).sum(dim=-1)
        has_member = mask.view(n_group, -1).any(dim=-1)               # [G]
        group_scores = group_scores.masked_fill(~has_member, NEG_INF)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()
    expert_mask = group_mask.unsqueeze(-1).expand(T, n_group, N // n_group).reshape(T, N)
    choice = choice.masked_fill(~expert_mask, NEG_INF)
    idx = torch.topk(choice, k=k, dim=-1, sorted=False)[1]            # [T, k]
    weights = scores.gather(1, idx)
    valid = ~torch.isinf(choice.gather(1, idx))
    idx, weights = idx.masked_fill(~valid, -1), weights.masked_fill(~valid, 0.0)
    if norm_topk:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return Route(idx, weights * scale, scores)


def topk_softmax(logits, k: int, mask=None) -> Route:
    """gpt-oss: top-k on the raw logits, then a softmax over the k chosen logits."""
    masked = logits if mask is None else logits.masked_fill(~mask, NEG_INF)
    top, idx = torch.topk(masked, k, dim=-1)                          # [T, k]
    weights = torch.softmax(top, dim=1, dtype=top.dtype)
    idx, weights = _drop_non_members(idx, weights, mask)
    return Route(idx, weights, torch.softmax(logits.float(), dim=-1))


def sparsemixer_top2(logits, jitter_eps: float, mask=None) -> Route:
    """PhiMoE inference routing (sparsemixer, eval mode): the best expert weighted by a softmax over
    the experts within a relative margin of it, then the same for the second best."""
    scores = logits if mask is None else logits.masked_fill(~mask, NEG_INF)
    threshold, first = scores.max(dim=-1, keepdim=True)               # [T, 1]
    factor = scores.abs().clamp(min=threshold)
    far = ((threshold - scores) / factor) > (2 * jitter_eps)
    w1 = torch.softmax(scores.masked_fill(far, NEG_INF), dim=-1).gather(-1, first)
    without_first = torch.scatter(scores, -1, first, NEG_INF)
    threshold2, second = without_first.max(dim=-1, keepdim=True)
    factor2 = scores.abs().clamp(min=threshold2)
    far2 = ((threshold2 - scores) / factor2) > (2 * jitter_eps)
    w2 = torch.softmax(without_first.masked_fill(far2, NEG_INF), dim=-1).gather(-1, second)
    has_second = ~torch.isinf(threshold2)                             # [T, 1] false with one member
    second = second.masked_fill(~has_second, -1)
    w2 = torch.where(has_second, w2, torch.zeros_like(w2))
    idx = torch.cat([first, second], dim=-1)
    return Route(idx, torch.cat([w1, w2], dim=-1), torch.softmax(logits.float(), dim=-1))


def switch_top1(logits, batch_shape: tuple[int, int], capacity: int, mask=None, renorm: bool = True,
                out_dtype=None) -> Route:
    """Switch Transformers: top-1 of a float32 softmax, weight = that probability, and at most
    `capacity` tokens per expert per sequence (later tokens get no expert output)."""
    probs_full = torch.softmax(logits.float(), dim=-1)                # [T, N]
    if mask is None:
        probs = probs_full
    elif renorm:
        probs = torch.softmax(logits.float().masked_fill(~mask, NEG_INF), dim=-1)
    else:
        probs = probs_full.masked_fill(~mask, 0.0)
    if out_dtype is not None:
        probs = probs.to(out_dtype)
    weight, idx = probs.max(dim=-1)                                   # [T]
    B, S = batch_shape
    one_hot = F.one_hot(idx, probs.shape[-1]).view(B, S, -1)          # [B, S, N]
    within = (one_hot.cumsum(dim=1) <= capacity) | (one_hot == 0)
    kept = within.all(dim=-1).view(-1)                                # [T]
    idx = idx.masked_fill(~kept, -1)
    weight = weight.masked_fill(~kept, 0.0)
    return Route(idx[:, None], weight[:, None], probs_full)


# ----------------------------------------------------------------------------------------------
# Request-handling strategies (paper.md §5): what a token gets when its expert is not resident.



@dataclass
class GatingStats:
    choices: int = 0          # (token, expert) pairs the unmasked router made
    hits: int = 0             # ... of which the expert was resident
    exchanged: int = 0        # pairs served by a substitute committee member
    skipped: int = 0          # pairs that got no expert output
    mass_total: float = 0.0   # sum of the unmasked combine weights
    mass_outside: float = 0.0  # ... that fell on absent experts

    def add(self, other: GatingStats) -> None:
        # field by field, not a getattr/setattr loop: called once per layer and token while decoding
        self.choices += other.choices
        self.hits += other.hits
        self.exchanged += other.exchanged
        self.skipped += other.skipped
        self.mass_total += other.mass_total
        self.mass_outside += other.mass_outside


def _contained(idx: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """[T, k] bool: whether idx[t, j] appears in among[t, :]."""
    return (idx[:, :, None] == among[:, None, :]).any(dim=-1)


def route_stats(full: Route, mask: torch.Tensor | None) -> tuple[GatingStats, torch.Tensor | None]:
    """Hits, misses and router mass outside the committee for the unmasked route (one host
    conversion for all counters). Returns the stats and the [T, k] miss mask (None if no mask)."""
    valid = full.idx >= 0
    w = full.weights.float()
    if mask is None:
        choices, total = torch.stack([valid.sum().float(), w.sum()]).tolist()
        return GatingStats(choices=int(choices), hits=int(choices), mass_total=total), None
    miss = valid & ~mask[full.idx]                                    # [T, k]  (idx -1 is valid here)
    choices, n_miss, total, outside = torch.stack([valid.sum().float(), miss.sum().float(), w.sum(),
                                                   (w * miss).sum()]).tolist()
    return GatingStats(choices=int(choices), hits=int(choices - n_miss), mass_total=total,
                       mass_outside=outside), miss


def gate(select, logits: torch.Tensor, mask: torch.Tensor, strategy: str, tau: float = 0.0):
    """Route tokens under a committee.

    select(logits, mask) -> Route is the family's bound rule (BoundRouter.route, batch shape bound).
    Returns (executed route, unmasked route, GatingStats)."""
    full = select(logits, None)
    stats, miss = route_stats(full, mask)
    n_miss = stats.choices - stats.hits
    if n_miss == 0 and strategy != "exchange":
        return full, full, stats  # nothing absent: skip and hybrid execute the unmasked route
    if strategy == "skip":
        exe = Route(full.idx.masked_fill(miss, -1), full.weights.masked_fill(miss, 0.0), full.gates)
        stats.skipped = n_miss
        return exe, full, stats
    exe = select(logits, mask)
    if n_miss == 0:
        return exe, full, stats  # same experts (option A may still rescale their weights)
    substitute = (exe.idx >= 0) & ~_contained(exe.idx, full.idx)      # [T, k] members not chosen unmasked
    if strategy == "hybrid":
        # A substitute whose unmasked gate is below tau is skipped. A token left with no strong
        # substitute is served exactly as `skip` serves it (its members keep their original weights).
        low = substitute & (full.gates.gather(1, exe.idx.clamp(min=0)) < tau)          # [T, k]
        as_skip = (miss.any(dim=1) & ~(substitute & ~low).any(dim=1))[:, None]         # [T, 1]
        idx = torch.where(as_skip, full.idx.masked_fill(miss, -1), exe.idx.masked_fill(low, -1))
        weights = torch.where(as_skip, full.weights.masked_fill(miss, 0.0), exe.weights.masked_fill(low, 0.0))
        exe = Route(idx, weights, exe.gates)
        substitute = substitute & ~low & ~as_skip
    elif strategy != "exchange":
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    # Substitutes can outnumber misses (group-limited routers may move every choice of a token), so
    # skipped counts the choices a token lost, not misses minus substitutes.
    stats.exchanged = int(substitute.sum())
    stats.skipped = int(((full.idx >= 0).sum(dim=1) - (exe.idx >= 0).sum(dim=1)).clamp(min=0).sum())
    return exe, full, stats


# ----------------------------------------------------------------------------------------------
# One token in Python numbers: batch-1 decoding routes a handful of experts, where a dozen tensor
# ops per layer cost more than the arithmetic. Same rules as softmax_topk + gate above (tested
# against them); used by the families whose BoundRouter has a route_one.


def _exps(values: list[float]) -> tuple[float, list[float] | None]:
    """(max, exp(v - max) per value); None when every value is -inf."""
    top = max(values)
    if top == NEG_INF:
        return top, None
    return top, [math.exp(v - top) if v != NEG_INF else 0.0 for v in values]


def _normalised(exps: list[float] | None, n: int) -> list[float]:
    if exps is None:
        return [0.0] * n
    total = sum(exps)
    return [e / total for e in exps]


def _softmax(values: list[float]) -> list[float]:
    return _normalised(_exps(values)[1], len(values))


def softmax_topk_one(logits: list[float], k: int, norm_topk: bool, member: list[bool] | None = None,
                     renorm: bool = True) -> tuple[list[int], list[float], list[float]]:
    """softmax_topk for one token: (idx [k], weights [k], unmasked probabilities [N])."""
    top_logit, exps = _exps(logits)
    probs_full = _normalised(exps, len(logits))
    if member is None:
        probs = probs_full
    elif renorm:
        masked = [v if m else NEG_INF for v, m in zip(logits, member)]
        if exps is not None and max(masked) == top_logit:  # same max: the members' exponentials are these
            probs = _normalised([e if m else 0.0 for e, m in zip(exps, member)], len(masked))
        else:
            probs = _softmax(masked)
    else:
        probs = [p if m else 0.0 for p, m in zip(probs_full, member)]
    # highest first, ties to the lower id (a stable sort of ascending ids): the key (-p, e) without a lambda
    order = sorted(range(len(probs)), key=probs.__getitem__, reverse=True)[:k]
    idx = [e if member is None or member[e] else -1 for e in order]
    top = [probs[e] if i >= 0 else 0.0 for e, i in zip(order, idx)]
    if norm_topk:
        total = sum(top)
        top = [t / total for t in top] if total > 0 else top
    return idx, top, probs_full


def gate_one(logits: list[float], route_one, member: list[bool], strategy: str,
             tau: float = 0.0) -> tuple[list[int], list[float], list[int], list[float], GatingStats]:
    """gate() for one token: (executed idx, weights, unmasked idx, weights, stats).
    route_one(values, member) -> (idx, weights, probs) is the family's rule for one token."""
    f_idx, f_w, probs = route_one(logits, None)
    miss = [e >= 0 and not member[e] for e in f_idx]
    stats = GatingStats(choices=sum(e >= 0 for e in f_idx), mass_total=sum(f_w),
                        mass_outside=sum(w for w, m in zip(f_w, miss) if m))
    n_miss = sum(miss)
    stats.hits = stats.choices - n_miss
    if n_miss == 0 and strategy != "exchange":
        return f_idx, f_w, f_idx, f_w, stats

    def skip_route():  # built only where a route drops its misses
        return [-1 if m else e for e, m in zip(f_idx, miss)], [0.0 if m else w for w, m in zip(f_w, miss)]

    if strategy == "skip":
        stats.skipped = n_miss
        return *skip_route(), f_idx, f_w, stats
    if strategy not in ("exchange", "hybrid"):
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    e_idx, e_w, _ = route_one(logits, member)
    if n_miss == 0:
        return e_idx, e_w, f_idx, f_w, stats
    chosen = set(f_idx)
    substitute = [e >= 0 and e not in chosen for e in e_idx]
    if strategy == "hybrid":
        low = [s and probs[e] < tau for s, e in zip(substitute, e_idx)]
        if not any(s and not lo for s, lo in zip(substitute, low)):     # no strong substitute: as skip
            e_idx, e_w = skip_route()
            substitute = [False] * len(e_idx)
        else:
            e_idx = [-1 if lo else e for e, lo in zip(e_idx, low)]
            e_w = [0.0 if lo else w for w, lo in zip(e_w, low)]
            substitute = [s and not lo for s, lo in zip(substitute, low)]
    stats.exchanged = sum(substitute)
    stats.skipped = max(0, sum(e >= 0 for e in f_idx) - sum(e >= 0 for e in e_idx))
    return e_idx, e_w, f_idx, f_w, stats
