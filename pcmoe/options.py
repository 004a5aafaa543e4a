"""What load() accepts, and the names of policies and strategies (torch-free, for fast CLIs)."""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("full", "committee", "random-keep", "magnitude-keep", "static-frequency", "on-demand", "topk-reduce")
STRATEGIES = ("exchange", "skip", "hybrid")
UPDATE_UNITS = ("tokens", "inputs")


class PcmoeError(Exception):
    """Any user-facing error of load(); the CLI prints it as one line."""


@dataclass
class LoadOptions:
    """Everything load() accepts besides the checkpoint, budget, policy and plan."""

    dtype: str = "auto"            # compute/storage dtype of weights: auto (as on disk), float32, bfloat16
    quantize: str | None = None    # experts held as int8 / int4 (weight-only), quantised on load
    strategy: str = "exchange"     # exchange | skip | hybrid (paper §5)
    renorm: bool = True            # exchange weights renormalised over members (A) or original (B)
    tau: float = 0.05              # hybrid: skip a substitute whose gate is below tau
    update_every: int = 16         # committee update period F ...
    update_unit: str = "tokens"    # ... counted in tokens or inputs (requests / documents)
    bytes_per_step: int | None = None  # swap I/O allowance per forward step (default: 2 experts)
    importance: str = "ema"        # window | ema (measured better: docs/results/committee_knobs.md)
    ema_decay: float = 0.95
    margin: float = 0.1            # hysteresis: a newcomer must beat a member by this factor
    spare_slots: int = 0           # extra slots per layer that swaps load into; 0 = swap in place
    io_bandwidth: float | str | None = None  # MB/s (or emmc / ufs / nvme) storage emulation
    synchronous: bool = False      # load swaps inline (tests); same outputs as async
    seed: int = 0                  # random-keep
    profile: str | None = None     # routing profile: warm start / static-frequency; None = <model>/profile.json
                                   # if there is one, "none" = no profile
    topk: int | None = None        # topk-reduce: experts kept per token
    threads: int | None = None
    track_importance: bool | None = None  # accumulate importance; default: committee policy only
    fast: bool = True              # lean decoder forward where supported (pcmoe/fast.py)
    evict: bool = True             # drop read ranges from the page cache
    cache_dir: str | None = None   # where expert norms are cached
    progress: bool = True
