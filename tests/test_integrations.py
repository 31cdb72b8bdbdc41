"""Our grader and tasks inside other trainers: a real TRL GRPOTrainer run of 2 steps on the CPU with
our reward function, and verl's compute_score contract plus its parquet format (verl itself is
GPU-bound)."""

from __future__ import annotations

import datasets
import pytest

from langenv import grading
from langenv.grading import GradingPool
from langenv.integrations.trl import reward_function, trl_dataset
from langenv.integrations.verl import compute_score, export_parquet, grading_kind, verl_rows


def test_trl_reward_function_grades_text_and_conversations():
    reward = reward_function("math")
    assert reward.__name__ == "langenv_math_correct"
    completions = ["so $\\boxed{(x+1)^2}$", [{"role": "assistant", "content": "\\boxed{x^2+2x+2}"}], "no idea"]
    assert reward(prompts=["p"] * 3, completions=completions, answer=["x^2+2x+1"] * 3) == [1.0, 0.0, 0.0]
    with pytest.raises(KeyError, match="no 'answer' column"):
        reward(prompts=["p"], completions=["1"], solution=["1"])


def test_trl_reward_never_turns_a_grading_failure_into_zero(monkeypatch):
    monkeypatch.setenv(grading.PYTHON_ENV, "/nonexistent/bin/python3")
    monkeypatch.setattr(grading, "_DEFAULT", GradingPool(workers=1, timeout_s=2.0))
    with pytest.raises(grading.GradingError, match="could not be graded.*could not start"):
        reward_function("math")(prompts=["p"], completions=["$\\boxed{(x+1)^2}$"], answer=["x^2+2x+1"])


def test_trl_dataset_columns():
    ds = trl_dataset("arithmetic", "train", limit=3)
    assert ds.column_names == ["prompt", "answer", "problem_id"] and len(ds) == 3
    chat = trl_dataset("arithmetic", "train", limit=1, chat=True)
    assert chat[0]["prompt"][0]["role"] == "user" and chat[0]["answer"] == ds[0]["answer"]


def test_trl_grpo_trainer_trains_two_steps_with_our_reward(tmp_path, tokenizer, small_model):
    from trl import GRPOConfig, GRPOTrainer

    calls = []
    reward = reward_function("gsm8k")

    def counted(**kwargs):
        out = reward(**kwargs)
        calls.append(out)
        return out

    counted.__name__ = reward.__name__
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=12, max_steps=2, learning_rate=1e-4, logging_steps=1, report_to=[],
                      use_cpu=True, bf16=False, save_strategy="no", seed=0, beta=0.0)
    trainer = GRPOTrainer(model=small_model, reward_funcs=counted, args=args, processing_class=tokenizer,
                          train_dataset=trl_dataset("gsm8k", "train", limit=8))
    trainer.train()
    assert trainer.state.global_step == 2 and len(calls) >= 2
    assert all(r in (0.0, 1.0) for batch in calls for r in batch)
    # TRL logged our reward under the function's name (a random model scores 0, so the advantages and the
    # update are 0 here: this checks the plumbing, not learning)
    assert any(f"rewards/{reward.__name__}/mean" in row for row in trainer.state.log_history)


def test_verl_compute_score_contract():
    assert compute_score("langenv/gsm8k", "... so the answer\n#### 18", "18") == 1.0
    assert compute_score("langenv/gsm8k", "#### 17", "18") == 0.0
    assert compute_score("langenv/math", "$\\boxed{\\frac{1}{2}}$", "0.5", {"split": "test"}) == 1.0
    assert compute_score("openai/gsm8k", "\\boxed{(x+1)^2}", "x^2+2x+1") == 1.0  # unknown source: kind detected
    assert grading_kind("langenv/math") == "math" and grading_kind("x", {"grading_kind": "gsm8k"}) == "gsm8k"


def test_verl_parquet_round_trip(tmp_path):
    path = export_parquet("arithmetic", "test", tmp_path / "arith.parquet", limit=4)
    ds = datasets.Dataset.from_parquet(str(path))
    assert len(ds) == 4 and set(ds.column_names) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    row = ds[0]
    assert row["data_source"] == "langenv/arithmetic" and row["reward_model"]["style"] == "rule"
    assert row["prompt"][0]["role"] == "user" and row == {**verl_rows("arithmetic", "test", 1)[0]}
    # a correct reference solution scores 1 through compute_score
    from langenv.tasks import make_task

    task = make_task("arithmetic")
    solution = task.target(task.load("test")[0])
    assert compute_score(row["data_source"], solution, row["reward_model"]["ground_truth"], row["extra_info"]) == 1.0
