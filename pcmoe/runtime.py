"""The runtime: a loaded model with its committees, served one forward pass at a time.

    engine = pcmoe.load("models/pcmoe-lm", budget="50%experts")   # pcmoe.loader builds it
    logits, state = engine.prefill(ids)
    logits = engine.decode_step(state, token)
    engine.stats()                         # cumulative since load; stats(since=engine.counters())

The step boundary, where swaps are switched in and new loads issued, is entered one way: by the
MoE blocks themselves. Every CommitteeMoE calls `_enter(layer, tokens)` first; a forward pass visits
the MoE layers in increasing order, so a layer index that does not increase starts a new pass.
That holds for the lean decoder, the transformers forward (also when a user calls engine.model
directly), a seq2seq encoder + decoder pass and the vision model alike.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

from pcmoe.budget import BudgetError, ModelBytes, Sizing, format_bytes, parse_budget, size_committees
from pcmoe.formats import PROFILE_FORMAT
from pcmoe.options import LoadOptions, PcmoeError
from pcmoe.routing import GatingStats
from pcmoe.system import peak_rss_bytes, release_free_memory, rss_bytes

STATE_FORMAT = "pcmoe-state/1"
_GATING = ("choices", "hits", "exchanged", "skipped", "mass_total", "mass_outside")
# Policies whose budget can change while serving: the committee (members swapped in, amortised),
# on-demand (an LRU cache of slots) and the all-resident ones (only to a budget they still fit).
LIVE_BUDGET_POLICIES = ("committee", "on-demand", "full", "topk-reduce")


@dataclass
class Layer:
    """One MoE layer: its block in the model, committee, importance tracker and policy."""

    block: object           # moe.CommitteeMoE
    committee: object       # committee.LayerCommittee
    tracker: object         # importance.ImportanceTracker
    controller: object      # policies.LayerController


class Engine:
    """A loaded model, its committees and policy. `engine.model` is the transformers model (or the
    pcmoe vision model); `generate` is pcmoe.generation.generate bound to this engine."""

    def __init__(self, *, model, tokenizer, family, checkpoint, store, io, layers: list[Layer], scheduler,
                 model_bytes: ModelBytes, sizing: Sizing, policy: str, options: LoadOptions, expert_norms,
                 load_info: dict, fast=None):
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.family = family
        self.checkpoint = checkpoint
        self.store = store
        self.io = io                      # store.ExpertIO: slots and staging buffers
        self.layers = layers
        self.scheduler = scheduler
        self.model_bytes = model_bytes    # bytes of the weights (ModelBytes)
        self.sizing = sizing              # counts: committee sizes, slots, buffers
        self.policy = policy
        self.options = options
        self.expert_norms = expert_norms
        self.load_info = load_info
        self.fast = fast                  # the lean decoder, where the family has one
        self._new_input = None            # begin_input() / end_input(); None = every pass is an input
        self._last_layer = float("inf")   # the MoE layer the current pass last entered
        for layer in layers:
            layer.block.on_enter = self._enter
        self._budget_lock = threading.Lock()
        self._pending_sizing: Sizing | None = None   # a budget change waiting for the next step boundary
        self.budget_changes = 0                       # live budget changes applied since load
        self._closed = False

    # Per-layer views (tests, benchmarks and front ends read these).
    @property
    def blocks(self):
        return [layer.block for layer in self.layers]

    @property
    def committees(self):
        return [layer.committee for layer in self.layers]

    @property
    def trackers(self):
        return [layer.tracker for layer in self.layers]

    @property
    def controllers(self):
        return [layer.controller for layer in self.layers]

    @property
    def committee_sizes(self) -> list[int]:
        return list(self.sizing.committee_sizes)

    @property
    def slots(self) -> list[int]:
        return list(self.sizing.slots)

    @property
    def budget(self) -> int:
        return self.sizing.budget

    @property
    def context(self) -> int | None:
        """The model's context in tokens (None: no limit pcmoe knows of, e.g. seq2seq)."""
        if self.family.seq2seq:
            return None
        return getattr(self.config, "max_position_embeddings", None) or None

    # -- step boundaries -----------------------------------------------------------------------

    def begin_input(self) -> None:
        """Mark the next forward pass as the first of a new input (request, document, frame); later
        passes count as its continuation until end_input()."""
        self._new_input = True

    def end_input(self) -> None:
        """Back to counting every forward pass as an input of its own."""
        self._new_input = None

    def _enter(self, layer: int, tokens: int) -> None:
        """Called by every MoE block before it computes (never during another block)."""
        if layer <= self._last_layer:  # the first MoE layer of a new forward pass
            if self._pending_sizing is not None:
                self.apply_budget()
            if self._new_input is None:
                new_input = True
            else:
                new_input, self._new_input = self._new_input, False
            if self.scheduler is not None:
                self.scheduler.begin_step(tokens, new_input)
        self._last_layer = layer

    # -- live budget -------------------------------------------------------------------------------

    @property
    def budget_target(self) -> int:
        """The budget in bytes once a pending change is applied (the current one when none is)."""
        pending = self._pending_sizing
        return (pending or self.sizing).budget

    def plan_budget(self, budget, sizes: list[int] | None = None) -> Sizing:
        """What set_budget(budget) would keep resident; a PcmoeError (one line, nothing changed)
        when it cannot be served, e.g. below the minimum budget. `sizes`: committee sizes per layer
        (a plan's; default uniform). Safe from any thread."""
        if self.policy not in LIVE_BUDGET_POLICIES:
            raise PcmoeError(f"budget unchanged: policy {self.policy} keeps a fixed subset; live budget changes "
                             f"need one of {', '.join(LIVE_BUDGET_POLICIES)}")
        model_bytes = self.model_bytes
        if sizes is not None and (len(sizes) != len(self.layers) or any(
                isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= c.num_experts
                for n, c in zip(sizes, self.committees))):
            raise PcmoeError(f"budget unchanged: committee sizes must be {len(self.layers)} integers, each from 1 to "
                             "the layer's experts")
        try:
            value = parse_budget(budget, model_bytes)
            if value is None:
                raise BudgetError("give a budget (bytes with a unit, 50%, 50%experts)")
            # the one budget arithmetic (pcmoe.budget), as the loader asks it (uniform sizes unless given)
            if getattr(self.options, "shadow", None) and self.policy not in ("full", "topk-reduce"):
                return self._shadow_plan(value, sizes)
            return size_committees(model_bytes, value, policy=self.policy, swapped=self.policy == "committee",
                                   all_resident=self.policy in ("full", "topk-reduce"),
                                   spare_slots=self.options.spare_slots, bytes_per_step=self.sizing.bytes_per_step,
                                   staging_bytes=self.io.buffer_nbytes, plan_sizes=sizes)
        except BudgetError as e:
            raise PcmoeError(f"budget unchanged: {e}") from None

    def _shadow_plan(self, budget: int, sizes: list[int] | None) -> Sizing:
        """plan_budget for a load with shadow experts: the loader's sizing (committees and shadow
        counts in one budget, pcmoe.budget.shadow_sizing) for the new budget."""
        from pcmoe.budget import shadow_sizing
        from pcmoe.shadow import layer_forms, shadow_nbytes

        o, block = self.options, self.layers[0].block.experts
        staging, full = self.io.buffer_nbytes, _full_expert_bytes(block)
        one = [shadow_nbytes(self.family.kernel(), block.dtype, form, o.shadow_group, o.shadow_rank) if form else 0
               for form in layer_forms(o.shadow, len(self.layers))]
        return shadow_sizing(self.model_bytes, budget, one, policy=self.policy, swapped=self.policy == "committee",
                             spare_slots=o.spare_slots, bytes_per_step=self.sizing.bytes_per_step,
                             staging_bytes=staging, wait_bytes=full if o.wait_above is not None else 0,
                             shadows=o.shadow_experts, plan_sizes=sizes)

    def set_budget(self, budget, now: bool = True, sizes: list[int] | None = None) -> dict:
        """A new weight budget without a restart: shrinking frees the slots of each layer's least
        important members (the banks are reallocated smaller, so the memory returns to the OS);
        growing adds empty slots that the swap scheduler fills, amortised, with the most important
        non-members. now=True applies it at once (call it between forward passes, on the thread
        that runs them); now=False only records it, to be applied at the next step boundary or by
        apply_budget() (a server's admin thread does that). Raises PcmoeError, changing nothing,
        for a budget that cannot be served. `sizes`: committee sizes per layer (e.g. in the planner's
        order, pcmoe.server.live), default uniform. Returns what it will keep (budget_summary)."""
        sizing = self.plan_budget(budget, sizes)
        with self._budget_lock:
            self._pending_sizing = sizing
        if now:
            self.apply_budget()
        return budget_summary(sizing, self.model_bytes)

    def apply_budget(self) -> bool:
        """Apply a pending budget change now (between forward passes, on the engine's thread)."""
        with self._budget_lock:
            sizing, self._pending_sizing = self._pending_sizing, None
        if sizing is None:
            return False
        self._resize(sizing)
        return True

    def _resize(self, sizing: Sizing) -> None:
        if self.scheduler is not None:
            self.scheduler.drain()  # no load writes into a bank or buffer while they are reallocated
        fills = []
        for i, layer in enumerate(self.layers):
            committee, size = layer.committee, sizing.committee_sizes[i]
            rank = self._importance_order(i)
            members = set(committee.members())
            keep = [e for e in rank if e in members][:size]
            if sizing.slots[i] != committee.num_slots or len(keep) < len(members):
                layer.block.experts.resize(committee.resize(sizing.slots[i], keep))
            lru = getattr(layer.controller, "lru", None)
            if lru is not None:  # on-demand: forget the evicted experts' recency
                for e in [e for e in lru if not committee.is_member(e)]:
                    del lru[e]
            # on-demand fills its empty slots on misses; the committee's come from the scheduler
            fills.append([e for e in rank if not committee.is_member(e)][:size - len(keep)]
                         if self.policy == "committee" else [])
        if getattr(self.options, "shadow", None):
            for i in range(len(self.layers)):
                self._resize_shadows(i, sizing.shadow_counts[i] if sizing.shadow_counts else 0, fills[i])
        self.io.resize_buffers(sizing.swap_buffers)
        if any(fills) or (self.scheduler is None and self.policy == "committee"
                          and any(n < c.num_experts for n, c in zip(sizing.committee_sizes, self.committees))):
            if self.scheduler is None:
                self.scheduler = self._new_scheduler(sizing)
        if self.scheduler is not None:
            self.scheduler.resize(sizing.committee_sizes, sizing.swap_buffers, fills)
        self.sizing = sizing
        self.budget_changes += 1
        release_free_memory()

    def _resize_shadows(self, i: int, count: int, fills: list[int]) -> None:
        """Layer i's shadow bank remade with `count` rows, for the most important experts outside
        the (resized) committee that the scheduler will not promote (`fills`): a kept row is
        copied, a new one comes from the shadow cache or is made from the stored full-precision
        weights, as the load makes them. The old bank is dropped, so its memory returns."""
        from pcmoe.shadow import ShadowBank, layer_forms
        from pcmoe.store import read_full_precision

        chooser = getattr(self.layers[i].controller, "chooser", None)
        form = layer_forms(self.options.shadow, len(self.layers))[i]
        if chooser is None or form is None:
            return
        committee, old, o = self.layers[i].committee, chooser.shadows, self.options
        filling = set(fills)
        wanted = [e for e in self._importance_order(i) if not committee.is_member(e) and e not in filling][:count]
        if old is not None and sorted(old.experts) == sorted(wanted) and all(old.has(e) for e in wanted):
            return
        if not wanted:
            chooser.shadows, chooser._seen = None, None
            return
        block = self.layers[i].block.experts
        bank = ShadowBank(self.family.kernel(), committee.num_experts, wanted, block.dtype, form,
                          o.shadow_group, o.shadow_rank)
        buffer = None
        for e in wanted:
            state = old.row_state(e) if old is not None and old.has(e) else None
            if state is None and chooser.source is not None:
                state = chooser.source(e)
            if state is not None:
                bank.load_row(e, state)
                continue
            if buffer is None:
                from pcmoe.moe import expert_buffer

                buffer = expert_buffer(self.family.kernel(), block.dtype)
            if not read_full_precision(self.store, self.layers[i].block.layer, e, buffer):
                raise PcmoeError(f"cannot read expert {e} of {self.layers[i].block.block_name} (I/O error)")
            bank.write(e, buffer)
        if old is None:  # no shadows before: the chooser's time (and, unless measured, error) were placeholders
            if chooser.errors.get("shadow", 1.0) >= 1.0:
                chooser.errors["shadow"] = bank.weight_error()
            chooser.ms["shadow"] = bank.time_one() * 1e3
        elif old.native is not None:
            bank.use_native()
        chooser.shadows, chooser._seen = bank, None

    def _importance_order(self, layer: int) -> list[int]:
        """The layer's experts, most important first: on-demand by recency, else by the last
        update's score, then the open window's importance, then the routing profile's share (the
        load's warm start), then the expert norm (ties: lower id)."""
        ctrl, tracker = self.layers[layer].controller, self.layers[layer].tracker
        n = self.layers[layer].committee.num_experts
        lru = getattr(ctrl, "lru", None)
        if lru is not None:
            recent = list(reversed(lru))
            return recent + [e for e in range(n) if e not in lru]
        score, window, norms = tracker.score.tolist(), (tracker.window * tracker.expert_norms).tolist(), \
            tracker.expert_norms.tolist()
        prior = tracker.prior.tolist() if tracker.prior is not None else [0.0] * n  # the routing profile's shares
        return sorted(range(n), key=lambda e: (-score[e], -window[e], -prior[e], -norms[e], e))

    def _new_scheduler(self, sizing: Sizing):
        from pcmoe.scheduler import SwapScheduler

        o, io = self.options, self.io
        staging = (io.load_buffer, io.commit_buffer, 0) if o.spare_slots == 0 else None
        return SwapScheduler(self.committees, self.trackers, list(sizing.committee_sizes), self.model_bytes.expert,
                             io.load_slot, update_every=o.update_every, unit=o.update_unit,
                             bytes_per_step=sizing.bytes_per_step, margin=o.margin, synchronous=o.synchronous,
                             staging=staging)

    # -- forward ---------------------------------------------------------------------------------

    def new_state(self) -> dict:
        """An empty decoding state (KV cache) for forward()."""
        if self.fast is not None:
            return {"fast": self.fast.new_cache()}
        from transformers import DynamicCache

        from pcmoe.models.config import LeanConfig

        config = self.config
        if isinstance(config, LeanConfig):  # the transformers forward runs the lean model's twin
            config = self.model.transformers_model().config
        return {"cache": DynamicCache(config=config)}

    def forward(self, ids: torch.Tensor, state: dict, last_only: bool = False) -> torch.Tensor:
        """Feed ids [1, n] after what `state` holds; logits [n, V] ([1, V] with last_only). Uses
        the lean decoder where the family supports it, else the transformers model."""
        if "fast" in state:
            return self.fast.forward(ids, state["fast"], last_only)
        out = self.model(input_ids=ids, cache=state["cache"], use_cache=True, logits_to_keep=1 if last_only else 0)
        return out.logits[0]

    @torch.inference_mode()
    def prefill(self, ids: list[int]):
        """Next-token logits [V] after the prompt, and the decoding state (KV cache...)."""
        input_ids = torch.tensor([ids])
        if self.family.seq2seq:
            enc = self.model.get_encoder()(input_ids=input_ids)
            start = torch.tensor([[self.config.decoder_start_token_id]])
            out = self.model(encoder_outputs=enc, decoder_input_ids=start, use_cache=True)
            return out.logits[0, -1].float(), {"enc": enc, "cache": out.cache}
        state = self.new_state()
        return self.forward(input_ids, state, last_only=True)[-1].float(), state

    @torch.inference_mode()
    def decode_step(self, state: dict, token: int) -> torch.Tensor:
        """Feed one token; next-token logits [V]."""
        ids = torch.tensor([[token]])
        if self.family.seq2seq:
            out = self.model(encoder_outputs=state["enc"], decoder_input_ids=ids, cache=state["cache"],
                             use_cache=True)
            state["cache"] = out.cache
            return out.logits[0, -1].float()
        return self.forward(ids, state)[-1].float()

    # -- text at the edges -------------------------------------------------------------------------

    def generate(self, prompt, max_new_tokens: int = 64, **kwargs):
        """pcmoe.generation.generate(self, ...): one GenerationStep per token; the last carries the
        statistics of this request."""
        from pcmoe.generation import generate

        return generate(self, prompt, max_new_tokens, **kwargs)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise PcmoeError("this checkpoint has no tokenizer (no tokenizer.json beside it), so it cannot take "
                             "text; add the tokenizer files to the model folder, or call generate() with token ids")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def eos_ids(self) -> set[int]:
        eos = getattr(self.config, "eos_token_id", None)
        out = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            out.add(self.tokenizer.eos_token_id)
        return out

    # -- statistics --------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        from pcmoe.scheduler import SchedulerStats

        for c in self.controllers:
            c.stats = GatingStats()
            c.stall_s = 0.0
            if getattr(c, "chooser", None) is not None:
                c.chooser.reset()
        self.store.stats = self.store.new_stats()
        if self.scheduler is not None:
            n = len(self.layers)
            self.scheduler.stats = SchedulerStats(per_layer_swaps=[0] * n, per_layer_stall_s=[0.0] * n)

    def counters(self) -> dict:
        """The raw counters behind stats(), as a snapshot: stats(since=snapshot) reports what
        happened after it (one request, one document), exactly for every router."""
        st = self.store.stats
        sched = self.scheduler.stats if self.scheduler else None
        n = len(self.layers)
        return {
            "layers": [{**{k: getattr(c.stats, k) for k in _GATING}, **_chooser_counts(c),
                        "stall_s": c.stall_s + (c.chooser.stall_s if getattr(c, "chooser", None) else 0.0)}
                       for c in self.controllers],
            "bytes_read": list(st.per_layer_bytes), "read_s": list(st.per_layer_read_s),
            "swaps": list(sched.per_layer_swaps) if sched else [0] * n,
            "swap_stall_s": list(sched.per_layer_stall_s) if sched else [0.0] * n,
            "total": {"reads": st.reads, "read_errors": st.errors, "bytes_read": st.bytes_read, "read_s": st.read_s,
                      "swaps": sched.swaps if sched else 0, "swap_failures": sched.swap_failures if sched else 0,
                      "updates": sched.updates if sched else 0, "swap_copy_s": sched.copy_s if sched else 0.0,
                      "swap_stall_s": sched.stall_s if sched else 0.0},
        }

    def stats(self, since: dict | None = None) -> dict:
        """Hits, misses, router mass outside the committee, exchanged / skipped choices, swaps,
        bytes read, read and stall time (since load, or since the `counters()` snapshot given),
        with the resident bytes and peak RSS now; per layer and in total."""
        now = self.counters()
        d = _minus(now, since) if since is not None else now
        sizes, sizing = self.model_bytes, self.sizing
        layers, tot = [], dict.fromkeys(_GATING, 0)
        for i, (row, layer) in enumerate(zip(d["layers"], self.layers)):
            for k in _GATING:
                tot[k] += row[k]
            committee = layer.committee
            layers.append({
                "layer": i, "block": layer.block.block_name, "experts": committee.num_experts,
                "committee_size": sizing.committee_sizes[i], "slots": committee.num_slots,
                "members": sorted(committee.members()), "choices": row["choices"], "hits": row["hits"],
                "misses": row["choices"] - row["hits"], "exchanged": row["exchanged"], "skipped": row["skipped"],
                "router_mass_outside": row["mass_outside"] / row["mass_total"] if row["mass_total"] else 0.0,
                "mass_total": row["mass_total"], "mass_outside": row["mass_outside"],
                "swaps": d["swaps"][i], "bytes_read": d["bytes_read"][i], "read_s": d["read_s"][i],
                "stall_s": row["stall_s"] + d["swap_stall_s"][i],
                "resident_expert_bytes": sizes.expert[i] * sizing.slots[i],
                "precision": layer.block.experts.quant or "full",
                **_shadow_row(layer.controller, row),
            })
        t = d["total"]
        resident_expert_bytes = sum(b * s for b, s in zip(sizes.expert, sizing.slots)) + sizing.buffer_bytes \
            + sizing.shadow_bytes  # shadow experts (and the exact-load buffer of --wait-above)
        return {
            "policy": self.policy,
            # benchmarks only: "replayed routing (...)" when a trace forces the routing (pcmoe/replay.py)
            "routing": self.load_info.get("routing", "model"),
            "budget_bytes": sizing.budget,
            "nonexpert_bytes": sizes.nonexpert,
            "nonexpert_precision": self.load_info.get("nonexpert_precision", "full"),
            "resident_expert_bytes": resident_expert_bytes,  # the staging buffers of swaps are resident too
            "resident_bytes": sizes.nonexpert + resident_expert_bytes,
            "full_model_bytes": sizes.full,
            "committee_sizes": list(sizing.committee_sizes),
            "choices": tot["choices"],
            "hits": tot["hits"],
            "misses": tot["choices"] - tot["hits"],
            "hit_rate": tot["hits"] / tot["choices"] if tot["choices"] else 1.0,
            "router_mass_outside": tot["mass_outside"] / tot["mass_total"] if tot["mass_total"] else 0.0,
            "mass_total": tot["mass_total"],
            "mass_outside": tot["mass_outside"],
            "exchanged": tot["exchanged"],
            "skipped": tot["skipped"],
            "swaps": t["swaps"],
            "swap_failures": t["swap_failures"],
            "updates": t["updates"],
            "bytes_read": t["bytes_read"],
            "reads": t["reads"],
            "read_s": t["read_s"],
            "read_errors": t["read_errors"],
            "stall_s": sum(row["stall_s"] for row in d["layers"]) + t["swap_stall_s"],
            "swap_buffer_bytes": sizing.buffer_bytes,
            "shadow_bytes": sizing.shadow_bytes,
            "shadowed": sum(row["shadowed"] for row in d["layers"]),
            "waited": sum(row["waited"] for row in d["layers"]),
            "budget_target_bytes": self.budget_target,
            "budget_changes": self.budget_changes,
            "swap_copy_s": t["swap_copy_s"],
            "peak_rss_bytes": peak_rss_bytes(),
            "rss_bytes": rss_bytes(),
            "load": self.load_info,
            "per_layer": layers,
        }

    def importance_profile(self) -> dict:
        """Importance and routing counts accumulated since load (unmasked routing)."""
        return {
            "format": PROFILE_FORMAT,
            "model_type": self.config.model_type,
            "num_experts": [c.num_experts for c in self.committees],
            "importance": [t.total.add(t.window * t.expert_norms).tolist() for t in self.trackers],
            "counts": [t.counts.tolist() for t in self.trackers],
        }

    # -- per-user state ----------------------------------------------------------------------------

    def save_state(self) -> dict:
        """The committee state a user's requests built up: per-layer importance scores and members.
        JSON-serialisable; restore it with load_state() (e.g. when that user comes back)."""
        return {
            "format": STATE_FORMAT,
            "num_experts": [c.num_experts for c in self.committees],
            "score": [t.score.tolist() for t in self.trackers],
            "window": [t.window.tolist() for t in self.trackers],
            "members": [sorted(c.members()) for c in self.committees],
        }

    def load_state(self, state: dict) -> None:
        """Restore importance saved by save_state(). With the committee policy, swaps towards the
        saved members are planned at once and run amortised like any update (no stall)."""
        shape = [c.num_experts for c in self.committees]
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("num_experts") != shape:
            raise PcmoeError("committee state does not match this model")
        try:
            scores = [torch.tensor(v, dtype=torch.float64) for v in state["score"]]
            windows = [torch.tensor(v, dtype=torch.float64) for v in state["window"]]
            members = [{int(e) for e in m} for m in state["members"]]
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise PcmoeError(f"committee state is malformed ({type(e).__name__})") from None
        for values in (scores, windows, members):
            if len(values) != len(shape):
                raise PcmoeError("committee state does not match this model (layer count)")
        for n, score, window, member in zip(shape, scores, windows, members):
            if score.shape != (n,) or window.shape != (n,) or not all(0 <= e < n for e in member) \
                    or not torch.isfinite(score).all() or not torch.isfinite(window).all():
                raise PcmoeError("committee state does not match this model (expert ids or score lengths)")
        for t, score, window in zip(self.trackers, scores, windows):
            t.score, t.window = score, window
        if self.scheduler is not None:
            self.scheduler.plan_towards(members)

    # -- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.scheduler is not None:
            self.scheduler.close()
        for layer in self.layers:
            layer.block.on_enter = None
        self.checkpoint.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def budget_summary(sizing: Sizing, sizes: ModelBytes) -> dict:
    """What a sizing keeps resident, as the admin call and the CLI report it."""
    return {"budget_bytes": sizing.budget, "budget": format_bytes(sizing.budget), "weight_bytes": sizing.weight_bytes,
            "committee_sizes": list(sizing.committee_sizes), "slots": list(sizing.slots),
            "swap_buffers": sizing.swap_buffers, "experts": list(sizes.num_experts)}


def _full_expert_bytes(bank) -> int:
    """Bytes of one expert as the checkpoint stores it (full precision, whatever the bank holds)."""
    from pcmoe.moe import slot_nbytes

    return slot_nbytes(bank.kernel, bank.dtype, None)


def _chooser_counts(controller) -> dict:
    """The miss chooser's answers computed from the missing expert (shadow, exact load)."""
    chooser = getattr(controller, "chooser", None)
    counts = chooser.counts if chooser is not None else {}
    return {"shadowed": counts.get("shadow", 0), "waited": counts.get("wait", 0)}


def _shadow_row(controller, row: dict) -> dict:
    """A layer's shadow experts in stats(): their form, how many, their bytes and measured error, and answers."""
    chooser = getattr(controller, "chooser", None)
    bank = chooser.shadows if chooser is not None else None
    return {"shadow_form": bank.mode if bank is not None else None,
            "shadow_experts": len(bank.experts) if bank is not None else 0,
            "shadow_bytes": bank.nbytes if bank is not None else 0,
            "shadow_error": chooser.errors.get("shadow") if bank is not None else None,
            "shadowed": row["shadowed"], "waited": row["waited"]}


def _minus(now, before):
    """now - before, element by element, through dicts and lists of numbers."""
    if isinstance(now, dict):
        return {k: _minus(v, before[k]) for k, v in now.items()}
    if isinstance(now, list):
        return [_minus(a, b) for a, b in zip(now, before)]
    return now - before
