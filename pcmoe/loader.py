"""Load a MoE checkpoint under a memory budget: options -> layout -> sizing -> build -> Engine.

    engine = pcmoe.load("models/pcmoe-lm", budget="50%experts", policy="committee")
    for step in engine.generate("def fibonacci(", max_new_tokens=32):
        print(step.text, end="")
    print(engine.stats())

Loading never materialises a non-resident expert: the model is built with its parameters on the
meta device, non-expert tensors are read from the safetensors files, each MoE block is replaced
by a CommitteeMoE with a slot bank sized by pcmoe.budget, and the initial members are read into
their slots expert by expert. `inspect` stops after the layout: headers and a meta skeleton only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from pcmoe import qcache
from pcmoe.budget import (
    BudgetError,
    ModelBytes,
    Sizing,
    format_bytes,
    minima,
    parse_budget,
    size_committees,
)
from pcmoe.checkpoint import Checkpoint, CheckpointError, read_config_dict
from pcmoe.committee import LayerCommittee
from pcmoe.formats import (
    FormatError,
    check_nonexpert_precision,
    check_plan,
    check_precisions,
    check_shadow,
    profile_path,
    read_profile,
)
from pcmoe.importance import ImportanceTracker, top_experts
from pcmoe.models import family_class, load_family
from pcmoe.models.base import parameters_on_meta
from pcmoe.models.config import lean_config
from pcmoe.models.lean import LeanCausalLM, SparseBlock, lean_supported
from pcmoe.moe import CommitteeMoE, SlotExperts, bank_tensors, expert_buffer, slot_nbytes
from pcmoe.options import LoadOptions, PcmoeError, PcmoeWarning, resolve_options, validate
from pcmoe.policies import (
    ALL_RESIDENT_POLICIES,
    DYNAMIC_POLICIES,
    MaskedGatingController,
    OnDemandController,
    TopkReduceController,
)
from pcmoe.runtime import Engine, Layer
from pcmoe.scheduler import SwapScheduler
from pcmoe.store import STORAGE_PROFILES, ExpertIO, ExpertStore, read_full_precision
from pcmoe.system import atomic_write_text

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def load(checkpoint_dir: str | os.PathLike, budget=None, policy: str = "committee", plan=None,
         **options) -> Engine:
    """Load a checkpoint folder under a memory budget; see LoadOptions for the options. A plan's
    "options" are defaults that explicit keyword options override; the model folder's
    pcmoe_options.json comes below both."""
    try:
        opts, plan_data = resolve_options(checkpoint_dir, plan, options)
        return _load(Path(checkpoint_dir), budget, policy, plan_data, opts)
    except (CheckpointError, BudgetError, FormatError) as e:
        raise PcmoeError(str(e)) from None
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise PcmoeError(f"cannot read the checkpoint {checkpoint_dir}: {e.strerror or e}{where}") from None


def inspect(checkpoint_dir: str | os.PathLike, dtype: str = "auto", quantize: str | None = None) -> dict:
    """What a checkpoint holds and the smallest budgets it can be served in, from the safetensors
    headers and a meta-device skeleton only: no weight is read. "minimum_budget" is what a default
    committee load needs (staged swaps: one member per layer plus the shared staging buffers)."""
    folder = Path(checkpoint_dir)
    opts = LoadOptions(dtype=dtype, quantize=quantize)
    try:
        config_dict = read_config_dict(folder)
        family = load_family(folder, config_dict)
        validate("full", opts, family.top_k, bool(family.kernel().linear_weights), family.model_types[0])
        with contextlib.closing(Checkpoint(folder, config_dict)) as ckpt:
            lay = _layout(folder, ckpt, family, opts)
    except (CheckpointError, BudgetError, FormatError) as e:
        raise PcmoeError(str(e)) from None
    sizes = lay.sizes
    return {
        "model": str(folder), "model_type": family.config.model_type, "moe_layers": len(lay.block_names),
        "experts_per_layer": sizes.num_experts[0], "experts_per_token": family.top_k,
        "dtype": str(lay.dtype).replace("torch.", ""), "quantize": quantize,
        "nonexpert_bytes": sizes.nonexpert, "expert_bytes": sizes.expert[0],
        "nonexpert_bytes_quantized": {m: _nonexpert_bytes_at(lay.meta_state, lay.nonexpert, m)
                                      for m in _nonexpert_modes(lay)} if family.lean_decoder else {},
        "all_expert_bytes": sizes.all_experts, "full_model_bytes": sizes.full,
        "shadow_bytes": _shadow_bytes(family, lay.dtype),
        **minima(sizes, _staging_bytes(family, lay), opts.bytes_per_step),
        "tokenizer": (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists(),
    }


def _shadow_bytes(family, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of one expert's shadow in each group-quantised form its kernel allows (pcmoe.shadow)."""
    from pcmoe.shadow import DEFAULT_GROUP, shadow_nbytes

    out = {}
    for form in DEFAULT_GROUP:   # the group-quantised forms
        try:
            out[form] = shadow_nbytes(family.kernel(), dtype, form)
        except ValueError:   # no linear weights, or an input size that is not a multiple of 8
            pass
    return out


# -- options (the rules are in pcmoe.options) ------------------------------------------------------


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



# -- layout: headers and the meta skeleton ----------------------------------------------------------


@dataclass
class _Layout:
    """What the headers and the meta skeleton tell before any weight is read."""

    model: nn.Module                 # the model, parameters on meta
    dtype: torch.dtype
    block_names: list[str]
    pieces: list                     # [layer][expert] -> Pieces on disk
    meta_state: dict                 # non-expert key -> meta tensor
    nonexpert: dict                  # non-expert key -> TensorInfo on disk
    missing: set                     # keys not on disk (tied weights)
    sizes: ModelBytes
    quants: list                     # per MoE layer: None (full precision), "int8" or "int4"


def _layout(folder: Path, ckpt: Checkpoint, family, opts: LoadOptions, plan: dict | None = None) -> _Layout:
    # The weights' dtype: as stored (the commonest floating dtype on disk) unless asked otherwise.
    stored = [t.dtype for t in ckpt.tensors.values() if t.dtype.is_floating_point]
    dtype = _resolve_dtype(opts, max(set(stored), key=stored.count) if stored else torch.float32)
    if _lean_build(family, opts):
        model = LeanCausalLM(family.config, family, dtype)  # parameters on meta: no memory
    else:
        with parameters_on_meta():
            model = family.build(dtype)
    block_names = [name for name, m in model.named_modules()
                   if isinstance(m, SparseBlock) or type(m).__name__ in family.block_classes]
    if not block_names:
        raise PcmoeError(f"{folder}: no MoE blocks found in the {family.config.model_type} model (all layers dense?)")
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
    if opts.nonexpert_quantize:   # as pcmoe.nonexpert will hold them (pcmoe.budget arithmetic)
        nonexpert_bytes = _nonexpert_bytes_at(meta_state, nonexpert, opts.nonexpert_quantize)
    quants = (check_precisions(plan, len(block_names)) if plan is not None else None) \
        or [opts.quantize] * len(block_names)
    if any(quants) and not family.kernel().linear_weights:
        raise PcmoeError(f"quantised experts are not supported for {family.model_types[0]}")
    expert_bytes = [slot_nbytes(family.kernel(), dtype, q) for q in quants]
    sizes = ModelBytes(nonexpert_bytes, expert_bytes, [N] * len(block_names))
    return _Layout(model, dtype, block_names, pieces, meta_state, nonexpert, missing, sizes, quants)


def _nonexpert_modes(lay: _Layout) -> list[str]:
    """The --quantize-nonexpert modes the non-expert shapes allow (int4 wants whole blocks)."""
    from pcmoe.nonexpert import NONEXPERT_MODES, layout_error

    shapes = {k: tuple(lay.meta_state[k].shape) for k in lay.nonexpert}
    return [m for m in NONEXPERT_MODES if layout_error(shapes, m) is None]


def _nonexpert_bytes_at(meta_state: dict, nonexpert: dict, mode: str | None) -> int:
    from pcmoe.budget import nonexpert_nbytes_at

    shapes = {k: tuple(meta_state[k].shape) for k in nonexpert}
    itemsize = {k: meta_state[k].dtype.itemsize for k in nonexpert}
    return nonexpert_nbytes_at(shapes, itemsize, mode)


def _check_nonexpert_quantize(family, opts: LoadOptions, model) -> None:
    """Quantised non-expert weights are served by the lean decoder only (one-line error elsewhere)."""
    if not opts.nonexpert_quantize:
        return
    from pcmoe import fast as fast_path

    name = family.model_types[0]
    if not family.lean_decoder:
        raise PcmoeError(f"--quantize-nonexpert: {name} runs the transformers forward (no lean decoder); "
                         "its non-expert weights stay as stored")
    if not opts.fast or not fast_path.supports(model):
        raise PcmoeError(f"--quantize-nonexpert needs the lean decoder, which this {name} model does not use "
                         "(fast=False or sliding-window attention)")


def _lean_build(family, opts: LoadOptions) -> bool:
    """Whether the model is built as pcmoe.models.lean's skeleton (served by the lean decoder, no
    transformers modeling code) rather than as the transformers model."""
    return bool(opts.fast and family.lean_decoder and lean_supported(family.config) is None)


def _load_family(folder: Path, config_dict: dict, opts: LoadOptions):
    """The Family bound to a LeanConfig (no transformers import) where the lean build applies to
    config.json as stated, else to transformers' config."""
    cls = family_class(config_dict, folder)
    if opts.fast and cls.lean_decoder:
        config = lean_config(config_dict, folder)
        if config is not None and lean_supported(config) is None:
            return cls(config)
    return load_family(folder, config_dict)


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



# -- build -----------------------------------------------------------------------------------------


def _load(folder: Path, budget_spec, policy: str, plan, opts: LoadOptions) -> Engine:
    t_load = time.perf_counter()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    config_dict = read_config_dict(folder)
    family = _load_family(folder, config_dict, opts)  # an unsupported model is reported before reading files
    if plan is not None and opts.nonexpert_quantize is None:  # an explicit option (full included) wins
        opts.nonexpert_quantize = check_nonexpert_precision(plan)
    if plan is not None and opts.shadow is None:              # likewise an explicit --shadow
        opts.shadow = check_shadow(plan)
    validate(policy, opts, family.top_k, bool(family.kernel().linear_weights), family.model_types[0])
    ckpt = Checkpoint(folder, config_dict)
    try:
        return _build(folder, ckpt, family, budget_spec, policy, plan, opts, t_load)
    except BaseException:
        ckpt.close()  # no file descriptors left behind by a failed load
        raise


def _sizing(lay: _Layout, family, budget_spec, policy: str, plan, opts: LoadOptions) -> Sizing:
    sizes = lay.sizes
    plan_sizes = check_plan(plan, family.config.model_type, sizes.num_experts) if plan is not None else None
    if opts.shadow:
        return _shadow_sizing(lay, family, budget_spec, policy, plan_sizes, opts)
    return size_committees(sizes, parse_budget(budget_spec, sizes), policy=policy,
                           swapped=policy in DYNAMIC_POLICIES, all_resident=policy in ALL_RESIDENT_POLICIES,
                           spare_slots=opts.spare_slots, bytes_per_step=opts.bytes_per_step,
                           staging_bytes=_staging_bytes(family, lay), plan_sizes=plan_sizes)


def _staging_bytes(family, lay: _Layout) -> int:
    """One shared staging buffer as the load will size it (store.staging_nbytes): room for the largest
    expert any layer reads, quantised where a layer is read from a quantised copy (pcmoe.qcache, on
    unless PCMOE_QUANT_COPY=0), else at full precision."""
    from pcmoe.store import layout_nbytes

    kernel = family.kernel()
    return max(layout_nbytes(bank_tensors(kernel, lay.dtype, q if qcache.enabled() else None)) for q in lay.quants)


def _shadow_sizing(lay: _Layout, family, budget_spec, policy: str, plan_sizes, opts: LoadOptions) -> Sizing:
    """Committees and shadows in one budget (pcmoe.budget.shadow_sizing, which a live budget change
    calls too): staging buffers and the exact-load buffer of --wait-above are reserved first."""
    from pcmoe.budget import shadow_sizing
    from pcmoe.shadow import shadow_nbytes

    full = slot_nbytes(family.kernel(), lay.dtype, None)   # the exact-load scratch of --wait-above
    try:
        one = [shadow_nbytes(family.kernel(), lay.dtype, form, opts.shadow_group, opts.shadow_rank) if form else 0
               for form in _layer_forms(opts, lay)]
    except ValueError as e:   # a form this model's expert shapes do not allow
        raise PcmoeError(f"{e}: {family.model_types[0]} experts cannot have these shadows; choose another form "
                         "(int1, int2 and int3 need inputs in multiples of 8)") from None
    return shadow_sizing(lay.sizes, parse_budget(budget_spec, lay.sizes), one, policy=policy,
                         swapped=policy in DYNAMIC_POLICIES, spare_slots=opts.spare_slots,
                         bytes_per_step=opts.bytes_per_step, staging_bytes=_staging_bytes(family, lay),
                         wait_bytes=full if opts.wait_above is not None else 0, shadows=opts.shadow_experts,
                         plan_sizes=plan_sizes)


def _layer_forms(opts: LoadOptions, lay: _Layout) -> list[str | None]:
    """Each MoE layer's shadow form (pcmoe.shadow.layer_forms), a list of the wrong length as one error line."""
    from pcmoe.shadow import layer_forms

    try:
        return layer_forms(opts.shadow, len(lay.sizes.expert))
    except ValueError as e:
        raise PcmoeError(str(e)) from None


def _cached_shadow(cache, layer: int, names: list[str], expert: int):
    """A demoted member's shadow from the cache (None if absent). The file is closed after the read
    but its pages stay cached: unmapped, the kernel reclaims them first, and the next demotion
    finds them without a disk read."""
    row = cache.get(layer, expert, names)
    cache.release(layer, evict=False)
    return row


def _make_choosers(folder, ckpt, family, store, lay, sizing, policy, opts, blocks, members, profile, norms):
    """Shadow banks (made from each expert's full-precision weights, read once) and a MissChooser
    per layer, with the layer's measured errors (pcmoe_shadow_errors.json / the cache) or, where
    none were measured, the relative weight error of the shadows."""
    from pcmoe import shadow as shadows_mod
    from pcmoe.policies import MissChooser

    forms = _layer_forms(opts, lay)
    errors = {f: shadows_mod.read_errors(folder, ckpt.fingerprint(), opts, f) for f in set(forms) if f}
    caches = {f: shadows_mod.ShadowCache.for_checkpoint(ckpt.fingerprint(), opts, f) for f in set(forms) if f}
    buffer = expert_buffer(family.kernel(), lay.dtype)
    exact = None
    if opts.wait_above is not None:
        scratch = expert_buffer(family.kernel(), lay.dtype)

        def exact(layer, expert):
            return scratch if read_full_precision(store, layer, expert, scratch) else None
    bandwidth = (_io_bandwidth(opts.io_bandwidth) or 2000.0) * 1e6  # bytes/s; 2 GB/s (ufs) when not emulated
    choosers, cache_ok = [], True
    for i in range(len(blocks)):
        form = forms[i]
        n_sh = sizing.shadow_counts[i] if sizing.shadow_counts and form else 0
        cache = caches.get(form)
        score = torch.tensor(profile["importance"][i]) if profile else norms[i]
        order = [e for e in top_experts(score, len(score)) if e not in set(members[i])]
        bank = shadows_mod.ShadowBank(family.kernel(), len(score), order[:n_sh], lay.dtype, form,
                                      opts.shadow_group, opts.shadow_rank) if n_sh else None
        if bank is not None:
            for e in _progress(bank.experts, f"shadows of layer {i}", opts.progress):
                made = cache.get(i, e, bank.bank)
                if made is not None:
                    bank.load_row(e, made)
                    continue
                if not read_full_precision(store, i, e, buffer):
                    raise PcmoeError(f"{folder}: cannot read expert {e} of {lay.block_names[i]} (I/O error)")
                bank.write(e, buffer)
                cache.put(i, e, bank.row_state(e))
            if policy in DYNAMIC_POLICIES:  # every expert's shadow in the cache: a demoted member gets one
                made = None  # a temporary bank of every expert of the layer, for making them
                for e in range(len(score)):
                    if (bank.row_of[e] < 0 and cache.get(i, e, bank.bank) is None
                            and read_full_precision(store, i, e, buffer)):
                        made = made or shadows_mod.ShadowBank(family.kernel(), len(score), list(range(len(score))),
                                                              lay.dtype, form, opts.shadow_group, opts.shadow_rank)
                        made.write(e, buffer)
                        cache.put(i, e, made.row_state(e))
            if opts.kernel != "eager" and any(b.experts.native is not None for b in blocks):
                bank.use_native()
            made = None
            if cache_ok:  # this layer's new shadows to disk now: one layer's in memory at a time
                try:
                    cache.flush(i)
                except OSError:
                    cache_ok = False
            cache.release(i)  # the rows are copies in the bank: no mapped cache pages left behind
        measured = errors[form][i] if errors.get(form) else {}
        err = {"shadow": measured.get("shadow", bank.weight_error() if bank is not None else 1.0), "wait": 0.0,
               "exchange": measured.get("exchange", 1.0), "skip": 1.0}
        seconds = {"shadow": bank.time_one() if bank is not None else 0.0,
                   "wait": lay.sizes.expert[i] / bandwidth}
        choosers.append(MissChooser(i, bank, err, {a: t * 1e3 for a, t in seconds.items()}, opts.strategy,
                                    time_cost=opts.miss_time_cost,
                                    force=None if opts.miss_action == "auto" else opts.miss_action,
                                    wait_above=opts.wait_above, load_exact=exact,
                                    exact_kernel=family.kernel() if exact else None))
    if not cache_ok:  # no cache: demoted members get no shadow (their rows stay with the promoted)
        return choosers
    if policy in DYNAMIC_POLICIES:
        for i, chooser in enumerate(choosers):
            if chooser.shadows is not None:
                names = list(chooser.shadows.bank)
                chooser.source = partial(_cached_shadow, caches[forms[i]], i, names)
    return choosers


def _build(folder, ckpt, family, budget_spec, policy, plan, opts, t_load) -> Engine:
    lay = _layout(folder, ckpt, family, opts, plan)
    model, sizes = lay.model, lay.sizes
    _check_nonexpert_quantize(family, opts, model)
    sizing = _sizing(lay, family, budget_spec, policy, plan, opts)  # before any weight is read

    for key, info in _progress(lay.nonexpert.items(), "non-expert weights", opts.progress, len(lay.nonexpert),
                               "tensor"):
        _set_tensor(model, key, ckpt.read(info, lay.meta_state[key].dtype, evict=opts.evict))
    if lay.missing and hasattr(model, "tie_weights"):
        model.tie_weights(missing_keys=lay.missing, recompute_mapping=True)
    if opts.nonexpert_quantize:
        from pcmoe.nonexpert import NonexpertError, quantize_nonexpert

        try:
            quantize_nonexpert(model, opts.nonexpert_quantize)
        except NonexpertError as e:
            raise PcmoeError(f"--quantize-nonexpert {opts.nonexpert_quantize}: {e}") from None

    # Replace MoE blocks by committee blocks with slot banks.
    blocks = []
    for layer, name in enumerate(lay.block_names):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bank = SlotExperts(family.kernel(), sizing.slots[layer], lay.dtype, lay.quants[layer])
        block = CommitteeMoE(getattr(parent, attr), bank, layer, name)
        block.bound = family.bind(block)
        setattr(parent, attr, block)
        blocks.append(block)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise PcmoeError(f"{folder}: tensor {leftover[0]} was not loaded; the checkpoint does not match its config")
    model.eval()
    native, kernel_path = _native_kernels(opts, family, lay.dtype, [b.experts for b in blocks])
    if native is not None:

        from pcmoe.native import ops

        for block in blocks:
            block.bound = family.bind(block, partial(ops.linear, native))

    store = ExpertStore(ckpt, lay.pieces, io_bandwidth_mbps=_io_bandwidth(opts.io_bandwidth), evict=opts.evict)
    copies = qcache.attach(ckpt, store, [b.experts for b in blocks], family.kernel(), lay.dtype, lay.quants,
                           cache_dir=opts.cache_dir, progress=lambda it, desc: _progress(it, desc, opts.progress))
    io = ExpertIO(store, [b.experts for b in blocks], sizing.swap_buffers)
    extra = sizing.swap_buffers * (io.buffer_nbytes - _staging_bytes(family, lay))
    if extra > 0:   # the budget assumed quantised copies that could not be written
        import warnings

        warnings.warn(f"the staging buffers hold full-precision experts (no quantised copy for some layer): "
                      f"{format_bytes(extra)} beyond the budget", PcmoeWarning, stacklevel=3)
        sizing = replace(sizing, buffer_bytes=sizing.buffer_bytes + extra, weight_bytes=sizing.weight_bytes + extra)
    norms = _expert_norms(ckpt, store, sizes.num_experts, opts)
    profile_file = profile_path(folder, opts.profile, policy)
    profile = read_profile(profile_file, family.config.model_type, sizes.num_experts) if profile_file else None

    layers = []
    all_members = []
    track = opts.track_importance if opts.track_importance is not None else policy in DYNAMIC_POLICIES
    fill = []
    for i, block in enumerate(blocks):
        committee = LayerCommittee(sizes.num_experts[i], sizing.slots[i])
        members = _initial_members(policy, i, sizing.committee_sizes[i], norms[i], profile, opts)
        fill += [(i, e, slot) for slot, e in enumerate(members)]
        all_members.append(members)
        prior = torch.tensor(profile["importance"][i], dtype=torch.float64) if profile else None
        tracker = ImportanceTracker(norms[i], opts.importance, opts.ema_decay, prior)
        router = family.bind_router(block, opts.renorm)
        if policy == "on-demand":
            ctrl = OnDemandController(committee, tracker, router, io.load_slot, i, track)
        elif policy == "topk-reduce":
            ctrl = TopkReduceController(committee, tracker, router, family.bind_router(block, opts.renorm, opts.topk),
                                        track)
        else:
            ctrl = MaskedGatingController(committee, tracker, router, opts.strategy, opts.tau, track)
        block.controller = ctrl
        layers.append(Layer(block, committee, tracker, ctrl))
    if opts.shadow and any(sizing.shadow_counts):
        for layer, chooser in zip(layers, _make_choosers(folder, ckpt, family, store, lay, sizing, policy, opts,
                                                         blocks, all_members, profile, norms)):
            layer.controller.chooser = chooser
    for i, e, slot in _progress(fill, "loading experts", opts.progress):
        if not io.load_slot(i, e, slot):
            raise PcmoeError(f"{folder}: cannot read expert {e} of {lay.block_names[i]} (I/O error after retries)")
        layers[i].committee.install(e, slot)

    scheduler = None
    if policy in DYNAMIC_POLICIES and any(n < N for n, N in zip(sizing.committee_sizes, sizes.num_experts)):
        staging = (io.load_buffer, io.commit_buffer, sizing.swap_buffers) if sizing.swap_buffers else None
        scheduler = SwapScheduler(
            [layer.committee for layer in layers], [layer.tracker for layer in layers], sizing.committee_sizes,
            sizes.expert, io.load_slot, update_every=opts.update_every, unit=opts.update_unit,
            bytes_per_step=sizing.bytes_per_step, margin=opts.margin,
            synchronous=opts.synchronous, staging=staging)

    from pcmoe.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(folder)
    load_info = {"seconds": time.perf_counter() - t_load, "bytes_read": store.stats.bytes_read,
                 "dtype": str(lay.dtype).replace("torch.", ""), "profile": profile_file,
                 "swap_buffers": sizing.swap_buffers, "swap_buffer_bytes": sizing.buffer_bytes,
                 "kernel": kernel_path, "quant_copy": copies.describe(),
                 "nonexpert_precision": opts.nonexpert_quantize or "full"}
    fast = None
    if opts.fast and family.lean_decoder:
        from pcmoe import fast as fast_path

        fast = fast_path.FastDecoder(model, family, native) if fast_path.supports(model) else None
    engine = Engine(model=model, tokenizer=tokenizer, family=family, checkpoint=ckpt, store=store, io=io,
                    layers=layers, scheduler=scheduler, model_bytes=sizes, sizing=sizing, policy=policy,
                    options=opts, expert_norms=norms, load_info=load_info, fast=fast)
    if opts.routing_trace:  # benchmarks only: the engine's load_info says "replayed routing"
        from pcmoe.replay import replay

        replay(engine, opts.routing_trace, opts.routing_trace_seed)
    engine.reset_stats()
    return engine


def _native_kernels(opts: LoadOptions, family, dtype: torch.dtype, banks) -> tuple[object | None, str]:
    """The native kernels for this load and the path taken ("native", or "eager: why"). The banks
    they apply to (bf16 GLU experts with SiLU) are given them; the rest stays eager."""
    if opts.kernel == "eager":
        return None, "eager: asked for"
    from pcmoe import native

    kernels = native.kernels()
    reason = native.why() if kernels is None else None
    if kernels is not None and dtype != torch.bfloat16:
        reason = f"the native kernels are for bfloat16 weights, these are {str(dtype).replace('torch.', '')}"
    if kernels is not None and not family.lean_decoder:
        reason = f"{family.model_types[0]} runs the transformers forward (no lean decoder)"
    if reason is not None:
        if opts.kernel == "native":
            raise PcmoeError(f"--kernel native: {reason}; use --kernel eager or auto")
        if kernels is None:  # not built / unsupported CPU: say so once per load, in one line
            import warnings

            warnings.warn(f"{reason}; using the eager path", PcmoeWarning, stacklevel=3)
        return None, f"eager: {reason}"
    for bank in banks:
        if bank.native_ok():
            bank.native = kernels
    if not kernels.vnni and any(b.native is not None and b.quant for b in banks):
        import warnings

        warnings.warn(native.NO_VNNI, PcmoeWarning, stacklevel=3)
    kernels.set_threads(opts.threads or torch.get_num_threads())
    return kernels, "native"


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


def _expert_norms(ckpt: Checkpoint, store: ExpertStore, num_experts: list[int],
                  opts: LoadOptions) -> list[torch.Tensor]:
    """||E_i|| per layer, streamed from disk once and cached by checkpoint fingerprint."""
    key = ckpt.fingerprint()
    shipped = ckpt.folder / "pcmoe_expert_norms.json"
    cached = qcache.cache_root(opts.cache_dir) / key / "expert_norms.json"
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


