"""pcmoe's own small vision MoE: a ViT whose every MLP is a sparse MoE block, for Fashion-MNIST.

Dimension legend:  B images, C channels, S tokens per image, H hidden size, T = B*S tokens,
N experts, I expert intermediate size, k experts per token, D head dim.

Saved like a Hugging Face checkpoint (config.json + model.safetensors). Experts are trained as
fused tensors (`gate_up_proj [N, 2I, H]`, `down_proj [N, H, I]`) and saved as per-expert
`<block>.experts.<e>.{gate,up,down}_proj.weight`, the layout pcmoe's expert store reads one expert
at a time; every other tensor keeps its `state_dict()` name. Through `VitMoeFamily` the engine
treats this model exactly like the language families (same committee, store and scheduler).

The model takes pixel values in [0, 1] ([B, 1, 28, 28]) and normalises them itself.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pcmoe.models.activations import activation
from pcmoe.models.base import Family

MODEL_TYPE = "pcmoe_vit_moe"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")


@dataclass
class VitMoeConfig:
    image_size: int = 28
    channels: int = 1
    patch_size: int = 4            # token stride of the conv stem (two stride-2 convs): 7x7 tokens
    stem_channels: int = 32
    hidden_size: int = 64
    num_layers: int = 4            # every layer's MLP is a MoE block
    num_heads: int = 4
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    norm_topk_prob: bool = True    # renormalise the top-k probabilities (as Qwen3-MoE)
    hidden_act: str = "silu"
    num_classes: int = 10
    layer_norm_eps: float = 1e-6
    pixel_mean: float = 0.2860     # Fashion-MNIST train statistics of [0, 1] pixels
    pixel_std: float = 0.3530
    router_aux_loss_coef: float = 0.01
    id2label: dict = field(default_factory=lambda: {str(i): c for i, c in enumerate(CLASSES)})
    model_type: str = MODEL_TYPE

    def __post_init__(self):
        if self.model_type != MODEL_TYPE:
            raise ValueError(f"model_type must be {MODEL_TYPE!r}, not {self.model_type!r}")
        if self.patch_size != 4 or self.image_size % 4:
            raise ValueError("the conv stem has a token stride of 4: patch_size must be 4, image_size a multiple")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, data: dict) -> VitMoeConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})  # drops HF extras (architectures, ...)

    def to_dict(self) -> dict:
        return {"architectures": ["VitMoeForImageClassification"], **asdict(self)}


@dataclass
class VitMoeOutput:
    logits: torch.Tensor                                   # [B, num_classes]
    router_logits: tuple[torch.Tensor, ...] | None = None  # per layer [T, N], when asked for


# ------------------------------------------------------------------------------------------------
# Modules


class VitMoeExperts(nn.Module):
    """N SiLU-GLU experts as fused tensors (the training layout; the engine replaces this module)."""

    def __init__(self, config: VitMoeConfig):
        super().__init__()
        N, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.randn(N, 2 * I, H) * H**-0.5)
        self.down_proj = nn.Parameter(torch.randn(N, H, I) * I**-0.5 / config.num_layers**0.5)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], idx [T, k], weights [T, k] -> [T, H]; the same gather/index_add as SlotExperts."""
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok, pos = torch.where(idx == e)                                    # [t_e]
            gate, up = F.linear(x[tok], self.gate_up_proj[e]).chunk(2, dim=-1)  # [t_e, I] each
            h = F.linear(self.act(gate) * up, self.down_proj[e])                # [t_e, H]
            out.index_add_(0, tok, h * weights[tok, pos, None])
        return out


class VitMoeSparseBlock(nn.Module):
    """Router (softmax top-k, optional renormalisation) + experts: [B, S, H] -> [B, S, H]."""

    def __init__(self, config: VitMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = VitMoeExperts(config)

    def forward(self, hidden_states: torch.Tensor, router_logits: list | None = None) -> torch.Tensor:
        shape = hidden_states.shape                                             # [B, S, H]
        x = hidden_states.reshape(-1, shape[-1])                                # [T, H]
        logits = self.gate(x)                                                   # [T, N]
        if router_logits is not None:  # for the load-balancing loss; the engine's block ignores it
            router_logits.append(logits)
        probs = torch.softmax(logits.float(), dim=-1)                           # [T, N]
        top, idx = torch.topk(probs, self.top_k, dim=-1)                        # [T, k]
        if self.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return self.experts(x, idx, top.to(x.dtype)).reshape(shape)


class VitMoeAttention(nn.Module):
    def __init__(self, config: VitMoeConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # [B, heads, S, D] each
        y = F.scaled_dot_product_attention(q, k, v)                             # [B, heads, S, D]
        return self.proj(y.transpose(1, 2).reshape(B, S, H))


class VitMoeLayer(nn.Module):
    """Pre-norm transformer layer; the residual is added here, outside the MoE block."""

    def __init__(self, config: VitMoeConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VitMoeAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VitMoeSparseBlock(config)

    def forward(self, x: torch.Tensor, router_logits: list | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x), router_logits)


class VitMoeEncoder(nn.Module):
    def __init__(self, config: VitMoeConfig):
        super().__init__()
        self.layers = nn.ModuleList(VitMoeLayer(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class VitMoeForImageClassification(nn.Module):
    def __init__(self, config: VitMoeConfig):
        super().__init__()
        self.config = config
        c, H = config.stem_channels, config.hidden_size
        # Two overlapping stride-2 convs instead of a linear patchify: better on small data.
        self.stem = nn.Sequential(nn.Conv2d(config.channels, c, 3, stride=2, padding=1), nn.GELU(),
                                  nn.Conv2d(c, H, 3, stride=2, padding=1))
        self.pos_embed = nn.Parameter(torch.randn(1, config.num_tokens, H) * 0.02)
        self.encoder = VitMoeEncoder(config)
        self.classifier = nn.Linear(H, config.num_classes)

    def forward(self, pixel_values: torch.Tensor, output_router_logits: bool = False) -> VitMoeOutput:
        """pixel_values [B, C, 28, 28] in [0, 1] -> logits [B, num_classes]."""
        c = self.config
        x = (pixel_values.to(self.pos_embed.dtype) - c.pixel_mean) / c.pixel_std
        x = self.stem(x).flatten(2).transpose(1, 2) + self.pos_embed            # [B, S, H]
        router_logits = [] if output_router_logits else None
        for layer in self.encoder.layers:
            x = layer(x, router_logits)
        x = self.encoder.norm(x).mean(dim=1)                                    # [B, H]
        return VitMoeOutput(self.classifier(x), tuple(router_logits) if router_logits is not None else None)


class VitMoeFamily(Family):
    """The registry entry: Qwen3-style softmax top-k routing over per-expert GLU experts; the model
    and its config are pcmoe's own, not transformers'."""

    model_types = (MODEL_TYPE,)
    block_classes = ("VitMoeSparseBlock",)
    router_attr = "gate"
    tiny_config = dict(model_type=MODEL_TYPE, hidden_size=32, num_layers=2, num_heads=2, num_experts=8,
                       num_experts_per_tok=2, moe_intermediate_size=16, stem_channels=8)

    @classmethod
    def load_config(cls, folder, config_dict: dict):
        return VitMoeConfig.from_dict(config_dict)

    @classmethod
    def make_config(cls, **kwargs):
        return VitMoeConfig.from_dict(kwargs)

    def build(self, dtype: torch.dtype):
        return VitMoeForImageClassification(self.config).to(dtype)


# ------------------------------------------------------------------------------------------------
# Checkpoint files


def save_pretrained(model: VitMoeForImageClassification, folder: str | os.PathLike,
                    dtype: torch.dtype | None = None) -> None:
    """Write config.json + model.safetensors (per-expert tensors) atomically: tmp folder, rename."""
    from safetensors.torch import save_file

    folder = Path(folder)
    I = model.config.moe_intermediate_size
    tensors = {}
    for key, value in model.state_dict().items():
        value = value.detach().to(dtype or value.dtype)
        prefix, _, name = key.rpartition(".experts.")
        if name == "gate_up_proj":                                              # [N, 2I, H]
            for e, w in enumerate(value):
                tensors[f"{prefix}.experts.{e}.gate_proj.weight"] = w[:I].contiguous()
                tensors[f"{prefix}.experts.{e}.up_proj.weight"] = w[I:].contiguous()
        elif name == "down_proj":                                               # [N, H, I]
            for e, w in enumerate(value):
                tensors[f"{prefix}.experts.{e}.down_proj.weight"] = w.contiguous()
        else:
            tensors[key] = value.contiguous()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "model.safetensors").chmod(0o644)  # save_file creates it owner-only
    if (folder / "README.md").exists():  # keep the model card when re-exporting
        shutil.copy2(folder / "README.md", tmp / "README.md")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def from_pretrained(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> VitMoeForImageClassification:
    """Plain full load (every expert in memory): the slow twin the engine is checked against."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = VitMoeConfig.from_dict(json.loads((folder / "config.json").read_text()))
    tensors = load_file(folder / "model.safetensors")
    state = {k: v for k, v in tensors.items() if ".experts." not in k}
    for i in range(config.num_layers):
        pre = f"encoder.layers.{i}.mlp.experts."
        per = [[tensors[f"{pre}{e}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")]
               for e in range(config.num_experts)]
        state[pre + "gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u, _ in per])
        state[pre + "down_proj"] = torch.stack([d for _, _, d in per])
    model = VitMoeForImageClassification(config)
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# Data: Fashion-MNIST (IDX files) and a frame stream with temporal locality


def load_fashion_mnist(split: str = "test", folder: str | os.PathLike | None = None):
    """(images [M, 28, 28] uint8, labels [M] int64) of the "train" or "test" (t10k) split; a
    one-line PcmoeError for a folder that does not hold them readable."""
    from pcmoe.options import PcmoeError

    root = Path(folder) if folder else FASHION_MNIST
    stem = "train" if split == "train" else "t10k"
    paths = [root / f"{stem}-images-idx3-ubyte.gz", root / f"{stem}-labels-idx1-ubyte.gz"]
    where = (f"pass the folder that holds Fashion-MNIST's {paths[0].name} and {paths[1].name}, or install the "
             "Debian package dataset-fashion-mnist")
    if root.exists() and not root.is_dir():
        raise PcmoeError(f"{root} is a file; {where}")
    if not root.is_dir():
        raise PcmoeError(f"{root} does not exist; {where}")
    for p in paths:
        if not p.is_file():
            raise PcmoeError(f"{root} has no {p.name}; {where}")
    images = _read_idx(paths[0], 0x0803, (28, 28))
    labels = _read_idx(paths[1], 0x0801, ()).astype(np.int64)
    if len(images) != len(labels) or not len(images):
        raise PcmoeError(f"{root}: {len(images)} images but {len(labels)} labels; re-download the files")
    if labels.max() >= len(CLASSES):
        raise PcmoeError(f"{paths[1]}: label {labels.max()} is not a Fashion-MNIST class (0..{len(CLASSES) - 1})")
    return images, labels


def _read_idx(path: Path, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """One gzipped IDX file of unsigned bytes (big-endian header: magic, count, then dimensions)."""
    import zlib

    from pcmoe.options import PcmoeError

    try:
        with gzip.open(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated, unreadable
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise PcmoeError(f"cannot read {path}: {reason}") from None
    header = 4 * (2 + len(item_shape))
    head = [int(v) for v in np.frombuffer(data[:header], dtype=">u4")] if len(data) >= header else [0, 0]
    item = int(np.prod(item_shape, dtype=np.int64))
    if head[0] != magic or tuple(head[2:]) != item_shape or len(data) != header + head[1] * item:
        raise PcmoeError(f"{path} is not a Fashion-MNIST IDX file (wrong header or length); re-download it")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(-1, *item_shape)


def shift_images(images: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Translate each image [M, h, w] by (dy, dx) pixels with zero fill (no wrap-around)."""
    M, h, w = images.shape
    m = int(max(np.abs(dy).max(initial=0), np.abs(dx).max(initial=0)))
    padded = np.pad(images, ((0, 0), (m, m), (m, m)))
    rows = (m - dy)[:, None] + np.arange(h)[None, :]                            # [M, h]
    cols = (m - dx)[:, None] + np.arange(w)[None, :]                            # [M, w]
    return padded[np.arange(M)[:, None, None], rows[:, :, None], cols[:, None, :]]


def frame_stream(images: np.ndarray, labels: np.ndarray, frames: int, seed: int = 0,
                 run_lengths: tuple[int, int] = (20, 120), max_shift: int = 2,
                 noise: float = 0.05) -> Iterator[tuple[torch.Tensor, int]]:
    """Yield `frames` (pixels [1, 1, 28, 28] in [0, 1], label) with temporal locality, like a camera
    watching one kind of object at a time: runs of same-class frames (length uniform in
    `run_lengths`, the class differing from the previous run's), each frame a random image of that
    class, shifted by up to `max_shift` pixels, plus Gaussian noise. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
    made, label = 0, -1
    while made < frames:
        label = int(rng.choice([c for c in range(len(by_class)) if c != label and len(by_class[c])]))
        n = min(int(rng.integers(run_lengths[0], run_lengths[1] + 1)), frames - made)
        picks = rng.choice(by_class[label], size=n)
        shifts = rng.integers(-max_shift, max_shift + 1, size=(2, n))
        pixels = shift_images(images[picks], shifts[0], shifts[1]).astype(np.float32) / 255.0
        pixels = np.clip(pixels + rng.normal(0.0, noise, pixels.shape).astype(np.float32), 0.0, 1.0)
        for frame in pixels:
            yield torch.from_numpy(frame)[None, None], label
        made += n


@torch.inference_mode()
def evaluate_stream(engine, data=None, frames: int = 2000, seed: int = 0, progress: bool = True) -> dict:
    """Accuracy over a Fashion-MNIST test frame stream, one frame per forward (batch 1); each frame
    is one input for the committee scheduler. `data`: the IDX folder (None: the installed copy), or
    the (images, labels) load_fashion_mnist returned."""
    from pcmoe.options import PcmoeError

    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
        raise PcmoeError(f"frames must be at least 1 (got {frames!r})")
    images, labels = data if isinstance(data, tuple) else load_fashion_mnist("test", data)
    stream = frame_stream(images, labels, frames, seed)
    if progress:
        from tqdm import tqdm

        stream = tqdm(stream, total=frames, desc="frames", unit="frame", leave=False, dynamic_ncols=True)
    correct = count = 0
    t0 = time.perf_counter()
    try:
        for frame, label in stream:
            engine.begin_input()
            logits = engine.model(pixel_values=frame).logits                  # [1, classes]
            correct += int(logits[0].argmax()) == label
            count += 1
    finally:
        engine.end_input()
    seconds = time.perf_counter() - t0
    return {"accuracy": correct / max(count, 1), "frames": count, "correct": correct, "seconds": seconds,
            "frames_per_s": count / seconds if seconds > 0 else 0.0, "stream_seed": seed}
