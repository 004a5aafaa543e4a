"""Load a Hugging Face MoE checkpoint under a memory budget and serve it.

    engine = pcmoe.load("models/pcmoe-lm", budget="50%experts", policy="committee")
    for step in engine.generate("def fibonacci(", max_new_tokens=32):
        print(step.text, end="")
    print(engine.stats())

Loading never materialises a non-resident expert: the transformers model is built with its
parameters on the meta device, non-expert tensors are read from the safetensors files, each MoE
block is replaced by a CommitteeMoE with a slot bank sized by the budget, and the initial members
are read into their slots expert by expert.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pcmoe.budget import (
    BudgetError,
    ModelBytes,
    check_plan,
    format_bytes,
    minimum_budget,
    parse_budget,
    read_plan,
    slots_for,
    uniform_sizes,
)
from pcmoe.checkpoint import Checkpoint, CheckpointError, read_config_dict
from pcmoe.committee import LayerCommittee
from pcmoe.importance import ImportanceTracker, top_experts
from pcmoe.models import FAMILIES
from pcmoe.moe import CommitteeMoE, SlotExperts, expert_buffer, slot_nbytes
from pcmoe.options import POLICIES, STRATEGIES, LoadOptions, PcmoeError
from pcmoe.policies import (
    ALL_RESIDENT_POLICIES,
    DYNAMIC_POLICIES,
    MaskedGatingController,
    OnDemandController,
    TopkReduceController,
)
from pcmoe.scheduler import SwapScheduler
from pcmoe.store import STORAGE_PROFILES, ExpertStore
from pcmoe.system import atomic_write_text, peak_rss_bytes, rss_bytes

PROFILE_FORMAT = "pcmoe-profile/1"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class GenerationStep:
    token_id: int
    text: str                      # the newly decodable text (may be "")
    index: int                     # 0-based position among generated tokens
    finish_reason: str | None = None   # None, "length", "stop" or "eos"
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stats: dict = field(default_factory=dict)  # engine.stats(), on the last step only


# ------------------------------------------------------------------------------------------------
# Building the model without its experts


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters are created on the meta device (no memory); buffers stay real, so computed
    non-persistent buffers such as rotary frequencies keep their values."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _load_config(folder: Path, config_dict: dict):
    from transformers import AutoConfig

    model_type = config_dict.get("model_type")
    if model_type in FAMILIES:
        try:
            return AutoConfig.from_pretrained(folder)
        except Exception as e:  # a malformed config.json
            raise CheckpointError(f"cannot read {folder}/config.json: {e}") from None
    if model_type == "pcmoe_vit_moe":
        from pcmoe.models.vit_moe import VitMoeConfig

        return VitMoeConfig.from_dict(config_dict)
    moe_keys = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
    supported = ", ".join(sorted(FAMILIES) + ["pcmoe_vit_moe"])
    if any(k in config_dict for k in moe_keys):
        raise CheckpointError(f"model_type {model_type!r} is a MoE family pcmoe does not support yet "
                              f"(supported: {supported})")
    raise CheckpointError(f"{folder} holds a dense model (model_type {model_type!r}, no MoE layers); "
                          f"pcmoe serves MoE checkpoints ({supported})")


def _family_of(config):
    if config.model_type == "pcmoe_vit_moe":
        from pcmoe.models.vit_moe import VitMoeFamily

        return VitMoeFamily(config)
    return FAMILIES[config.model_type](config)


def _build_skeleton(config, family, dtype):
    if config.model_type == "pcmoe_vit_moe":
        from pcmoe.models.vit_moe import VitMoeForImageClassification

        with _parameters_on_meta():
            model = VitMoeForImageClassification(config)
        return model.to(dtype)
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if family.seq2seq else AutoModelForCausalLM
    with _parameters_on_meta():
        model = auto.from_config(config, dtype=dtype)
    return model


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    parent_name, _, name = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if name in parent._parameters:
        parent._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        parent._buffers[name] = value


def _progress(iterable, desc: str, enabled: bool, total: int | None = None, unit: str = "expert"):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, unit=unit, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------


class Engine:
    """A loaded model, its committees and policy. `engine.model` is the transformers model."""

    def __init__(self, *, model, tokenizer, family, ckpt, store, blocks, committees, trackers, controllers,
                 scheduler, sizes, committee_sizes, slots, budget, policy, options, expert_norms, load_info,
                 fast=None):
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self.config = model.config
        self.checkpoint = ckpt
        self.store = store
        self.blocks = blocks
        self.committees = committees
        self.trackers = trackers
        self.controllers = controllers
        self.scheduler = scheduler
        self.sizes = sizes
        self.committee_sizes = committee_sizes
        self.slots = slots
        self.budget = budget
        self.policy = policy
        self.options = options
        self.expert_norms = expert_norms
        self.load_info = load_info
        self._new_input = None     # set by begin_input(); None = detect from the KV cache
        self._t_start = time.perf_counter()
        self.fast = fast
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self._closed = False

    # -- step boundaries -----------------------------------------------------------------------

    def begin_input(self) -> None:
        """Mark the next forward as the first of a new input (request, document, frame); later
        forwards count as its continuation until end_input()."""
        self._new_input = True

    def end_input(self) -> None:
        """Back to detecting new inputs from the KV cache (a forward without one starts an input)."""
        self._new_input = None

    def _before_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("pixel_values", kwargs.get("inputs_embeds"))
        tokens = int(ids.shape[0] * ids.shape[1]) if ids is not None and ids.dim() >= 2 else 1
        dec = kwargs.get("decoder_input_ids")
        if dec is not None:
            tokens += int(dec.numel())
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self._step_boundary(tokens, cache is None or cache.get_seq_length() == 0)
        return None

    def _step_boundary(self, tokens: int, starts_sequence: bool) -> None:
        """Between two forward passes: the scheduler may switch swaps in and issue new loads."""
        if self._new_input is not None:  # managed by begin_input()/end_input()
            new_input, self._new_input = self._new_input, False
        else:
            new_input = starts_sequence
        if self.scheduler is not None:
            self.scheduler.begin_step(tokens, new_input)

    def new_state(self) -> dict:
        """An empty decoding state (KV cache) for forward()."""
        if self.fast is not None:
            return {"fast": self.fast.new_cache()}
        from transformers import DynamicCache

        return {"cache": DynamicCache(config=self.config)}

    def forward(self, ids: torch.Tensor, state: dict, last_only: bool = False) -> torch.Tensor:
        """Feed ids [1, n] after what `state` holds; logits [n, V] ([1, V] with last_only). Uses
        the lean decoder where the family supports it, else the transformers model."""
        if "fast" in state:
            cache = state["fast"]
            self._step_boundary(ids.shape[1], cache.length == 0)
            return self.fast.forward(ids, cache, last_only)
        out = self.model(input_ids=ids, cache=state["cache"], use_cache=True, logits_to_keep=1 if last_only else 0)
        return out.logits[0]

    # -- generation ----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise PcmoeError("this checkpoint has no tokenizer; pass token ids instead of text")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def generate(self, prompt: str | list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                 stop_on_eos: bool = True, stop_token_ids: list[int] | None = None) -> Iterator[GenerationStep]:
        """Yield one GenerationStep per generated token; the last one carries engine.stats().

        Text that could be the start of a stop string is held back until it is known not to be,
        so a stop string split across tokens is never streamed in part."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise PcmoeError("the prompt is empty")
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit and len(ids) + max_new_tokens > limit and not self.family.seq2seq:
            raise PcmoeError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's context of {limit} tokens")
        gen = torch.Generator().manual_seed(seed if seed is not None else random.randrange(2**31))
        eos = self._eos_ids() if stop_on_eos else set()
        stop = [s for s in (stop or []) if s]
        self.begin_input()
        try:
            yield from self._generate_steps(ids, max_new_tokens, temperature, top_p, gen, eos, stop,
                                            set(stop_token_ids or ()))
        finally:  # also when the consumer stops early (client disconnect): the engine is free again
            self.end_input()

    def _generate_steps(self, ids, max_new_tokens, temperature, top_p, gen, eos, stop, stop_ids):
        new_ids: list[int] = []
        emitted = ""
        t0 = time.perf_counter()
        logits, state = self.prefill(ids)
        prefill_s = time.perf_counter() - t0
        for i in range(max_new_tokens):
            if i > 0:
                logits = self.decode_step(state, new_ids[-1])
            token = _sample(logits, temperature, top_p, gen)
            new_ids.append(token)
            finish = "eos" if token in eos else "stop" if token in stop_ids else None
            if finish is None and len(new_ids) >= max_new_tokens:
                finish = "length"
            delta = ""
            if self.tokenizer is not None:
                text = self._decode(new_ids)
                hit = min((text.find(s) for s in stop if s in text), default=-1)
                if hit >= 0:
                    text, finish = text[:hit], "stop"
                    safe = len(text)
                elif finish is not None:
                    safe = len(text)  # the end: flush whatever was held back
                else:
                    safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence waits for more
                    safe -= _stop_prefix_overlap(text[:safe], stop)
                if safe > len(emitted):
                    delta, emitted = text[len(emitted):safe], text[:safe]
            step = GenerationStep(token, delta, i, finish, len(ids), prefill_s,
                                  time.perf_counter() - t0 - prefill_s)
            if finish is not None:
                step.stats = self.stats()
            yield step
            if finish is not None:
                return

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

    def decode_step(self, state: dict, token: int) -> torch.Tensor:
        """Feed one token; next-token logits [V]."""
        ids = torch.tensor([[token]])
        if self.family.seq2seq:
            out = self.model(encoder_outputs=state["enc"], decoder_input_ids=ids, cache=state["cache"],
                             use_cache=True)
            state["cache"] = out.cache
            return out.logits[0, -1].float()
        return self.forward(ids, state)[-1].float()

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.config, "eos_token_id", None)
        out = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            out.add(self.tokenizer.eos_token_id)
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- statistics ----------------------------------------------------------------------------

    def reset_stats(self) -> None:
        from pcmoe.routing import GatingStats
        from pcmoe.scheduler import SchedulerStats

        for c in self.controllers:
            c.stats = GatingStats()
            c.stall_s = 0.0
        self.store.stats = self.store.new_stats()
        if self.scheduler is not None:
            n = len(self.committees)
            self.scheduler.stats = SchedulerStats(per_layer_swaps=[0] * n, per_layer_stall_s=[0.0] * n)
        self._t_start = time.perf_counter()

    def stats(self) -> dict:
        layers = []
        tot = {"choices": 0, "hits": 0, "exchanged": 0, "skipped": 0, "mass_total": 0.0, "mass_outside": 0.0}
        st = self.store.stats
        sched = self.scheduler.stats if self.scheduler else None
        for layer, (c, committee) in enumerate(zip(self.controllers, self.committees)):
            s = c.stats
            for k in tot:
                tot[k] += getattr(s, k)
            layers.append({
                "layer": layer, "block": self.blocks[layer].block_name, "experts": committee.num_experts,
                "committee_size": self.committee_sizes[layer], "slots": committee.num_slots,
                "members": sorted(committee.members()), "choices": s.choices, "hits": s.hits,
                "misses": s.choices - s.hits, "exchanged": s.exchanged, "skipped": s.skipped,
                "router_mass_outside": s.mass_outside / s.mass_total if s.mass_total else 0.0,
                "mass_total": s.mass_total, "mass_outside": s.mass_outside,
                "swaps": sched.per_layer_swaps[layer] if sched else 0,
                "bytes_read": st.per_layer_bytes[layer],
                "read_s": st.per_layer_read_s[layer],
                "stall_s": c.stall_s + (sched.per_layer_stall_s[layer] if sched else 0.0),
                "resident_expert_bytes": self.sizes.expert[layer] * self.slots[layer],
            })
        stall = sum(c.stall_s for c in self.controllers) + (sched.stall_s if sched else 0.0)
        buffers = self.load_info.get("swap_buffer_bytes", 0)  # staging buffers of swaps: resident too
        resident_expert_bytes = sum(b * s for b, s in zip(self.sizes.expert, self.slots)) + buffers
        return {
            "policy": self.policy,
            "budget_bytes": self.budget,
            "nonexpert_bytes": self.sizes.nonexpert,
            "resident_expert_bytes": resident_expert_bytes,
            "resident_bytes": self.sizes.nonexpert + resident_expert_bytes,
            "full_model_bytes": self.sizes.full,
            "committee_sizes": list(self.committee_sizes),
            "choices": tot["choices"],
            "hits": tot["hits"],
            "misses": tot["choices"] - tot["hits"],
            "hit_rate": tot["hits"] / tot["choices"] if tot["choices"] else 1.0,
            "router_mass_outside": tot["mass_outside"] / tot["mass_total"] if tot["mass_total"] else 0.0,
            "exchanged": tot["exchanged"],
            "skipped": tot["skipped"],
            "swaps": sched.swaps if sched else 0,
            "swap_failures": sched.swap_failures if sched else 0,
            "updates": sched.updates if sched else 0,
            "bytes_read": st.bytes_read,
            "reads": st.reads,
            "read_s": st.read_s,
            "read_errors": st.errors,
            "stall_s": stall,
            "swap_buffer_bytes": buffers,
            "swap_copy_s": sched.copy_s if sched else 0.0,
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

    def save_state(self) -> dict:
        """The committee state a user's requests built up: per-layer importance scores and members.
        JSON-serialisable; restore it with load_state() (e.g. when that user comes back)."""
        return {
            "format": "pcmoe-state/1",
            "num_experts": [c.num_experts for c in self.committees],
            "score": [t.score.tolist() for t in self.trackers],
            "window": [t.window.tolist() for t in self.trackers],
            "members": [sorted(c.members()) for c in self.committees],
        }

    def load_state(self, state: dict) -> None:
        """Restore importance saved by save_state(). With the committee policy, swaps towards the
        saved members are planned at once and run amortised like any update (no stall)."""
        shape = [c.num_experts for c in self.committees]
        if not isinstance(state, dict) or state.get("format") != "pcmoe-state/1" or state.get("num_experts") != shape:
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

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.scheduler is not None:
            self.scheduler.close()
        self._hook.remove()
        self.checkpoint.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def _stop_prefix_overlap(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


# ------------------------------------------------------------------------------------------------


def load(checkpoint_dir: str | os.PathLike, budget=None, policy: str = "committee", plan=None,
         **options) -> Engine:
    """Load a checkpoint folder under a memory budget; see LoadOptions for the options. A plan's
    "options" are defaults that explicit keyword options override."""
    unknown = set(options) - set(LoadOptions.__dataclass_fields__)
    if unknown:
        raise PcmoeError(f"unknown load option(s): {', '.join(sorted(unknown))}")
    opts = LoadOptions(**options)
    try:
        plan_data = None
        explicit = set(options)
        if plan is not None:
            plan_data = read_plan(plan)
            plan_options = plan_data.get("options") or {}
            _apply_plan_options(opts, plan_options, explicit=explicit)
            explicit |= set(plan_options) if isinstance(plan_options, dict) else set()
        model_options = read_model_options(checkpoint_dir)
        if model_options:
            _apply_plan_options(opts, model_options, explicit=explicit, source=MODEL_OPTIONS_FILE)
        return _load(Path(checkpoint_dir), budget, policy, plan_data, opts)
    except (CheckpointError, BudgetError) as e:
        raise PcmoeError(str(e)) from None
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise PcmoeError(f"cannot read the checkpoint {checkpoint_dir}: {e.strerror or e}{where}") from None


MODEL_OPTIONS_FILE = "pcmoe_options.json"


def read_model_options(checkpoint_dir) -> dict:
    """Committee settings a model's publisher measured best for it, from pcmoe_options.json beside
    the checkpoint ({"format": "pcmoe-options/1", "options": {...}}): defaults below a plan's
    options and explicit keyword options. {} when there is no such file."""
    path = Path(checkpoint_dir) / MODEL_OPTIONS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BudgetError(f"{path} is not valid JSON ({e}); fix or delete it") from None
    if not isinstance(data, dict) or data.get("format") != "pcmoe-options/1" \
            or not isinstance(data.get("options"), dict):
        raise BudgetError(f"{path} is not a pcmoe options file (expected {{\"format\": \"pcmoe-options/1\", "
                          f"\"options\": {{...}}}}); fix or delete it")
    return data["options"]


def _apply_plan_options(opts: LoadOptions, plan_options, explicit: set[str], source: str = "plan") -> None:
    if not isinstance(plan_options, dict):
        raise BudgetError(f"the {source}'s \"options\" must be a JSON object")
    known = set(LoadOptions.__dataclass_fields__) - {"progress", "threads", "cache_dir"}
    bad = sorted(set(plan_options) - known)
    if bad:
        raise BudgetError(f"unknown {source} option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    for key, value in plan_options.items():
        if key not in explicit:
            setattr(opts, key, value)


# Option -> (accepted types, check, what it must be); None is accepted where the default is None.
_OPTION_RULES = {
    "update_every": (int, lambda v: v >= 1, "an integer >= 1"),
    "spare_slots": (int, lambda v: v >= 0, "an integer >= 0"),
    "bytes_per_step": (int, lambda v: v >= 1, "a positive number of bytes"),
    "tau": ((int, float), lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "margin": ((int, float), lambda v: v >= 0, "a number >= 0"),
    "ema_decay": ((int, float), lambda v: 0 < v < 1, "a number in (0, 1)"),
    "seed": (int, lambda v: True, "an integer"),
    "topk": (int, lambda v: v >= 1, "an integer >= 1"),
    "threads": (int, lambda v: v >= 1, "an integer >= 1"),
    "renorm": (bool, lambda v: True, "true or false"),
    "synchronous": (bool, lambda v: True, "true or false"),
    "evict": (bool, lambda v: True, "true or false"),
    "fast": (bool, lambda v: True, "true or false"),
}


def _validate(policy: str, opts: LoadOptions, family) -> None:
    if policy not in POLICIES:
        raise PcmoeError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    for name, (types, ok, what) in _OPTION_RULES.items():
        value = getattr(opts, name)
        if value is None and LoadOptions.__dataclass_fields__[name].default is None:
            continue
        is_bool = isinstance(value, bool)
        if (is_bool and bool not in (types if isinstance(types, tuple) else (types,))) or \
                not isinstance(value, types) or not ok(value):
            raise PcmoeError(f"option {name} must be {what}, not {value!r}")
    if opts.strategy not in STRATEGIES:
        raise PcmoeError(f"unknown strategy {opts.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if opts.update_unit not in ("tokens", "inputs"):
        raise PcmoeError("update_unit must be 'tokens' or 'inputs'")
    if opts.importance not in ("window", "ema"):
        raise PcmoeError(f"unknown importance {opts.importance!r}; use window or ema")
    if opts.quantize not in (None, "int8", "int4"):
        raise PcmoeError(f"unknown quantize {opts.quantize!r}; use int8 or int4")
    if opts.quantize and not family.kernel().linear_weights:
        raise PcmoeError(f"quantised experts are not supported for {family.model_types[0]}")
    if policy == "topk-reduce":
        k = family.top_k
        if opts.topk is None:
            opts.topk = max(1, k // 2)
        if not 1 <= opts.topk < k:
            raise PcmoeError(f"topk-reduce needs 1 <= topk < {k} (the model's experts per token)")


def _resolve_dtype(opts: LoadOptions, first_expert_dtype: torch.dtype) -> torch.dtype:
    if opts.dtype in (None, "auto"):
        return first_expert_dtype if first_expert_dtype.is_floating_point else torch.float32
    if isinstance(opts.dtype, torch.dtype):
        return opts.dtype
    if opts.dtype not in _DTYPES:
        raise PcmoeError(f"unknown dtype {opts.dtype!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[opts.dtype]


def _io_bandwidth(value) -> float | None:
    if value in (None, "", 0):
        return None
    if isinstance(value, str) and value.lower() in STORAGE_PROFILES:
        return STORAGE_PROFILES[value.lower()]
    try:
        mbps = float(value)
    except ValueError:
        raise PcmoeError(f"io_bandwidth {value!r} must be MB/s or one of {', '.join(STORAGE_PROFILES)}") from None
    if mbps <= 0:
        raise PcmoeError("io_bandwidth must be positive")
    return mbps


def _expert_norms(ckpt: Checkpoint, store: ExpertStore, num_experts: list[int],
                  opts: LoadOptions) -> list[torch.Tensor]:
    """||E_i|| per layer, streamed from disk once and cached by checkpoint fingerprint."""
    key = ckpt.fingerprint()
    shipped = ckpt.folder / "pcmoe_expert_norms.json"
    cache_root = Path(opts.cache_dir or os.environ.get("PCMOE_CACHE") or Path.home() / ".cache" / "pcmoe")
    cached = cache_root / key / "expert_norms.json"
    for path in (shipped, cached):
        if path.exists():
            with contextlib.suppress(ValueError, KeyError):
                data = json.loads(path.read_text())
                if data["fingerprint"] == key and [len(n) for n in data["norms"]] == num_experts:
                    return [torch.tensor(n, dtype=torch.float64) for n in data["norms"]]
    pairs = [(layer, e) for layer, n in enumerate(num_experts) for e in range(n)]
    values = [store.expert_norm(layer, e) for layer, e in _progress(pairs, "expert norms", opts.progress)]
    norms, i = [], 0
    for n in num_experts:
        norms.append(values[i:i + n])
        i += n
    with contextlib.suppress(OSError):
        atomic_write_text(cached, json.dumps({"fingerprint": key, "norms": norms}))
    return [torch.tensor(n, dtype=torch.float64) for n in norms]


def _check_expert_shapes(folder: Path, pieces, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every on-disk expert tensor must fill exactly the part of a slot it is read into."""
    for layer_pieces in pieces:
        for expert in layer_pieces:
            for piece in expert:
                shape = shapes[piece.dest]
                rows = shape[0] if piece.rows is None else piece.rows[1] - piece.rows[0]
                if math.prod(piece.info.shape) != rows * math.prod(shape[1:]):
                    raise CheckpointError(
                        f"{folder}: expert tensor {piece.info.name} has shape {list(piece.info.shape)}, which does "
                        f"not fit the expert shape {list(shape)} that config.json implies; the config does not "
                        "match the weights")


def _profile_path(folder: Path, given: str | None, policy: str) -> str | None:
    """The routing profile to use: the given file, else the profile.json shipped beside the
    checkpoint (a warm start for the committee, the subset of static-frequency), else none."""
    if given is not None and str(given).lower() in ("", "none"):
        given = None
    elif given is None and (folder / "profile.json").exists() and policy in ("committee", "on-demand",
                                                                             "static-frequency"):
        given = str(folder / "profile.json")
    if policy == "static-frequency" and given is None:
        raise PcmoeError("static-frequency needs a routing profile: pass profile=FILE (make one with "
                         "`pcmoe profile --model DIR --data FILE.txt`) or put profile.json beside the checkpoint")
    return given


def _read_profile(path, model_type: str, num_experts: list[int]) -> dict:
    p = Path(path)
    if not p.exists():
        raise PcmoeError(f"profile {p} does not exist; make one with `pcmoe profile`")
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise PcmoeError(f"profile {p} is not valid JSON ({e})") from None
    if data.get("format") != PROFILE_FORMAT or data.get("num_experts") != num_experts:
        raise PcmoeError(f"profile {p} does not match this model (expected format {PROFILE_FORMAT} "
                         f"and experts per layer {num_experts})")
    return data


def _initial_members(policy, layer, n, norms, profile, opts) -> list[int]:
    N = len(norms)
    if n >= N:
        return list(range(N))
    if policy == "random-keep":
        return sorted(random.Random(opts.seed * 1000 + layer).sample(range(N), n))
    if policy == "static-frequency":
        return top_experts(torch.tensor(profile["counts"][layer]), n)
    if profile is not None and policy in ("committee", "on-demand"):
        return top_experts(torch.tensor(profile["importance"][layer]), n)
    return top_experts(norms, n)  # magnitude-keep, and the default warm start


def _load(folder: Path, budget_spec, policy: str, plan, opts: LoadOptions) -> Engine:
    t_load = time.perf_counter()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    config_dict = read_config_dict(folder)
    config = _load_config(folder, config_dict)  # an unsupported model is reported before reading files
    family = _family_of(config)
    _validate(policy, opts, family)
    ckpt = Checkpoint(folder, config_dict)
    try:
        return _load_checkpoint(folder, ckpt, config, family, budget_spec, policy, plan, opts, t_load)
    except BaseException:
        ckpt.close()  # no file descriptors left behind by a failed load
        raise


@dataclass
class _Layout:
    """What the headers and the meta skeleton tell before any weight is read."""

    model: nn.Module                 # the transformers model, parameters on meta
    dtype: torch.dtype
    block_names: list[str]
    pieces: list                     # [layer][expert] -> Pieces on disk
    meta_state: dict                 # non-expert key -> meta tensor
    nonexpert: dict                  # non-expert key -> TensorInfo on disk
    missing: set                     # keys not on disk (tied weights)
    sizes: ModelBytes


def _layout(folder: Path, ckpt: Checkpoint, config, family, opts: LoadOptions) -> _Layout:
    # The weights' dtype: as stored (the commonest floating dtype on disk) unless asked otherwise.
    stored = [t.dtype for t in ckpt.tensors.values() if t.dtype.is_floating_point]
    dtype = _resolve_dtype(opts, max(set(stored), key=stored.count) if stored else torch.float32)
    model = _build_skeleton(config, family, dtype)  # parameters on meta: no memory
    block_names = [name for name, m in model.named_modules() if type(m).__name__ in family.block_classes]
    if not block_names:
        raise PcmoeError(f"{folder}: no MoE blocks found in the {config.model_type} model (all layers dense?)")
    N = family.num_experts
    pieces = [[family.expert_pieces(ckpt, name, e) for e in range(N)] for name in block_names]
    _check_expert_shapes(folder, pieces, family.kernel().tensors)

    # Non-expert tensors: every parameter/persistent buffer outside the expert banks.
    expert_prefixes = tuple(f"{name}.experts." for name in block_names)
    meta_state = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(expert_prefixes)}
    nonexpert: dict[str, object] = {}
    missing: set[str] = set()
    for key in meta_state:
        disk = next((d for d in family.disk_keys(key) if d in ckpt), None)
        if disk is None:
            missing.add(key)
        else:
            info = ckpt[disk]
            if math.prod(info.shape) != meta_state[key].numel():
                raise CheckpointError(f"{folder}: tensor {disk} has shape {list(info.shape)} but the model built from "
                                      f"config.json expects {list(meta_state[key].shape)}; the config does not "
                                      "match the weights")
            nonexpert[key] = info
    tied_map = model.get_expanded_tied_weights_keys(all_submodels=True) if hasattr(
        model, "get_expanded_tied_weights_keys") else {}
    tied = set(tied_map) | set(tied_map.values())
    untied_missing = sorted(k for k in missing if k not in tied and meta_state[k].device.type == "meta")
    if untied_missing:
        raise PcmoeError(f"{folder}: the checkpoint lacks {len(untied_missing)} tensor(s) the model needs, "
                         f"e.g. {untied_missing[0]}; it does not match its config.json")

    def nbytes_as(info, target):
        return info.nbytes // info.dtype.itemsize * target.itemsize

    nonexpert_bytes = sum(nbytes_as(info, meta_state[k].dtype) for k, info in nonexpert.items())
    expert_bytes = [slot_nbytes(family.kernel(), dtype, opts.quantize)] * len(block_names)
    sizes = ModelBytes(nonexpert_bytes, expert_bytes, [N] * len(block_names))
    return _Layout(model, dtype, block_names, pieces, meta_state, nonexpert, missing, sizes)


def inspect(checkpoint_dir: str | os.PathLike, dtype: str = "auto", quantize: str | None = None) -> dict:
    """What a checkpoint holds and the smallest budgets it can be served in, from the safetensors
    headers and a meta-device skeleton only: no weight is read."""
    folder = Path(checkpoint_dir)
    opts = LoadOptions(dtype=dtype, quantize=quantize)
    try:
        config_dict = read_config_dict(folder)
        config = _load_config(folder, config_dict)
        family = _family_of(config)
        _validate("full", opts, family)
        with contextlib.closing(Checkpoint(folder, config_dict)) as ckpt:
            lay = _layout(folder, ckpt, config, family, opts)
    except (CheckpointError, BudgetError) as e:
        raise PcmoeError(str(e)) from None
    sizes = lay.sizes
    return {
        "model": str(folder), "model_type": config.model_type, "moe_layers": len(lay.block_names),
        "experts_per_layer": sizes.num_experts[0], "experts_per_token": family.top_k,
        "dtype": str(lay.dtype).replace("torch.", ""), "quantize": quantize,
        "nonexpert_bytes": sizes.nonexpert, "expert_bytes": sizes.expert[0],
        "all_expert_bytes": sizes.all_experts, "full_model_bytes": sizes.full,
        "minimum_budget_committee": minimum_budget(sizes, 1), "minimum_budget_static": minimum_budget(sizes, 0),
        "tokenizer": (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists(),
    }


def _load_checkpoint(folder, ckpt, config, family, budget_spec, policy, plan, opts, t_load) -> Engine:
    lay = _layout(folder, ckpt, config, family, opts)
    model, dtype, block_names, pieces = lay.model, lay.dtype, lay.block_names, lay.pieces
    meta_state, nonexpert, missing, sizes = lay.meta_state, lay.nonexpert, lay.missing, lay.sizes
    N = family.num_experts
    expert_bytes = sizes.expert

    # Committee sizes, slots and (committee without spare slots) the shared swap staging buffers.
    spare = opts.spare_slots if policy in DYNAMIC_POLICIES else 0
    bytes_per_step = opts.bytes_per_step or 2 * max(expert_bytes)
    staging_bytes = slot_nbytes(family.kernel(), dtype, None)           # one expert as read from disk
    # A load issued at one step boundary is switched at the next, so a step's allowance bounds what
    # is in flight: that many buffers.
    n_buffers = max(bytes_per_step, max(expert_bytes)) // max(expert_bytes) \
        if policy in DYNAMIC_POLICIES and spare == 0 else 0
    buffer_bytes = n_buffers * staging_bytes
    budget = parse_budget(budget_spec, sizes)
    if plan is not None:
        committee_sizes = check_plan(plan, config.model_type, sizes.num_experts)
        if policy in ALL_RESIDENT_POLICIES:
            committee_sizes = list(sizes.num_experts)
    elif policy in ALL_RESIDENT_POLICIES or budget is None or sizes.full <= budget:
        committee_sizes = list(sizes.num_experts)
    else:
        committee_sizes = uniform_sizes(budget - buffer_bytes, sizes, spare, policy, reserved=buffer_bytes)
    slots = slots_for(committee_sizes, sizes, spare)
    if all(n >= N for n, N in zip(committee_sizes, sizes.num_experts)):
        n_buffers = buffer_bytes = 0  # nothing will ever be swapped
    need = sizes.slots_bytes(slots) + buffer_bytes
    if budget is not None and need > budget:
        if policy in ALL_RESIDENT_POLICIES:
            raise PcmoeError(f"policy {policy} keeps every expert resident ({format_bytes(need)}) but the budget "
                             f"is {format_bytes(budget)}; raise the budget or use committee/on-demand")
        raise PcmoeError(f"the plan needs {format_bytes(need)} of weights but the budget is {format_bytes(budget)} "
                         f"(minimum {format_bytes(minimum_budget(sizes, spare) + buffer_bytes)})")
    if budget is None:
        budget = need

    # Load non-expert tensors into the skeleton.
    for key, info in _progress(nonexpert.items(), "non-expert weights", opts.progress, len(nonexpert), "tensor"):
        _set_tensor(model, key, ckpt.read(info, meta_state[key].dtype, evict=opts.evict))
    if missing and hasattr(model, "tie_weights"):
        model.tie_weights(missing_keys=missing, recompute_mapping=True)

    # Replace MoE blocks by committee blocks with slot banks.
    blocks = []
    for layer, name in enumerate(block_names):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        experts = SlotExperts(family.kernel(), slots[layer], dtype, opts.quantize)
        block = CommitteeMoE(getattr(parent, attr), family, experts, layer, name)
        setattr(parent, attr, block)
        blocks.append(block)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise PcmoeError(f"{folder}: tensor {leftover[0]} was not loaded; the checkpoint does not match its config")
    model.eval()

    store = ExpertStore(ckpt, pieces, io_bandwidth_mbps=_io_bandwidth(opts.io_bandwidth), evict=opts.evict)
    norms = _expert_norms(ckpt, store, sizes.num_experts, opts)
    profile_path = _profile_path(folder, opts.profile, policy)
    profile = _read_profile(profile_path, config.model_type, sizes.num_experts) if profile_path else None

    committees, trackers, controllers = [], [], []
    fill = []
    for layer in range(len(blocks)):
        committee = LayerCommittee(N, slots[layer])
        members = _initial_members(policy, layer, committee_sizes[layer], norms[layer], profile, opts)
        for slot, e in enumerate(members):
            fill.append((layer, e, slot))
        committees.append(committee)
        prior = torch.tensor(profile["importance"][layer], dtype=torch.float64) if profile else None
        trackers.append(ImportanceTracker(norms[layer], opts.importance, opts.ema_decay, prior))
    def load_into_slot(layer: int, expert: int, slot: int) -> bool:
        bank = blocks[layer].experts
        staged = bank.staging(slot)
        ok = store.load(layer, expert, staged)
        if ok:
            bank.commit(slot, staged)
        return ok

    for layer, e, slot in _progress(fill, "loading experts", opts.progress):
        if not load_into_slot(layer, e, slot):
            raise PcmoeError(f"{folder}: cannot read expert {e} of {block_names[layer]} (I/O error after retries)")
        committees[layer].install(e, slot)

    track = opts.track_importance if opts.track_importance is not None else policy in DYNAMIC_POLICIES
    for layer, block in enumerate(blocks):
        committee, tracker = committees[layer], trackers[layer]
        if policy == "on-demand":
            ctrl = OnDemandController(committee, tracker, load_into_slot, layer, track)
        elif policy == "topk-reduce":
            ctrl = TopkReduceController(committee, tracker, opts.topk, track)
        else:
            ctrl = MaskedGatingController(committee, tracker, opts.renorm, opts.strategy, opts.tau, track)
        block.controller = ctrl
        controllers.append(ctrl)

    scheduler = None
    if policy in DYNAMIC_POLICIES and any(n < N for n in committee_sizes):
        staging = None
        if n_buffers:
            buffers = [expert_buffer(family.kernel(), dtype) for _ in range(n_buffers)]
            staging = (lambda layer, expert, b: store.load(layer, expert, buffers[b]),
                       lambda layer, b, slot: blocks[layer].experts.write(slot, buffers[b]), n_buffers)
        scheduler = SwapScheduler(
            committees, trackers, committee_sizes, expert_bytes, load_into_slot,
            update_every=opts.update_every, unit=opts.update_unit, bytes_per_step=bytes_per_step,
            margin=opts.margin, synchronous=opts.synchronous, staging=staging)

    tokenizer = None
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        with contextlib.suppress(Exception):
            tokenizer = AutoTokenizer.from_pretrained(folder)
    load_info = {"seconds": time.perf_counter() - t_load, "bytes_read": store.stats.bytes_read,
                 "dtype": str(dtype).replace("torch.", ""), "profile": profile_path,
                 "swap_buffers": n_buffers, "swap_buffer_bytes": buffer_bytes}
    fast = None
    if opts.fast:
        from pcmoe import fast as fast_path

        fast = fast_path.FastDecoder(model) if fast_path.supports(model) else None
    engine = Engine(model=model, tokenizer=tokenizer, family=family, ckpt=ckpt, store=store, blocks=blocks,
                    committees=committees, trackers=trackers, controllers=controllers, scheduler=scheduler,
                    sizes=sizes, committee_sizes=committee_sizes, slots=slots, budget=budget, policy=policy,
                    options=opts, expert_norms=norms, load_info=load_info, fast=fast)
    engine.reset_stats()
    return engine
