"""Crash-safe checkpoints (`algos.training.checkpoint`): atomic rename, `latest` written last, rotation after
success, a full disk and a SIGKILL mid-write leave the previous checkpoint loadable."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from algos.config import with_fields
from algos.training import checkpoint as ck

REPO = Path(__file__).resolve().parent.parent


def write(root: Path, iteration: int, keep: int = 2, payload: float = 0.0) -> ck.Checkpoint:
    def save_policy(path: Path) -> None:
        path.mkdir()
        (path / "weights.txt").write_text(f"{payload}")

    return ck.save_checkpoint(root, iteration, save_policy=save_policy, keep=keep,
                              algorithm_state={"w": torch.full((3,), payload)},
                              trainer_state={"iteration": iteration, "rng": ck.rng_state()})


def test_save_rotate_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for it in (2, 4, 6):
        write(root, it, payload=float(it))
    names = sorted(p.name for p in root.iterdir())
    assert names == ["iter-000004", "iter-000006", "latest"]
    latest = ck.latest_checkpoint(tmp_path)
    assert latest.iteration == 6 and latest.trainer_state()["iteration"] == 6
    assert torch.equal(latest.algorithm_state()["w"], torch.full((3,), 6.0))
    assert (latest.policy_dir / "weights.txt").read_text() == "6.0"


def test_rewriting_the_same_iteration_replaces_it(tmp_path):
    root = tmp_path / "checkpoints"
    write(root, 2, payload=1.0)
    write(root, 2, payload=2.0)
    assert torch.equal(ck.latest_checkpoint(tmp_path).algorithm_state()["w"], torch.full((3,), 2.0))
    assert sorted(p.name for p in root.iterdir()) == ["iter-000002", "latest"]


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    write(root, 2, keep=1, payload=2.0)
    real_save = torch.save

    def full_disk(obj, path, *a, **k):
        if str(path).endswith(ck.TRAINER_FILE):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(ck.CheckpointError, match=r"disk full.*iter-000002 is intact") as info:
        write(root, 4, keep=1, payload=4.0)
    assert "iteration 4" in str(info.value)
    assert sorted(p.name for p in root.iterdir()) == ["iter-000002", "latest"]  # no staging dir, no rotation
    latest = ck.latest_checkpoint(tmp_path)
    assert latest.iteration == 2 and torch.equal(latest.algorithm_state()["w"], torch.full((3,), 2.0))


def test_sigkill_during_a_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from algos.training import checkpoint as ck
        root = Path({str(tmp_path / "checkpoints")!r})
        def policy(payload, hang):
            def save(path):
                path.mkdir()
                with open(path / "weights.bin", "wb") as f:
                    f.write(b"x" * 1000)
                    f.flush()
                    if hang:
                        print("WRITING", flush=True)
                        time.sleep(600)
            return save
        ck.save_checkpoint(root, 1, save_policy=policy(1, False), algorithm_state={{"w": torch.ones(2)}},
                           trainer_state={{"iteration": 1}})
        ck.save_checkpoint(root, 2, save_policy=policy(2, True), algorithm_state={{"w": torch.zeros(2)}},
                           trainer_state={{"iteration": 2}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "WRITING", proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    root = tmp_path / "checkpoints"
    assert (root / ".iter-000002.tmp").is_dir()  # the torn write is there, but never read
    latest = ck.latest_checkpoint(tmp_path)
    assert latest.iteration == 1 and torch.equal(latest.algorithm_state()["w"], torch.ones(2))
    write(root, 3)  # the next save clears the torn staging directory
    assert not (root / ".iter-000002.tmp").exists()


def test_rng_state_round_trips_through_default_torch_load(tmp_path):
    gen = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in the legacy state
    torch.save(ck.rng_state({"g": gen}), tmp_path / "rng.pt")

    def draw():
        return (random.random(), float(np.random.standard_normal()), float(torch.rand(1)),
                float(torch.rand(1, generator=gen)))

    first = draw()
    state = torch.load(tmp_path / "rng.pt")  # weights_only=True by default
    ck.set_rng_state(state, {"g": gen})
    assert draw() == first


def test_latest_pointer_naming_a_missing_directory_falls_back_to_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    write(root, 2)
    write(root, 4)
    (root / "latest").write_text("iter-000009\n")
    assert ck.latest_checkpoint(tmp_path).iteration == 4


def test_missing_run_directory_and_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ck.CheckpointError, match="run directory not found"):
        ck.load_checkpoint(tmp_path / "nope")
    with pytest.raises(ck.CheckpointError, match="no complete checkpoint"):
        ck.load_checkpoint(tmp_path)


def test_truncated_checkpoint_file_names_the_file(tmp_path):
    root = tmp_path / "checkpoints"
    latest = write(root, 2)
    path = latest.path / ck.TRAINER_FILE
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ck.CheckpointError, match=str(path)):
        latest.trainer_state()


def test_trainer_reports_a_failed_save_and_resumes_from_the_previous_checkpoint(tmp_path, guess_model_dir, monkeypatch):
    from algos.grpo import GRPO, GRPOConfig
    from algos.training.config import RunConfig
    from algos.training.loop import train

    out = tmp_path / "run"
    run = RunConfig(task="guess", model=str(guess_model_dir), iterations=3, out=out, wandb="disabled", eval_problems=4,
                    eval_every=0, save_every=1, threads=1, canary_problems=0)
    config = with_fields(GRPOConfig(), prompts_per_iteration=2, samples_per_prompt=4, minibatch_size=8, micro_batch_size=4,
                        max_new_tokens=16, learning_rate=1e-3)
    real_save, calls = torch.save, []

    def fail_second_checkpoint(obj, path, *a, **k):
        if str(path).endswith(ck.TRAINER_FILE):
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ck.torch, "save", fail_second_checkpoint)
    with pytest.raises(ck.CheckpointError, match=r"iteration 2 .*disk full.*iter-000001 is intact"):
        train(run, "grpo", config, GRPO)
    monkeypatch.setattr(ck.torch, "save", real_save)
    rows = [json.loads(x)["iteration"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2]
    summary = train(RunConfig(**{**run.__dict__, "out": None, "resume": out}), "grpo", config, GRPO)
    rows = [json.loads(x)["iteration"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2, 3] and summary["iterations"] == 3
    assert sorted(os.listdir(out / "checkpoints")) == ["iter-000002", "iter-000003", "latest"]
