"""Build the tiny model's warm starts and ship them as package data (`algos.models.shipped`).

    python experiments/ship_warm_starts.py                      # gsm8k and arithmetic, trained from scratch
    python experiments/ship_warm_starts.py --tasks arithmetic   # one of them
    python experiments/ship_warm_starts.py --from-cache         # ship what the cache already holds

Each task's warm start is trained from scratch (`algos.models.warm_start.warm_start_tiny` with
``rebuild=True``: the recipe of `algos.models.warm_start.tiny_setup`, its SFT seed, on this machine's
torch) into a temporary cache, then copied with its sha256 manifest into
``algos/models/warm_starts/<name>/``; commit that folder. ``--from-cache`` skips the training and ships
the finished entry of ``--cache-dir`` for the current recipe (trained there if missing). Training
takes, on 2 quiet cores, ~5 min for gsm8k and ~13 min for arithmetic where bf16 autocast runs (AVX512-BF16 /
AMX), and 32 min (measured) and ~67 min (estimated from 95 steps) on an AVX2-only CPU, fp32. Run it on a quiet
machine: a second busy process made the 2-thread SFT 3x slower per step (5 -> 15 s on the arithmetic recipe).

Shipped so far: gsm8k (2026-12-05, AMD EPYC AVX2, fp32, 2 threads, 1,939 s) and arithmetic (2026-12-05, Intel
Xeon with AMX, bf16 autocast, 2 threads, 594 s, final SFT loss 0.080).

Rerun it whenever the recipe changes (data, tokenizer, model shape, SFT hyper-parameters, the
warm-start format): runs then find no shipped warm start with their recipe and train one themselves,
which is slow but correct; ``tests/test_shipped_warm_starts.py`` fails until the shipped ones match.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro

from algos.models.shipped import SHIPPED_DIR, ship
from algos.models.warm_start import warm_start_tiny
from langenv.tasks import make_task


@dataclass
class Args:
    tasks: list[str] = field(default_factory=lambda: ["gsm8k", "arithmetic"])
    """Tasks whose tiny warm start to ship."""
    from_cache: bool = False
    """Ship the warm start already in ``cache_dir`` (trained there first if missing) instead of
    training a fresh one in a temporary cache."""
    cache_dir: Path = Path.home() / ".cache" / "langenv"
    """The cache ``--from-cache`` reads."""
    shipped_dir: Path = SHIPPED_DIR
    """Where the shipped warm starts go (the package folder)."""


def main(args: Args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.tasks:
        task = make_task(name)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="langenv-ship-") as tmp:
            cache = args.cache_dir if args.from_cache else Path(tmp)
            # shipped_dir is not consulted: a fresh build must not copy the previous shipped one
            path = warm_start_tiny(task, cache, rebuild=not args.from_cache, shipped_dir=None)
            target = ship(path, args.shipped_dir)
        manifest = json.loads((target / "shipped.json").read_text(encoding="utf-8"))
        size = sum((target / f).stat().st_size for f in manifest["files"])
        print(f"{name}: shipped {target} ({size / 2**20:.1f} MiB, {len(manifest['files'])} files, "
              f"final SFT loss {manifest['built']['final_loss']:.4f}) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main(tyro.cli(Args))
