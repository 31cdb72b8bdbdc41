"""Run control around the training loop (`algos.training.loop.train`): the run directory, resuming,
signals, the non-finite update guard, and what several data-parallel processes share.

Kept apart from the loop so `trainer.py` reads top to bottom; nothing here knows an algorithm.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from algos.training.distributed import Dist

__all__ = ["NonFiniteUpdatesError", "TrainingInterrupted", "StopRequests", "prepare_out", "start_out",
           "config_differences", "RESUMABLE_CHANGES", "EVALUATIONS", "read_metrics", "nonfinite_streak", "on_main_first",
           "combine_ranks", "seed_everything"]


def prepare_out(run, algo_name: str) -> Path:
    """The run directory, checked (and created if missing, but nothing written into it) before
    anything slow happens.

    Raises:
        FileExistsError: it already holds a run (metrics.jsonl) and neither ``--resume`` nor
            ``--overwrite`` was given (nothing in it is touched).
        PermissionError: it cannot be created or written.
        ValueError: ``--resume`` and ``--out`` name different directories.
    """
    if run.resume is not None:
        if run.out is not None and Path(run.out).resolve() != Path(run.resume).resolve():
            raise ValueError(f"--resume {run.resume} and --out {run.out} differ; a resumed run continues in its own "
                             f"directory (drop --out)")
        out = Path(run.resume)
        if not (out / "config.json").is_file():
            raise FileNotFoundError(f"--resume: {out} is not a run directory (no config.json)")
    else:
        out = run.out or Path("runs") / f"{algo_name}-{run.task}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (out / "metrics.jsonl").exists() and not run.overwrite:
            raise FileExistsError(f"{out} already holds a run (metrics.jsonl); continue it with --resume {out}, "
                                  f"start over with --overwrite, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except PermissionError as exc:
        raise PermissionError(f"run directory {out} cannot be created: {exc.strerror}") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"run directory {out} is not writable")
    return out


#: Per-problem results of every evaluation (`algos.training.loop.train` writes it).
EVALUATIONS = "evaluations.jsonl"


def start_out(out: Path) -> None:
    """Clear what an earlier run left in ``out`` (``--overwrite``) and start an empty metrics file;
    called only once the model, tokenizer and prompts have passed their checks."""
    for name in ("metrics.jsonl", "summary.json", EVALUATIONS):
        (out / name).unlink(missing_ok=True)
    for name in ("checkpoints", "final"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "metrics.jsonl").write_text("")


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Settings that differ between a run's saved config.json and the resumed one."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


# Settings that may change on --resume without breaking exactness.
RESUMABLE_CHANGES = {"run.iterations", "run.resume", "run.out", "run.overwrite", "run.wandb", "run.device",
                     "run.stop_after"}


def read_metrics(path: Path, upto: int) -> list[str]:
    """The lines of ``metrics.jsonl`` (or of `EVALUATIONS`) for iterations ``<= upto`` (a crashed run may have logged rows
    after its last checkpoint; they are dropped so the resumed run writes each iteration once).

    Raises:
        ValueError: a line other than the last is not a JSON object with an integer ``iteration``
            (file:line named); a torn last line (a crash mid-write) is dropped.
    """
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    keep = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            iteration = int(json.loads(line)["iteration"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not a metrics row ({type(exc).__name__}: {exc})") from exc
        if iteration <= upto:
            keep.append(line)
    return keep


class StopRequests:
    """SIGTERM / SIGINT during training: the first asks the loop to finish the current iteration,
    write a checkpoint and exit (code 128 + signal); a second one abandons the iteration at once
    (KeyboardInterrupt; the last checkpoint on disk is intact). Installed only in the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: abandoning the current iteration")
        self.signum = signum
        print(f"[langenv] {signal.Signals(signum).name} received: finishing this iteration, then writing a checkpoint "
              f"and stopping (send it again to stop at once)", file=sys.stderr, flush=True)


class NonFiniteUpdatesError(RuntimeError):
    """Too many optimiser steps in a row were skipped for a NaN/inf loss or gradient."""


class TrainingInterrupted(SystemExit):
    """Raised after a SIGTERM/SIGINT once the checkpoint is written; its code is 128 + the signal."""


def nonfinite_streak(streak: int, metrics: dict[str, float]) -> int:
    """Consecutive skipped (non-finite) mini-batches after this iteration's update: the run's streak
    grows by this iteration's count when it made no optimiser step, else restarts from the
    non-finite mini-batches at the end of its update (``update/nonfinite_trailing``)."""
    bad = int(metrics.get("update/nonfinite_minibatches", 0))
    if metrics.get("update/optimizer_steps", 0) == 0:
        return streak + bad
    return int(metrics.get("update/nonfinite_trailing", 0))


def on_main_first(dist: Dist, fn: Callable[[], Any], share: bool = False) -> Any:
    """``fn()`` on rank 0 first (it may create files the others then read), then on the other
    ranks — or, with ``share``, rank 0's result sent to them instead. With one process just
    ``fn()``. An error on rank 0 is raised on every rank."""
    if dist.world_size == 1:
        return fn()
    result, error = None, None
    if dist.is_main:
        try:
            result = fn()
        except Exception as exc:  # re-raised on every rank below
            error = exc
    failed, shared = dist.broadcast_object((None if error is None else f"{type(error).__name__}: {error}",
                                            result if share else None))
    if error is not None:
        raise error
    if failed is not None:
        raise RuntimeError(f"rank 0 failed during setup: {failed}")
    if dist.is_main:
        return result
    return shared if share else fn()


def combine_ranks(dist: Dist, metrics: dict[str, float]) -> dict[str, float]:
    """One metrics row for the whole group: counts (``tokens/``, ``grading/``) summed over ranks,
    everything else averaged (ranks hold equal shards; ``update/`` statistics are already global)."""
    if dist.world_size == 1:
        return metrics
    rows = dist.all_gather_object(metrics)
    combined = {}
    for key in rows[0]:
        values = [r[key] for r in rows if key in r]
        if key.startswith(("tokens/", "grading/")):
            combined[key] = float(sum(values))
        else:
            combined[key] = float(sum(values) / len(values))
    return combined


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
