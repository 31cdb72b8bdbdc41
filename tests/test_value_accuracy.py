"""The value-accuracy analysis (experiments/analysis/value_accuracy.py, VinePPO §6) end to end on a tiny
model with tiny settings, checked on invariants that hold whatever the samples are."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.analysis.value_accuracy import error_metrics, main, top1_score  # noqa: E402


def test_top1_score_by_hand():
    truth = [0.2, 0.9, 0.9, 0.1, 0.5]
    assert top1_score([0, 1, 0, 0, 0], truth) == 1.0           # picks a ground-truth best
    assert top1_score([1, 0, 0, 0, 0], truth) == 0.0           # picks a worse one
    assert top1_score([1, 1, 0, 0, 0], truth) == 0.5           # tied maxima: share of them that are right
    assert top1_score([0.0] * 5, truth) == pytest.approx(0.4)  # all tied = random: 2 bests of 5
    assert top1_score([3, 2, 1, 0, 0], [0.5] * 5) == 1.0       # every alternative is best


def test_error_metrics_by_hand():
    m = error_metrics([0.5, 1.0, 0.0], [0.25, 1.0, 0.5])
    assert m["mae"] == pytest.approx(0.25) and m["bias"] == pytest.approx(-0.25 / 3) and m["n"] == 3
    assert error_metrics([0.5, 0.5], [0.0, 1.0])["corr"] is None  # a constant side has no correlation


def test_analysis_end_to_end(tmp_path, guess_model_dir):
    from algos.critic import ValueModel
    from algos.models.policy import load_policy

    # a "trained" critic identical to the one the analysis builds at initialisation (same seed, same head)
    policy, _ = load_policy(str(guess_model_dir), dtype=torch.float32)
    critic_dir = tmp_path / "value_model"
    ValueModel.from_policy(policy, generator=torch.Generator().manual_seed(3)).save_pretrained(critic_dir)
    out = tmp_path / "out"
    summary = main(["--task", "guess", "--policy", str(guess_model_dir), "--value-model", f"copy={critic_dir}",
                    "--problems", "2", "--samples", "3", "--gt-samples", "8", "--ks", "1", "3",
                    "--rank-states", "2", "--rank-gt-samples", "4", "--max-new-tokens", "24", "--seed", "3",
                    "--threads", "1", "--out", str(out)])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["estimators"] == summary["estimators"]
    for key in ("settings", "machine", "states", "gt_mean", "gt_se", "positions", "estimators", "by_position",
                "ranking", "timings", "paper", "group_rewards", "per_state", "plots"):
        assert key in on_disk, key
    names = {"ground_truth", "mc_k1", "mc_k3", "critic_init", "critic_copy", "group_mean"}
    assert set(on_disk["estimators"]) == names
    for m in on_disk["estimators"].values():
        assert set(m) == {"n", "mae", "bias", "rmse", "corr"} and m["n"] == on_disk["states"]

    gt = on_disk["estimators"]["ground_truth"]
    assert gt["mae"] == 0.0 and gt["bias"] == 0.0 and gt["rmse"] == 0.0
    rows = on_disk["per_state"]
    assert len(rows) == on_disk["states"] and rows[0]["position"] == 0
    assert sum(on_disk["positions"].values()) == len(rows)
    for row in rows:
        assert row["group_mean"] == pytest.approx(np.mean(on_disk["group_rewards"][row["problem"]]))
        assert row["critic_copy"] == pytest.approx(row["critic_init"], abs=1e-5)
        for k, n in (("mc_k1", 1), ("mc_k3", 3), ("ground_truth", 8)):  # a mean of n rewards in {0, 1}
            assert 0.0 <= row[k] <= 1.0 and row[k] * n == pytest.approx(round(row[k] * n))
    for name, by in on_disk["by_position"].items():
        assert sum(m["n"] for m in by.values()) == len(rows)

    ranking = on_disk["ranking"]
    assert ranking["states"] == 2 and ranking["alternatives"] == 5
    for name, score in ranking["top1"].items():
        assert 0.0 <= score <= 1.0, name
    assert ranking["top1"]["random"] >= 0.2 - 1e-12
    assert ranking["top1"]["ground_truth"] == 1.0
    assert ranking["top1"]["group_mean"] == pytest.approx(ranking["top1"]["random"])  # a constant ties everything
    assert ranking["top1"]["critic_copy"] == pytest.approx(ranking["top1"]["critic_init"])

    for f in on_disk["plots"] + ["table.md"]:
        assert (out / f).stat().st_size > 0
    assert "error_by_position.png" in on_disk["plots"] and "scatter_mc_k3.png" in on_disk["plots"]
    assert "| group_mean |" in (out / "table.md").read_text()
