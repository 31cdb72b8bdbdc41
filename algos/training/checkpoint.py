"""Crash-safe, resumable training checkpoints.

Layout of a run directory's ``checkpoints/``::

    checkpoints/
      iter-000004/              one complete checkpoint (never modified after its rename)
        policy/                 the policy and tokenizer in Hugging Face format (loadable on its own)
        algorithm.pt            the algorithm's ``state_dict()``: optimiser, LR schedule, critic, ...
        trainer_state.pt        iteration, running totals, RNG states, evaluation results, wandb id
      iter-000008/
      latest                    text file naming the newest complete checkpoint ("iter-000008")

A run with ``--sharding fsdp`` adds ``sharded/`` to each checkpoint: the FSDP2-sharded models and
optimisers of the algorithm's ``trainables()`` in ``torch.distributed.checkpoint`` (DCP) format, one
file per rank plus ``.metadata`` (`save_sharded`, `load_sharded`); ``algorithm.pt`` then holds only
the unsharded rest (LR schedules, ...), and ``policy/`` is the consolidated policy, as always.

A checkpoint is written into ``.iter-NNNNNN.tmp/`` beside its final place, every file is fsynced,
and the directory is renamed into place (`os.replace`, atomic on one filesystem); only then is
``latest`` rewritten (write ``latest.tmp``, fsync, rename) and only after that are older
checkpoints rotated away. A crash or SIGKILL at any point leaves the previous checkpoint and
``latest`` untouched; a stale ``.tmp`` directory is never read and is removed by the next save.
This follows transformers PR #27820 (staging directory renamed at the end) and verl's tracker file
written last (verl ``utils/checkpoint/checkpoint_handler.py``), with rotation after the new save
succeeds (verl ``test_max_ckpt_1_preserves_existing_before_save``).

Everything is stored as tensors, numbers, strings, lists and dicts so it loads with the default
``torch.load(weights_only=True)``: the NumPy RNG state is converted (a pickled NumPy tuple would
be rejected by ``weights_only``; redai-studio/Relax#317).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = [
    "SHARDED_DIR",
    "Checkpoint",
    "CheckpointError",
    "checkpoint_name",
    "latest_checkpoint",
    "load_checkpoint",
    "load_sharded",
    "rng_state",
    "save_checkpoint",
    "save_sharded",
    "set_rng_state",
    "state_fingerprint",
]

LATEST = "latest"
POLICY_DIR = "policy"
ALGORITHM_FILE = "algorithm.pt"
TRAINER_FILE = "trainer_state.pt"
SHARDED_DIR = "sharded"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path and what is intact."""


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk.

    Attributes:
        path: its directory (``.../checkpoints/iter-NNNNNN``).
        iteration: training iterations completed when it was written.
    """

    path: Path
    iteration: int

    @property
    def policy_dir(self) -> Path:
        return self.path / POLICY_DIR

    @property
    def sharded_dir(self) -> Path:
        """The DCP directory of a ``--sharding fsdp`` run (absent otherwise)."""
        return self.path / SHARDED_DIR

    def trainer_state(self) -> dict[str, Any]:
        return _load(self.path / TRAINER_FILE)

    def algorithm_state(self) -> dict[str, Any]:
        return _load(self.path / ALGORITHM_FILE)


def checkpoint_name(iteration: int) -> str:
    return f"iter-{iteration:06d}"


# ----------------------------------------------------------------------------------------------
# RNG state: python, numpy (legacy global), torch (CPU and CUDA), plus named torch.Generators


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG a run draws from, as ``weights_only``-loadable values."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what `rng_state` captured (and the named generators given)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointError(f"checkpoint holds no state for the RNG {name!r} (has {sorted(state['generators'])})")
        g.set_state(state["generators"][name])


def state_fingerprint(model) -> str:
    """sha256 over a model's parameter and buffer names, shapes, dtypes and bytes (hex)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# writing


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(
    root: Path,
    iteration: int,
    *,
    save_policy: Callable[[Path], None],
    algorithm_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int = 2,
    save_extra: Callable[[Path], None] | None = None,
) -> Checkpoint:
    """Write checkpoint ``iteration`` under ``root`` (a run's ``checkpoints/``) crash-safely.

    Args:
        save_policy: writes the policy (and tokenizer) in Hugging Face format into the directory given.
        algorithm_state / trainer_state: saved with ``torch.save`` (must be ``weights_only``-loadable).
        keep: complete checkpoints kept after this one is in place (>= 1); older ones are deleted.
        save_extra: optional, writes anything else into the checkpoint directory (e.g. PPO's critic
            in Hugging Face format).
    Returns:
        The new `Checkpoint`.
    Raises:
        CheckpointError: any OSError while writing (disk full, permissions); the staging directory
            is removed, and the message names the previous checkpoint, which is untouched.
    """
    if keep < 1:
        raise ValueError(f"keep: expected >= 1, got {keep}")
    root = Path(root)
    name = checkpoint_name(iteration)
    final = root / name
    tmp = root / f".{name}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".iter-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        save_policy(tmp / POLICY_DIR)
        torch.save(algorithm_state, tmp / ALGORITHM_FILE)
        torch.save(trainer_state, tmp / TRAINER_FILE)
        if save_extra is not None:
            save_extra(tmp)
        _fsync_tree(tmp)
        if final.exists():  # rewriting the same iteration (e.g. after a resume): move the old one aside first
            old = root / f".{name}.old.tmp"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        _write_text_atomic(root / LATEST, name + "\n")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root.parent, required=False)
        kept = f"the previous checkpoint {previous.path} is intact" if previous else "no earlier checkpoint exists"
        what = "disk full" if exc.errno == errno.ENOSPC else type(exc).__name__
        raise CheckpointError(f"could not write checkpoint for iteration {iteration} to {final} ({what}: {exc}); "
                              f"{kept}") from exc
    for old in _complete(root)[:-keep]:
        if old.path != final:
            shutil.rmtree(old.path, ignore_errors=True)
    return Checkpoint(final, iteration)


# ----------------------------------------------------------------------------------------------
# sharded state (torch.distributed.checkpoint)


def _sharded_state(trainables: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {name: {"model": get_model_state_dict(module), "optim": get_optimizer_state_dict(module, optimizer)}
            for name, (module, optimizer) in trainables.items()}


def save_sharded(path: Path, trainables: dict[str, tuple[Any, Any]]) -> None:
    """Save FSDP2-sharded modules and their optimisers into the directory ``path`` with
    ``torch.distributed.checkpoint.save`` (every rank writes its shards; rank 0 the metadata).
    Collective: every rank calls it with the same names.

    Args:
        trainables: ``{name: (module, optimizer)}``, the algorithm's ``trainables()``; state dicts
            come from ``get_model_state_dict`` / ``get_optimizer_state_dict`` (parameter names, not
            optimiser indices, so they load into freshly built modules).
    Raises:
        CheckpointError: a write failed (the caller's staging directory is not renamed into place).
    """
    import torch.distributed.checkpoint as dcp

    try:
        dcp.save(_sharded_state(trainables), checkpoint_id=str(path))
    except Exception as exc:  # DCP wraps per-rank OSErrors in its own CheckpointException
        raise CheckpointError(f"could not write the sharded state to {path} ({type(exc).__name__}: {exc})") from exc


def load_sharded(path: Path, trainables: dict[str, tuple[Any, Any]]) -> None:
    """Load what `save_sharded` wrote into the (already sharded) modules and optimisers, in place
    (``dcp.load`` then ``set_model_state_dict`` / ``set_optimizer_state_dict``). Collective.

    Raises:
        CheckpointError: ``path`` is missing, or holds other names or shapes than ``trainables``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not (Path(path) / ".metadata").is_file():
        raise CheckpointError(f"{path}: no sharded state (.metadata missing); a checkpoint written without "
                              f"--sharding fsdp cannot be resumed with it, nor the other way round")
    state = _sharded_state(trainables)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as exc:
        raise CheckpointError(f"could not read the sharded state in {path} ({type(exc).__name__}: {exc}); "
                              f"was it written by the same algorithm and model?") from exc
    for name, (module, optimizer) in trainables.items():
        set_model_state_dict(module, state[name]["model"])
        set_optimizer_state_dict(module, optimizer, state[name]["optim"])


# ----------------------------------------------------------------------------------------------
# reading


def _complete(root: Path) -> list[Checkpoint]:
    """Complete checkpoints under ``root`` (renamed into place, with every file), oldest first."""
    found = []
    for path in root.glob("iter-*"):
        try:
            iteration = int(path.name.split("-", 1)[1])
        except ValueError:
            continue
        if path.is_dir() and (path / TRAINER_FILE).is_file() and (path / ALGORITHM_FILE).is_file():
            found.append(Checkpoint(path, iteration))
    return sorted(found, key=lambda c: c.iteration)


def latest_checkpoint(run_dir: Path, required: bool = True) -> Checkpoint | None:
    """The newest complete checkpoint of a run: the one ``checkpoints/latest`` names, else (the
    pointer missing or naming a directory that is gone) the highest-numbered complete one.

    Raises:
        CheckpointError: ``required`` and the run has no complete checkpoint.
    """
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        named = [c for c in _complete(root) if c.path.name == name]
        if named:
            return named[0]
    complete = _complete(root)
    if complete:
        return complete[-1]
    if required:
        raise CheckpointError(f"{root} holds no complete checkpoint to resume from (runs save one every --save-every "
                              f"iterations, on SIGTERM/SIGINT and at the end)")
    return None


def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu")
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint file missing: {path}") from exc
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"checkpoint file {path} could not be read ({type(exc).__name__}: {exc})") from exc


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """The checkpoint ``--resume`` continues from (see `latest_checkpoint`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume: run directory not found: {run_dir}")
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None
    return ckpt
