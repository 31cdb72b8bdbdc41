"""Exact resume, determinism, signals and the non-finite guard, end to end on the `guess` task.

The exact-resume test follows torchtune's ``test_training_state_on_resume``: a straight run of N
iterations must equal N/2 iterations, then a *new process* with ``--resume``, then the rest —
identical metrics (time fields aside) and bitwise-identical parameters on CPU — for every algorithm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from algos.config import with_fields  # noqa: E402
from experiments.run import main  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

ALGO_FLAGS = {
    "vineppo": "--samples-per-prompt 2 --mc-rollouts 2 --minibatch-size 4 --micro-batch-size 2 --learning-rate 1e-3",
    "ppo": "--samples-per-prompt 2 --minibatch-size 4 --micro-batch-size 2 --learning-rate 1e-3 --critic-learning-rate 1e-3",
    "vc-ppo": "--samples-per-prompt 2 --minibatch-size 4 --micro-batch-size 2 --learning-rate 1e-3 --critic-learning-rate 1e-3 "
              "--value-pretrain-steps 4 --value-pretrain-heldout-prompts 2 --value-pretrain-learning-rate 1e-3",
    "grpo": "--samples-per-prompt 4 --minibatch-size 8 --micro-batch-size 4 --learning-rate 1e-3",
    "rloo": "--samples-per-prompt 4 --minibatch-size 8 --micro-batch-size 4 --learning-rate 1e-3 --kl-coef 0.05",
    "dpo-plus": "--samples-per-prompt 4 --minibatch-size 4 --micro-batch-size 4 --learning-rate 1e-3",
    "restem": "--samples-per-prompt 4 --minibatch-size 4 --micro-batch-size 4 --learning-rate 1e-3 --epochs 1 "
              "--validation-problems 4 --validation-samples 1 --early-stop-method last",
    "sft": "--learning-rate 1e-3",
    "reinforce": "--samples-per-prompt 4 --minibatch-size 8 --micro-batch-size 4 --learning-rate 1e-3",
}

#: Run-level plug-ins resumed exactly too: (algorithm, flags) per case.
CASES = {**{name: (name, flags) for name, flags in ALGO_FLAGS.items()},
         "grpo+learnability": ("grpo", ALGO_FLAGS["grpo"] + " --prompt-sampler learnability "
                                       "--learnability-pool-factor 2 --learnability-attempts 2"),
         "grpo+dynamic+cppo": ("grpo", ALGO_FLAGS["grpo"] + " --dynamic-sampling 2 --prune-keep 2"),
         "ppo+dynamic": ("ppo", ALGO_FLAGS["ppo"] + " --dynamic-sampling 2"),
         "ppo+mc-diagnostics": ("ppo", ALGO_FLAGS["ppo"] + " --mc-diagnostics-every 1 --mc-diagnostics-states 4 "
                                      "--mc-diagnostics-k 2")}

# Runs a CLI command in a fresh interpreter with the test-only `guess` task registered.
LAUNCH = (
    "import sys; sys.path[:0] = [{repo!r}, {tests!r}];"
    "from conftest import GuessTask; from langenv.tasks.base import register_task; register_task('guess', GuessTask);"
    "from experiments.run import main; main(sys.argv[1:])"
).format(repo=str(REPO), tests=str(REPO / "tests"))


def common(model_dir: Path, out: Path, iterations: int) -> list[str]:
    return ["--task", "guess", "--model", str(model_dir), "--out", str(out), "--iterations", str(iterations),
            "--wandb", "disabled", "--prompts-per-iteration", "2", "--max-new-tokens", "16", "--eval-problems", "4",
            "--eval-every", "2", "--save-every", "2", "--threads", "1", "--canary-problems", "4"]


def run_process(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", LAUNCH, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


def metric_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different


@pytest.mark.parametrize("case", list(CASES))
def test_resume_in_a_new_process_is_exact(case, tmp_path, guess_model_dir):
    straight, split = tmp_path / "straight", tmp_path / "split"
    algo, flags = CASES[case][0], CASES[case][1].split()
    # separate caches: both runs pretrain VC-PPO's critic themselves (a cache hit is logged differently)
    main([f"algo:{algo}", *common(guess_model_dir, straight, 4), *flags, "--cache-dir", str(tmp_path / "cache-a")])

    main([f"algo:{algo}", *common(guess_model_dir, split, 4), *flags, "--stop-after", "2",
          "--cache-dir", str(tmp_path / "cache-b")])
    assert not (split / "summary.json").exists() and not (split / "final").exists()
    assert [r["iteration"] for r in metric_rows(split)] == [0, 1, 2]
    # a new process continues it from its own config.json: only --resume is needed
    done = run_process(["--resume", str(split)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout

    a, b = metric_rows(straight), metric_rows(split)
    assert [r["iteration"] for r in b] == [0, 1, 2, 3, 4]
    assert a == b
    assert (straight / "evaluations.jsonl").read_text() == (split / "evaluations.jsonl").read_text()
    assert_same_weights(straight / "final", split / "final")
    if algo == "vc-ppo":  # pretrained before iteration 1's sampling, and not again after the resume
        assert a[1]["value_pretrain/steps"] >= 4 and a[1]["value_pretrain/cached"] == 0
        assert not any(k.startswith("value_pretrain/") for r in a[2:] for k in r)
    if algo in ("ppo", "vc-ppo"):
        ca = load_file(straight / "final" / "value_model" / "value_head.safetensors")
        cb = load_file(split / "final" / "value_model" / "value_head.safetensors")
        assert all(torch.equal(ca[k], cb[k]) for k in ca)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (straight, split))
    assert sa["accuracy_after"] == sb["accuracy_after"] and sa["total/tokens"] == sb["total/tokens"]
    if "learnability" in case:
        assert all(r["prompts/pool_mixed"] >= 0 and r["tokens/prompt_selection"] > 0 for r in a[1:])


def test_same_seed_same_metrics_different_seed_differs(tmp_path, guess_model_dir):
    flags = ALGO_FLAGS["grpo"].split()
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        main(["algo:grpo", *common(guess_model_dir, tmp_path / name, 2), *flags, "--seed", str(seed)])
        runs[name] = metric_rows(tmp_path / name)
    assert runs["a"] == runs["b"]
    assert_same_weights(tmp_path / "a" / "final", tmp_path / "b" / "final")
    assert runs["a"] != runs["c"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_writes_a_checkpoint_exits_nonzero_and_resumes(sig, tmp_path, guess_model_dir):
    out = tmp_path / "run"
    args = ["algo:grpo", *common(guess_model_dir, out, 40), *ALGO_FLAGS["grpo"].split(), "--save-every", "0"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:  # iteration 1 logged
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert signal.Signals(sig).name in err and "--resume" in err
    rows = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]
    stopped = rows[-1]
    assert rows == list(range(stopped + 1)) and stopped < 40
    assert (out / "checkpoints" / f"iter-{stopped:06d}").is_dir()
    assert (out / "checkpoints" / "latest").read_text().strip() == f"iter-{stopped:06d}"
    assert not (out / "summary.json").exists()

    summary = main(["--resume", str(out), "--iterations", str(stopped + 1)])
    rows = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]
    assert rows == list(range(stopped + 2))  # appended, no duplicate rows
    assert summary["iterations"] == stopped + 1


def test_crashed_run_rows_after_the_checkpoint_are_dropped_on_resume(tmp_path, guess_model_dir):
    out = tmp_path / "run"
    flags = ALGO_FLAGS["grpo"].split()
    main(["algo:grpo", *common(guess_model_dir, out, 4), *flags, "--stop-after", "2"])
    with open(out / "metrics.jsonl", "a") as f:  # what a run killed during iteration 3 may leave behind
        f.write(json.dumps({"iteration": 3, "train/reward": 0.5}) + "\n")
        f.write('{"iteration": 4, "train/rew')
    with open(out / "evaluations.jsonl", "a") as f:  # and an evaluation logged after the checkpoint
        f.write(json.dumps({"iteration": 4, "problem_ids": [], "samples": 1, "correct": []}) + "\n")
    main(["--resume", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4]
    assert "update/loss" in rows[3]
    evaluations = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evaluations] == [0, 2, 4] and len(evaluations[-1]["correct"]) == 4


def test_nonfinite_gradients_are_skipped_then_stop_the_run(tmp_path, guess_model_dir):
    from algos.grpo import GRPO, GRPOConfig
    from algos.training.config import RunConfig
    from algos.training.loop import NonFiniteUpdatesError, train

    seen = {}

    def build(config, ctx, total):
        algo = GRPO(config, ctx, total)
        seen["policy"] = ctx.policy
        param = next(ctx.policy.parameters())
        param.register_hook(lambda grad: grad * float("nan"))  # every backward pass yields a NaN gradient
        return algo

    run = RunConfig(task="guess", model=str(guess_model_dir), iterations=5, out=tmp_path / "run", wandb="disabled",
                    eval_problems=4, eval_every=0, threads=1, canary_problems=0, max_nonfinite_updates=3)
    config = with_fields(GRPOConfig(), prompts_per_iteration=2, samples_per_prompt=4, minibatch_size=4, micro_batch_size=4,
                        max_new_tokens=16, learning_rate=1e-3)
    with pytest.raises(NonFiniteUpdatesError, match=r"iteration 2: 4 optimiser steps in a row"):
        train(run, "grpo", config, build)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[1]["update/nonfinite_minibatches"] == 2 and rows[1]["update/optimizer_steps"] == 0
    assert rows[2]["nonfinite/streak"] == 4
    # every step was skipped: the policy still holds its starting weights
    start = weights(guess_model_dir)
    now = seen["policy"].state_dict()
    assert all(torch.equal(start[k], now[k]) for k in start)


def test_resumed_run_continues_the_same_wandb_run(tmp_path, guess_model_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    flags = [*common(guess_model_dir, out, 2), *ALGO_FLAGS["grpo"].split(), "--wandb", "offline"]
    main(["algo:grpo", *flags, "--stop-after", "1"])
    main(["--resume", str(out), "--wandb", "offline"])
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({name.rsplit("-", 1)[1] for name in runs}) == 1, runs


def test_one_off_flags_of_the_first_invocation_do_not_carry_over(tmp_path, guess_model_dir):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "metrics.jsonl").write_text("{}\n")  # an old run, replaced with --overwrite
    flags = [*common(guess_model_dir, out, 3), *ALGO_FLAGS["grpo"].split()]
    main(["algo:grpo", *flags, "--overwrite", "--stop-after", "1"])
    summary = main(["--resume", str(out)])  # neither --overwrite nor --stop-after 1 applies again
    assert summary["iterations"] == 3 and (out / "summary.json").exists()
    rows = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2, 3]
