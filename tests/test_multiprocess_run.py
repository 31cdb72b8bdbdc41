"""`accelerate launch` with two CPU processes (gloo) runs the real CLI end to end: prompts are
sharded across ranks, only rank 0 writes, and the run resumes. The update-level equivalence with a
single process (identical parameters across ranks, equal to one process on the global batch) is in
tests/test_distributed.py."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate CLI")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    script = tmp_path / "launch.py"
    script.write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
        "from conftest import GuessTask\n"
        "from langenv.tasks.base import register_task\n"
        "register_task('guess', GuessTask)\n"
        "from experiments.run import main\n"
        "main(sys.argv[1:])\n"
    )
    # --multi_gpu is accelerate's torchrun launcher; without CUDA, algos.training.distributed picks gloo on CPU.
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(script), *args]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def test_two_processes_shard_prompts_and_only_rank0_writes(tmp_path, guess_model_dir):
    out = tmp_path / "run"
    args = ["algo:grpo", "--task", "guess", "--model", str(guess_model_dir), "--out", str(out), "--iterations", "2",
            "--wandb", "disabled", "--prompts-per-iteration", "4", "--samples-per-prompt", "4", "--minibatch-size", "16",
            "--micro-batch-size", "4", "--max-new-tokens", "16", "--eval-problems", "4", "--eval-every", "1",
            "--learning-rate", "1e-3", "--threads", "1", "--canary-problems", "4", "--save-every", "1", "--stop-after", "1"]
    done = launch(tmp_path, args)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]  # one writer, no duplicated rows
    graded = sum(rows[1][f"grading/{s}"] for s in ("correct", "incorrect", "no_answer", "timeout", "invalid", "truncated"))
    assert graded == 16  # 4 problems x 4 samples over both ranks
    assert rows[1]["grpo/trained_responses"] == 8  # each rank trained on its own 2 problems x 4 samples
    assert rows[1]["update/optimizer_steps"] == 1  # one global mini-batch of 16
    assert done.stdout.count("accuracy before training") == 1  # only rank 0 prints

    resumed = launch(tmp_path, ["--resume", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert (out / "final" / "config.json").is_file() and (out / "summary.json").is_file()


def test_algorithms_without_data_parallel_support_refuse_several_processes(tmp_path, guess_model_dir):
    out = tmp_path / "run"
    done = launch(tmp_path, ["algo:dpo-plus", "--task", "guess", "--model", str(guess_model_dir), "--out", str(out),
                             "--iterations", "1", "--wandb", "disabled", "--prompts-per-iteration", "2",
                             "--max-new-tokens", "16", "--eval-problems", "4", "--canary-problems", "0"])
    assert done.returncode != 0
    assert "does not support multi-process training" in done.stderr
    assert not out.exists()  # refused before anything was written
