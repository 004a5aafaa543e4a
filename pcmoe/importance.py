"""Expert importance (paper eq. 1) and committee selection.

importance(E_i, X) = sum over the tokens x of X that the *unmasked* router sends to E_i of
                     ||x|| * |G(x)_i| * ||E_i||

Decisions (see docs/DESIGN.md): G(x)_i is the combine weight the unmasked router gives expert i
(what would multiply E_i(x)); ||x|| is the L2 norm of the MoE layer's input; ||E_i|| is the
Frobenius norm of all of the expert's weights. Pure tensor code.
"""

from __future__ import annotations

import torch


class ImportanceTracker:
    """Importance of the experts of one layer, accumulated over an update window.

    mode "window": the score used at an update is the importance summed since the last update.
    mode "ema":    score <- decay * score + (1 - decay) * window importance.
    """

    def __init__(self, expert_norms: torch.Tensor, mode: str = "window", ema_decay: float = 0.5,
                 prior: torch.Tensor | None = None):
        """prior [N]: expected shares of importance (e.g. from a routing profile). In "ema" mode a
        window closed while the score is still all zeros (nothing decided yet, nothing restored)
        updates prior x that window's total instead, so the first decisions are not those of one
        short, noisy window."""
        if mode not in ("window", "ema"):
            raise ValueError(f"importance mode must be 'window' or 'ema', not {mode!r}")
        self.expert_norms = expert_norms.double()               # [N]
        self.mode = mode
        self.ema_decay = ema_decay
        self.prior = None if prior is None else (prior.double() / prior.double().sum().clamp(min=1e-30))
        self._window = torch.zeros_like(self.expert_norms)      # [N] sum of ||x||*|G| since the update
        self.score = torch.zeros_like(self.expert_norms)        # [N] what the last update decided on
        self.total = torch.zeros_like(self.expert_norms)        # [N] importance since load (profiles)
        self._counts = torch.zeros_like(self.expert_norms)      # [N] tokens routed (unmasked)
        # Single-token steps accumulate in Python lists (no tensor op per step); folded in on read.
        n = len(self.expert_norms)
        self._host_window, self._host_counts, self._host_dirty = [0.0] * n, [0.0] * n, False

    def accumulate(self, x_norm: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> None:
        """x_norm [T], idx [T, k] (unmasked routing, -1 = none), weights [T, k]."""
        valid = idx >= 0
        contrib = (x_norm.double()[:, None] * weights.double().abs())[valid]   # [pairs]
        experts = idx[valid]
        # Out of place, so that an inference-mode tensor never meets an update outside that mode.
        self._window = self._window.index_add(0, experts, contrib)
        self._counts = self._counts.index_add(0, experts, torch.ones_like(contrib))

    def accumulate_one(self, x_norm: float, idx: list[int], weights: list[float]) -> None:
        """One token: the same as accumulate() with Python numbers."""
        for e, w in zip(idx, weights):
            if e >= 0:
                self._host_window[e] += x_norm * abs(w)
                self._host_counts[e] += 1.0
        self._host_dirty = True

    def _fold(self) -> None:
        if self._host_dirty:
            # Out of place: the tensors may have been made under inference mode, the fold may run outside it.
            self._window = self._window + torch.tensor(self._host_window, dtype=torch.float64)
            self._counts = self._counts + torch.tensor(self._host_counts, dtype=torch.float64)
            n = len(self._host_window)
            self._host_window, self._host_counts, self._host_dirty = [0.0] * n, [0.0] * n, False

    @property
    def window(self) -> torch.Tensor:
        self._fold()
        return self._window

    @window.setter
    def window(self, value: torch.Tensor) -> None:
        self._fold()
        self._window = value

    @property
    def counts(self) -> torch.Tensor:
        self._fold()
        return self._counts

    def close_window(self) -> torch.Tensor:
        """End the update window; returns the score [N] to choose the committee by."""
        window = self.window * self.expert_norms
        self.total += window
        if self.mode == "window":
            self.score = window
        else:
            if self.prior is not None and not self.score.any():  # a restored score (load_state) wins
                self.score = self.prior * window.sum()
            self.score = self.ema_decay * self.score + (1 - self.ema_decay) * window
        self.window = torch.zeros_like(self.expert_norms)
        return self.score


def plan_swaps(score: torch.Tensor, members: list[int], size: int, margin: float = 0.0) -> list[tuple[int, int]]:
    """Swaps (incoming, outgoing) that move the committee towards the `size` highest-scoring experts.

    Ties favour current members (no swap for equal scores), then lower ids. Hysteresis: the best
    remaining candidate replaces the worst remaining member only if its score exceeds the member's
    by the factor (1 + margin); an expert with zero score never comes in. Returned best gain first.
    If the committee has fewer than `size` members, extra entries have outgoing = -1.
    """
    member_set = set(members)
    score = score.tolist()  # Python floats: the same values as float(score[e]), without a tensor index each
    order = sorted(range(len(score)), key=lambda e: (-score[e], e not in member_set, e))
    target = set(order[:size])
    incoming = [e for e in order if e in target and e not in member_set]             # best first
    outgoing = [e for e in reversed(order) if e in member_set and e not in target]   # worst first
    swaps: list[tuple[int, int]] = []
    free = size - len(members)
    for e in incoming:
        if score[e] <= 0.0:
            break
        if free > 0:
            swaps.append((e, -1))
            free -= 1
            continue
        if not outgoing:
            break
        out = outgoing[0]
        if score[e] <= score[out] * (1.0 + margin):
            break
        swaps.append((e, out))
        outgoing.pop(0)
    return swaps


def top_experts(score: torch.Tensor, size: int) -> list[int]:
    """The `size` highest-scoring experts (ties: lower id first), e.g. an initial committee."""
    values = score.tolist()
    order = sorted(range(len(values)), key=lambda e: (-values[e], e))
    return sorted(order[:size])
