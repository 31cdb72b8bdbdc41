"""End-to-end smoke run of `experiments/run.py algo:vineppo` on real GSM8K with a tiny budget."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments.run import main  # noqa: E402


def test_vineppo_smoke_run_changes_parameters_and_writes_outputs(tmp_path, tokenizer, small_model):
    model_dir = tmp_path / "model"
    small_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    summary = main([
        "algo:vineppo", "--model", str(model_dir), "--iterations", "2", "--out", str(out), "--wandb", "disabled",
        "--prompts-per-iteration", "2", "--samples-per-prompt", "2", "--mc-rollouts", "2", "--max-new-tokens", "24",
        "--minibatch-size", "2", "--micro-batch-size", "2", "--learning-rate", "1e-3", "--eval-problems", "4",
        "--eval-every", "1",
    ])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for row in rows:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
        assert 0.0 <= row["eval/accuracy"] <= 1.0
        assert row["update/optimizer_steps"] > 0 and row["vineppo/mc_rollouts"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["algorithm"] == "vineppo" and config["algo"]["mc_rollouts"] == 2
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    changed = [not torch.equal(a, b) for a, b in zip(small_model.state_dict().values(), final.state_dict().values())]
    assert any(changed)
    assert summary["out"] == str(out) and 0.0 <= summary["accuracy_after"] <= 1.0


def test_existing_run_directory_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["algo:vineppo", "--out", str(tmp_path), "--wandb", "disabled", "--iterations", "1"])
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"
