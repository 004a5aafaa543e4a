"""Write the quantised expert copies of a checkpoint ahead of use (pcmoe.qcache), without
loading the model: what a first quantised load would do, done before (e.g.) a bench.

    python -m pcmoe.qcache_build <checkpoint> [--quantize int8,int4] [--dtype auto] [--quiet]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pcmoe.checkpoint import Checkpoint, CheckpointError, read_config_dict
from pcmoe.loader import _layout, _progress
from pcmoe.models import load_family
from pcmoe.options import LoadOptions, PcmoeError
from pcmoe.qcache import Copies, ensure
from pcmoe.store import ExpertStore


def build(model: str | os.PathLike, modes: list[str], dtype: str = "auto", cache_dir=None,
          progress: bool = True) -> dict[str, Copies]:
    """Write (or find) the copies of every MoE layer of a checkpoint at each precision."""
    folder = Path(model)
    config = read_config_dict(folder)
    family = load_family(folder, config)
    ckpt = Checkpoint(folder, config)
    out = {}
    try:
        for mode in modes:
            lay = _layout(folder, ckpt, family, LoadOptions(dtype=dtype, quantize=mode))
            out[mode] = ensure(ckpt, ExpertStore(ckpt, lay.pieces), family.kernel(), lay.dtype, lay.quants,
                               cache_dir=cache_dir, progress=lambda it, desc: _progress(it, desc, progress))
    finally:
        ckpt.close()
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pcmoe.qcache_build",
                                 description="Write the int8/int4 expert copies of a checkpoint ahead of use.")
    ap.add_argument("model", help="checkpoint folder")
    ap.add_argument("--quantize", default="int8,int4", help="comma-separated precisions (int8, int4)")
    ap.add_argument("--dtype", default="auto", help="the load dtype the copies are for (auto = as stored)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    modes = [m for m in args.quantize.split(",") if m]
    bad = [m for m in modes if m not in ("int8", "int4")]
    if bad or not modes:
        print(f"error: --quantize takes int8 and/or int4 (got {args.quantize!r})", file=sys.stderr)
        return 2
    try:
        done = build(args.model, modes, args.dtype, progress=not args.quiet)
    except (PcmoeError, CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for mode, copies in done.items():
        print(f"{mode}: {copies.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
