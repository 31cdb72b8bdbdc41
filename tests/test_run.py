"""End-to-end smoke runs of `experiments/run.py algo:NAME` for every algorithm.

Each runs two iterations on the `guess` task (tests/conftest.py) with a small model that is right
about half the time, so every algorithm gets groups with both outcomes and must update.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments.presets import ALGORITHMS  # noqa: E402
from experiments.run import main  # noqa: E402

SMALL = {
    "vineppo": "--samples-per-prompt 2 --mc-rollouts 2 --minibatch-size 4 --micro-batch-size 2 --learning-rate 1e-3",
    "ppo": "--samples-per-prompt 2 --minibatch-size 4 --micro-batch-size 2 --learning-rate 1e-3 --critic-learning-rate 1e-3",
    "vc-ppo": "--samples-per-prompt 2 --minibatch-size 4 --micro-batch-size 2 --learning-rate 1e-3 --critic-learning-rate 1e-3 "
              "--value-pretrain-steps 4 --value-pretrain-heldout-prompts 2 --value-pretrain-learning-rate 1e-3",
    "grpo": "--samples-per-prompt 4 --minibatch-size 8 --micro-batch-size 4 --learning-rate 1e-3",
    "rloo": "--samples-per-prompt 4 --minibatch-size 8 --micro-batch-size 4 --learning-rate 1e-3",
    "dpo-plus": "--samples-per-prompt 4 --minibatch-size 4 --micro-batch-size 4 --learning-rate 1e-3",
    "restem": "--samples-per-prompt 4 --minibatch-size 4 --micro-batch-size 4 --learning-rate 1e-3 --epochs 1 "
              "--validation-problems 4 --validation-samples 1 --early-stop-method last",
    "sft": "--learning-rate 1e-3",
    "reinforce": "--samples-per-prompt 4 --minibatch-size 8 --micro-batch-size 4 --learning-rate 1e-3",
}


def test_every_algorithm_has_a_smoke_test():
    assert set(SMALL) == set(ALGORITHMS)


@pytest.mark.parametrize("algo", list(SMALL))
def test_smoke_run_changes_parameters_and_keeps_metrics_finite(algo, tmp_path, guess_model_dir):
    out = tmp_path / "run"
    summary = main([
        f"algo:{algo}", "--task", "guess", "--model", str(guess_model_dir), "--iterations", "2", "--out", str(out),
        "--wandb", "disabled", "--prompts-per-iteration", "2", "--max-new-tokens", "16", "--eval-problems", "4",
        "--eval-every", "1", "--cache-dir", str(tmp_path / "cache"), *SMALL[algo].split(),
    ])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for row in rows:
        bad = {k: v for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, bad
        assert 0.0 <= row["eval/accuracy"] <= 1.0 and 0.0 <= row["eval/accuracy_sampled"] <= 1.0
        assert row["eval/kl"] >= -1e-6
    assert rows[-1]["total/optimizer_steps"] == sum(r.get("update/optimizer_steps", 0) for r in rows) > 0
    assert rows[-1]["total/tokens"] == sum(v for r in rows for k, v in r.items() if k.startswith("tokens/"))
    config = json.loads((out / "config.json").read_text())
    assert config["algorithm"] == algo and config["run"]["task"] == "guess"
    start = AutoModelForCausalLM.from_pretrained(guess_model_dir)
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(), final.state_dict().values()))
    saved = json.loads((out / "summary.json").read_text())
    assert saved["algorithm"] == algo and summary["out"] == str(out) and 0.0 <= summary["accuracy_after"] <= 1.0
    if algo in ("ppo", "vc-ppo"):
        assert (out / "final" / "value_model").is_dir()
    if algo == "vc-ppo":  # pretrained in iteration 1 (before its sampling), cached for the next run
        assert rows[1]["value_pretrain/steps"] >= 4 and rows[1]["value_pretrain/cached"] == 0
        assert rows[1]["value_pretrain/loss_after"] < rows[1]["value_pretrain/loss_before"]
        assert not any(k.startswith("value_pretrain/") for k in rows[2])
        assert len(list((tmp_path / "cache" / "value-pretrain").iterdir())) == 1
        again = main([f"algo:{algo}", "--task", "guess", "--model", str(guess_model_dir), "--iterations", "1",
                      "--out", str(tmp_path / "again"), "--wandb", "disabled", "--prompts-per-iteration", "2",
                      "--max-new-tokens", "16", "--eval-problems", "4", "--seed", "1", "--cache-dir",
                      str(tmp_path / "cache"), *SMALL[algo].split()])
        row = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()][1]
        assert again["iterations"] == 1 and row["value_pretrain/cached"] == 1
        assert row["value_pretrain/steps"] == rows[1]["value_pretrain/steps"]


def test_existing_run_directory_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["algo:vineppo", "--out", str(tmp_path), "--wandb", "disabled", "--iterations", "1"])
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"


def test_unknown_algorithm_is_a_usage_error_listing_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["algo:trpo"])
    err = capsys.readouterr().err
    assert "algo:grpo" in err and "algo:restem" in err


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_mc_diagnostics_are_logged_without_changing_the_run(algo, tmp_path, guess_model_dir):
    def run(out, extra):
        main([f"algo:{algo}", "--task", "guess", "--model", str(guess_model_dir), "--iterations", "2", "--out", str(out),
              "--wandb", "disabled", "--prompts-per-iteration", "2", "--max-new-tokens", "16", "--eval-problems", "2",
              "--eval-every", "2", "--canary-problems", "0", *SMALL[algo].split(), *extra])
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    plain = run(tmp_path / "plain", [])
    diag = run(tmp_path / "diag", ["--mc-diagnostics-every", "1", "--mc-diagnostics-states", "4",
                                   "--mc-diagnostics-k", "2"])
    assert all("mc_diag/states" in r and r["tokens/mc_diagnostics"] > 0 for r in diag[1:])
    assert ("mc_diag/value_mae" in diag[1]) == (algo == "ppo")  # only PPO has a critic
    # the diagnostics sample with their own seeds: the training itself is unchanged
    for a, b in zip(plain[1:], diag[1:]):
        assert a["train/reward"] == b["train/reward"] and a["update/loss"] == b["update/loss"]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_dynamic_sampling_runs_and_is_refused_where_unsupported(algo, tmp_path, guess_model_dir):
    common = ["--task", "guess", "--model", str(guess_model_dir), "--iterations", "2", "--wandb", "disabled",
              "--prompts-per-iteration", "2", "--max-new-tokens", "16", "--eval-problems", "2", "--canary-problems", "0"]
    main([f"algo:{algo}", *common, "--out", str(tmp_path / "g"), *SMALL[algo].split(), "--dynamic-sampling", "2"])
    rows = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["dynamic/fill"] <= 1.0 and r["dynamic/rounds"] >= 1 for r in rows[1:])
    assert rows[-1]["update/lr"] == 0.0  # the schedule ends at 0 however many groups were kept
    if algo == "ppo":
        assert rows[-1]["value/lr"] == 0.0  # the critic's schedule too
    with pytest.raises(ValueError, match="--dynamic-sampling: algo:dpo-plus does not collect groups"):
        main(["algo:dpo-plus", *common, "--out", str(tmp_path / "p"), "--dynamic-sampling", "2"])


def test_evaluations_record_per_problem_results_that_add_up_to_the_logged_accuracy(tmp_path, guess_model_dir):
    """evaluations.jsonl holds, per evaluation, each test problem's correct counts (greedy and sampled),
    in the same problem order every time, and they average to the accuracies in metrics.jsonl."""
    out = tmp_path / "run"
    main(["algo:grpo", "--task", "guess", "--model", str(guess_model_dir), "--iterations", "2", "--out", str(out),
          "--wandb", "disabled", "--prompts-per-iteration", "2", "--max-new-tokens", "16", "--eval-problems", "6",
          "--eval-every", "1", "--eval-samples", "2", "--eval-temperature", "1.0", "--eval-sampled-samples", "3",
          "--canary-problems", "0", *SMALL["grpo"].split()])
    rows = {r["iteration"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    evaluations = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evaluations] == [0, 1, 2]
    assert len({tuple(e["problem_ids"]) for e in evaluations}) == 1 and len(evaluations[0]["problem_ids"]) == 6
    for e in evaluations:
        row = rows[e["iteration"]]
        assert e["samples"] == 2 and e["sampled_samples"] == 3
        assert all(0 <= c <= 2 for c in e["correct"]) and all(0 <= c <= 3 for c in e["sampled_correct"])
        assert sum(e["correct"]) / (6 * 2) == pytest.approx(row["eval/accuracy"])
        assert sum(e["sampled_correct"]) / (6 * 3) == pytest.approx(row["eval/accuracy_sampled"])


def test_eval_sampled_temperature_sets_the_sampled_evaluation_only(tmp_path, guess_model_dir, capsys):
    """--eval-sampled-temperature samples the sampled evaluation at its own temperature: near 0 it
    reproduces the greedy evaluation; equal to the training temperature it changes nothing."""
    def evaluation(name, extra):
        out = tmp_path / name
        main(["algo:grpo", "--task", "guess", "--model", str(guess_model_dir), "--iterations", "0", "--out", str(out),
              "--wandb", "disabled", "--max-new-tokens", "16", "--eval-problems", "16", "--eval-sampled-samples", "4",
              "--canary-problems", "0", "--temperature", "1.0", *extra])
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    default = evaluation("default", [])
    same = evaluation("same", ["--eval-sampled-temperature", "1.0"])
    cold = evaluation("cold", ["--eval-sampled-temperature", "0.001"])
    assert same["eval/accuracy_sampled"] == default["eval/accuracy_sampled"]
    # the guess model answers one way greedily and both ways when sampled at T = 1
    assert default["eval/accuracy_sampled"] != default["eval/accuracy"]
    assert cold["eval/accuracy_sampled"] == cold["eval/accuracy"] == default["eval/accuracy"]
    with pytest.raises(SystemExit) as exc:
        evaluation("zero", ["--eval-sampled-temperature", "0"])
    assert exc.value.code != 0
    assert "eval_sampled_temperature: expected > 0" in " ".join(capsys.readouterr().err.split())
