"""Predicted quality of a configuration, learned from measured samples (config -> loss).

"Loss" is any measured number where lower is better: log perplexity for the LM, 1 - accuracy for
vision. Samples come from running random configurations through the real runtime (`pcmoe profile`,
profile JSON "quality_samples": [{"config": {...}, "loss": 2.79}, ...]).

Two models, because neither is right everywhere:
- `MLPQuality`: the paper's (§6.2) two fully connected layers with ReLU, least squares; it can
  learn interactions (a layer's loss from int4 depending on its committee size) but needs samples.
- `SensitivityQuality`: loss = base + k(shadow) Σ_l d_l(missing experts) + a(shadow) · shadowed share
  + Σ_l e_l(precision) + g(F) + h(non-expert precision), with d_l a piecewise-linear curve (a knot at
  every size when N_l is small, so a table), k the share of a missing expert's loss its shadow leaves
  (1 without shadows) and a the shadow's own error, fitted by least squares. Additive, so it needs
  few samples and says which layers matter.
`fit_quality` fits both on a training split, keeps whichever has the lower held-out RMSE, refits it on
all samples and reports both held-out errors. Both predict a population at once in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pcmoe.planner.space import Batch, Config, PlanError, SearchSpace


@dataclass(frozen=True)
class Sample:
    config: Config
    loss: float          # measured, lower is better (e.g. log perplexity)


def samples_from_dicts(items: list, space: SearchSpace) -> list[Sample]:
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "config" not in item or "loss" not in item:
            raise PlanError(f"quality sample {i} must be an object with \"config\" and \"loss\"")
        try:
            loss = float(item["loss"])
        except (TypeError, ValueError):
            raise PlanError(f"quality sample {i} has a non-numeric loss {item['loss']!r}") from None
        if not np.isfinite(loss):
            raise PlanError(f"quality sample {i} has a non-finite loss {loss}")
        try:
            out.append(Sample(Config.from_dict(item["config"], space), loss))
        except PlanError as e:
            raise PlanError(f"quality sample {i}: {e}") from None
    return out


def _onehot(idx: np.ndarray, count: int) -> np.ndarray:
    """[P, count - 1]: one-hot without the first (reference) choice."""
    return (idx[..., None] == np.arange(1, count)).astype(np.float64).reshape(len(idx), -1)


def mlp_features(space: SearchSpace, batch: Batch) -> np.ndarray:
    """[P, D]: kept fraction per layer, precision one-hots per layer, non-expert precision, F, and
    (where shadows are searched) each layer's shadow form and that form times the layer's missing fraction."""
    kept = batch.sizes / np.array(space.num_experts, dtype=np.float64)                      # [P, L]
    SH = max(1, len(space.shadow_modes))
    onehot = (batch.shadow[..., None] == np.arange(1, SH)).astype(np.float64)               # [P, L, SH-1]
    shadow = onehot.reshape(len(batch), -1)                                                 # [P, L (SH-1)]
    by_layer = (onehot * (1.0 - kept)[..., None]).reshape(len(batch), -1)                  # [P, L (SH-1)]
    return np.concatenate([kept, _onehot(batch.prec, len(space.precisions)),
                           _onehot(batch.nonexpert, max(1, len(space.nonexpert_precisions))),
                           _onehot(batch.interval, len(space.intervals)), shadow, by_layer], axis=1)


def errors(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    d = np.asarray(pred, float) - np.asarray(truth, float)
    return {"mae": float(np.abs(d).mean()), "rmse": float(np.sqrt((d ** 2).mean())), "max": float(np.abs(d).max())}


def nnls(a: np.ndarray, b: np.ndarray, free: int = 0, tol: float = 1e-12, max_iter: int | None = None) -> np.ndarray:
    """argmin ||a x - b|| subject to x[free:] >= 0 (Lawson-Hanson active set); the first `free`
    columns are unconstrained. numpy only (scipy is not a dependency)."""
    m, k = a.shape
    passive = np.zeros(k, dtype=bool)
    passive[:free] = True

    def solve(mask):
        z = np.zeros(k)
        if mask.any():
            z[mask] = np.linalg.lstsq(a[:, mask], b, rcond=None)[0]
        return z

    x = solve(passive)
    for _ in range(max_iter or 3 * k):
        w = a.T @ (b - a @ x)                                   # [K] the gradient's descent direction
        w[passive] = -np.inf
        j = int(np.argmax(w))
        if w[j] <= tol * max(1.0, np.abs(a.T @ b).max()):
            break
        passive[j] = True
        for _ in range(k + 1):   # at most k coefficients can be dropped
            z = solve(passive)
            bad = passive.copy()
            bad[:free] = False
            bad &= z <= 0
            if not bad.any():
                x = z
                break
            # Step from x towards z until the first constrained coefficient reaches 0, drop those.
            step = x[bad] - z[bad]
            alpha = float(np.min(np.where(step > 0, x[bad] / np.where(step > 0, step, 1.0), 0.0)))
            x = x + alpha * (z - x)
            drop = passive.copy()
            drop[:free] = False
            drop &= x <= tol
            passive &= ~drop
            x[drop] = 0.0
    return x


class MLPQuality:
    """Linear(D, hidden) -> ReLU -> Linear(hidden, 1) on standardised features and loss."""

    name = "mlp"

    # Defaults from a small grid (hidden 16/64, weight decay 1e-3..1e-1, 1000/2000 steps, lr 1e-2/3e-3) on a
    # synthetic 6-layer loss with 100 and 400 samples: this setting had the lowest held-out error at both.
    def __init__(self, space: SearchSpace, hidden: int = 64, steps: int = 2000, lr: float = 3e-3,
                 weight_decay: float = 1e-3, seed: int = 0, full_loss: float | None = None):
        self.space, self.hidden, self.steps, self.lr, self.wd, self.seed = space, hidden, steps, lr, weight_decay, seed
        self.full_loss = full_loss   # when known: predictions are anchored to it and never below it

    def fit(self, batch: Batch, loss: np.ndarray) -> MLPQuality:
        import torch  # only fitting needs torch; prediction is numpy

        x = mlp_features(self.space, batch)
        y = np.asarray(loss, dtype=np.float64)
        self.x_mean, self.x_std = x.mean(0), np.where(x.std(0) > 0, x.std(0), 1.0)         # [D]
        self.y_mean, self.y_std = float(y.mean()), float(y.std()) or 1.0
        xt = torch.from_numpy((x - self.x_mean) / self.x_std)
        yt = torch.from_numpy((y - self.y_mean) / self.y_std)[:, None]
        with torch.random.fork_rng(devices=[]):      # seeded init without touching the caller's RNG
            torch.manual_seed(self.seed)
            net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], self.hidden), torch.nn.ReLU(),
                                      torch.nn.Linear(self.hidden, 1)).double()
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.wd)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.steps)
        for _ in range(self.steps):                  # full batch: samples are few (tens to hundreds)
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(xt), yt).backward()
            opt.step()
            sched.step()
        self.net = net
        self.w1, self.b1 = net[0].weight.detach().numpy().copy(), net[0].bias.detach().numpy().copy()
        self.w2, self.b2 = net[2].weight.detach().numpy().copy(), net[2].bias.detach().numpy().copy()
        return self

    def raw(self, batch: Batch) -> np.ndarray:
        """[P] the network's own output (numpy forward, the twin of `torch_raw`)."""
        z = (mlp_features(self.space, batch) - self.x_mean) / self.x_std                    # [P, D]
        h = np.maximum(z @ self.w1.T + self.b1, 0.0)                                          # [P, H]
        return (h @ self.w2.T + self.b2)[:, 0] * self.y_std + self.y_mean

    def torch_raw(self, batch: Batch) -> np.ndarray:
        import torch

        z = torch.from_numpy((mlp_features(self.space, batch) - self.x_mean) / self.x_std)
        with torch.no_grad():
            return self.net(z)[:, 0].numpy() * self.y_std + self.y_mean

    def __call__(self, batch: Batch) -> np.ndarray:
        """[P] predicted loss: with a known full loss, full + max(0, raw - raw(full)), so the full model
        predicts its measured loss and nothing predicts better (the network alone can, see issue 12)."""
        raw = self.raw(batch)
        if self.full_loss is None:
            return raw
        full = self.space.full().take(np.zeros(len(batch), dtype=np.int64))
        full.interval[:] = batch.interval         # F does not matter when nothing is updated
        return self.full_loss + np.maximum(raw - self.raw(full), 0.0)


class SensitivityQuality:
    """Additive per-layer loss increase over the full model, every term >= 0 and monotone:

        loss = full + k(shadow) (Σ_l d_l(missing_l) + c · s²) + a(shadow) · s + Σ_l e_l(precision_l)
               + g(F) · s + h(non-expert),      s = Σ_l missing_l / N_l

    (g of the first F is 0, its effect is in d_l; g of the others >= 0)

    d_l is piecewise linear in missing experts with non-negative slopes (a segment per missing
    expert when N_l is small), e_l adds a non-negative step per precision lost (int8 <= int4), c >= 0
    makes losses compound when many layers are short at once (super-additive on the shipped LM), the
    update-interval term vanishes when every layer is full. Fitted by non-negative least squares
    with a small ridge, so a configuration can never be predicted better than the full model, and
    all-full at full precision predicts `full` exactly (the measured loss of the full model when
    the samples hold it; otherwise a free intercept).

    k(shadow) in [0, 1] is what a shadow form leaves of the loss of the experts it stands in for
    (k(none) = 1) and a(shadow) >= 0 its own error per share of experts shadowed (a(none) = 0):
    without shadows the loss of missing experts compounds (ppl 386 with one int4 member per layer
    on the shipped LM), with them it grows about linearly (16.4 with int2 shadows of the other 15).
    The curves and a are learned from every sample, k from the samples with shadows, by alternating
    the two least-squares problems (each is linear given the other). A form without samples keeps
    k = 1 and a = 0: its shadows cost bytes and are predicted to buy nothing."""

    name = "sensitivity"

    def __init__(self, space: SearchSpace, max_knots: int = 8, ridge: float = 1e-6, full_loss: float | None = None):
        self.space, self.ridge, self.full_loss = space, ridge, full_loss
        # Knots in "missing experts" m = N - n; segment k is clip(m - t_k, 0, t_k+1 - t_k), so d_l(0) = 0.
        self.knots = [np.arange(N, dtype=np.float64) if N - 1 <= max_knots
                      else np.linspace(0, N - 1, max_knots + 1) for N in space.num_experts]
        self.keep = np.ones(max(1, len(space.shadow_modes)))      # [SH] k(shadow form), fitted

    def _terms(self, batch: Batch, keep: np.ndarray | None = None) -> np.ndarray:
        """[P, K] the non-negative-coefficient features (no intercept); each layer's missing-expert
        segments scaled by `keep` [SH] of its shadow form (default self.keep). Linear in `keep`."""
        missing = (np.array(self.space.num_experts) - batch.sizes).astype(np.float64)              # [P, L]
        scale = (self.keep if keep is None else keep)[batch.shadow]                               # [P, L]
        segments = [scale[:, [l]] * np.clip(missing[:, [l]] - t[None, :-1], 0.0, np.diff(t)[None, :])
                    for l, t in enumerate(self.knots)]
        P = len(self.space.precisions)
        # Members' precision weighs on the tokens they compute: all of a layer's without shadows (misses
        # are re-routed to members), the members' own share of experts with shadows (the rest go to shadows).
        N = np.array(self.space.num_experts)
        members = np.where(batch.shadow > 0, batch.sizes / N, 1.0)                                # [P, L]
        lost = [(batch.prec >= j) * members for j in range(1, P)]                                   # [P, L] each
        n_ne = max(1, len(self.space.nonexpert_precisions))
        ne = [(batch.nonexpert >= j).astype(np.float64)[:, None] for j in range(1, n_ne)]
        layer_share = missing / np.array(self.space.num_experts)                                  # [P, L]
        share = layer_share.sum(axis=1)                                                           # [P]
        # The first (most frequent) F is the reference, its update effect part of d_l: identifiable.
        interval = _onehot(batch.interval, len(self.space.intervals)) * share[:, None]           # [P, F-1]
        # Losses compound when many layers are short at once (measured: super-additive on the shipped LM);
        # one non-negative term in the squared total missing share keeps the model monotone; each layer's
        # part of it scaled by its form's keep (share x the keep-weighted share).
        compound = ((scale * layer_share).sum(axis=1) * share)[:, None]                           # [P, 1]
        # A shadow's own error: what each form costs per expert it stands in for (the share it shadows).
        forms = (batch.shadow[..., None] == np.arange(1, len(self.keep))).astype(np.float64)     # [P, L, SH-1]
        shadowed = (forms * layer_share[..., None]).sum(axis=1)                                   # [P, SH-1]
        return np.concatenate([*segments, *lost, *ne, interval, shadowed, compound], axis=1)

    def fit(self, batch: Batch, loss: np.ndarray, rounds: int = 8) -> SensitivityQuality:
        y = np.asarray(loss, float)
        self.keep = np.ones(max(1, len(self.space.shadow_modes)))                                  # [SH]
        self._fit_coef(batch, y)
        forms = [j for j in range(1, len(self.keep)) if (batch.shadow == j).any()]
        for _ in range(rounds if forms else 0):
            # loss = rest + sum_j k_j D_j: D_j the missing-expert loss of the layers shadowed in form j
            # (the missing-expert terms are linear in keep); one form at a time, the others held
            m = self._missing_columns
            unit = np.eye(len(self.keep))
            part = np.stack([self._terms(batch, unit[j])[:, m] @ self.coef[m] for j in range(len(self.keep))])
            rest = self.base + self._terms(batch)[:, ~m] @ self.coef[~m] + part[0]                 # [S]; k(none) = 1
            for j in forms:
                r = y - rest - sum(self.keep[i] * part[i] for i in forms if i != j)
                d = part[j]
                self.keep[j] = float(np.clip((d @ r) / (d @ d), 0.0, 1.0)) if d @ d > 0 else 1.0
            self._fit_coef(batch, y)
        return self

    def _fit_coef(self, batch: Batch, y: np.ndarray) -> None:
        x = self._terms(batch)                                                                    # [S, K]
        # the columns a shadow scales: the missing-expert segments and the compounding term (the last)
        self._missing_columns = np.zeros(x.shape[1], dtype=bool)
        self._missing_columns[:sum(len(t) - 1 for t in self.knots)] = True
        self._missing_columns[-1] = True
        free = self.full_loss is None
        if free:
            x = np.concatenate([np.ones((len(batch), 1)), x], axis=1)
        else:
            y = y - self.full_loss
        reg = np.sqrt(self.ridge * len(batch)) * np.eye(x.shape[1])[int(free):]                 # intercept unpenalised
        coef = nnls(np.concatenate([x, reg]), np.concatenate([y, np.zeros(len(reg))]), free=int(free))
        self.base = float(coef[0]) if free else float(self.full_loss)
        self.coef = coef[int(free):]                                                              # [K] all >= 0

    def __call__(self, batch: Batch) -> np.ndarray:
        return self.base + self._terms(batch) @ self.coef

    def layer_curve(self, layer: int, precision: str) -> np.ndarray:
        """[N_l] predicted loss increase of layer `layer` at sizes 1..N_l and this precision, relative to
        all experts at the most precise precision (the layer's sensitivity; F's term excluded)."""
        N = self.space.num_experts[layer]
        L = self.space.layers
        start = sum(len(t) - 1 for t in self.knots[:layer])
        t = self.knots[layer]
        missing = N - np.arange(1, N + 1, dtype=np.float64)
        curve = np.clip(missing[:, None] - t[None, :-1], 0.0, np.diff(t)[None, :]) @ self.coef[start:start + len(t) - 1]
        offsets = sum(len(k) - 1 for k in self.knots)
        p = self.space.precisions.index(precision)
        return curve + sum(self.coef[offsets + (j - 1) * L + layer] for j in range(1, p + 1))


@dataclass(frozen=True)
class QualityFit:
    model: MLPQuality | SensitivityQuality      # the chosen one, refitted on all samples
    name: str
    heldout: dict[str, dict[str, float]]         # model name -> held-out errors (loss units)
    n_train: int
    n_heldout: int

    def __call__(self, batch: Batch) -> np.ndarray:
        return self.model(batch)


def full_loss_of(space: SearchSpace, samples: list[Sample]) -> float | None:
    """The mean measured loss of the samples that are the full model (every expert resident at the
    most precise precision; F does not matter then), or None when no sample is."""
    full = [s.loss for s in samples if tuple(s.config.sizes) == tuple(space.num_experts)
            and all(p == space.precisions[0] for p in s.config.precisions)
            and (not space.nonexpert_precisions or s.config.nonexpert_precision == space.nonexpert_precisions[0])]
    return float(np.mean(full)) if full else None


def split(n: int, heldout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of n samples: (train indices, held-out indices), at least one each."""
    order = np.random.default_rng(seed).permutation(n)
    k = min(n - 1, max(1, round(n * heldout)))
    return np.sort(order[k:]), np.sort(order[:k])


def fit_quality(space: SearchSpace, samples: list[Sample], heldout: float = 0.25, seed: int = 0,
                candidates: tuple[str, ...] = ("sensitivity", "mlp")) -> QualityFit:
    if len(samples) < 4:
        raise PlanError(f"fitting quality needs at least 4 samples, got {len(samples)}")
    makers = {"sensitivity": lambda full: SensitivityQuality(space, full_loss=full),
              "mlp": lambda full: MLPQuality(space, seed=seed, full_loss=full)}
    unknown = [c for c in candidates if c not in makers]
    if unknown or not candidates:
        raise PlanError(f"unknown quality model(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(makers)}")
    batch = space.encode([s.config for s in samples])
    loss = np.array([s.loss for s in samples])
    train, test = split(len(samples), heldout, seed)
    train_full = full_loss_of(space, [samples[i] for i in train])   # held-out scores see no held-out sample
    scores = {name: errors(makers[name](train_full).fit(batch.take(train), loss[train])(batch.take(test)), loss[test])
              for name in candidates}
    best = min(candidates, key=lambda name: (scores[name]["rmse"], name))
    return QualityFit(model=makers[best](full_loss_of(space, samples)).fit(batch, loss), name=best, heldout=scores,
                      n_train=len(train), n_heldout=len(test))
