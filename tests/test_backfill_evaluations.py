"""experiments/backfill_evaluations.py: per-problem records for runs made before evaluations.jsonl,
written only when the repeated evaluation reproduces the logged accuracies exactly."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import backfill_evaluations  # noqa: E402
from experiments.run import main  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, guess_model_dir) -> Path:
    out = tmp_path_factory.mktemp("backfill") / "run"
    main(["algo:grpo", "--task", "guess", "--model", str(guess_model_dir), "--iterations", "2", "--out", str(out),
          "--wandb", "disabled", "--prompts-per-iteration", "2", "--max-new-tokens", "16", "--eval-problems", "6",
          "--eval-every", "1", "--save-every", "1", "--eval-sampled-samples", "3", "--canary-problems", "0",
          "--samples-per-prompt", "4", "--minibatch-size", "8", "--micro-batch-size", "4", "--learning-rate", "1e-2"])
    return out


def test_backfill_reproduces_the_records_the_loop_wrote(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    original = (copy / "evaluations.jsonl").read_text()
    assert len(original.splitlines()) == 3  # iterations 0, 1, 2
    (copy / "evaluations.jsonl").unlink()
    assert backfill_evaluations.main([str(copy)]) == 0
    assert (copy / "evaluations.jsonl").read_text() == original
    # a second call finds every record present and changes nothing
    assert backfill_evaluations.backfill(copy) == {0: "present", 1: "present", 2: "present"}


def test_an_evaluation_that_does_not_reproduce_is_not_written(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    rows[1]["eval/accuracy_sampled"] += 0.5  # iteration 1's logged number no longer matches its model
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (copy / "evaluations.jsonl").unlink()
    shutil.rmtree(copy / "checkpoints" / "iter-000002")  # iteration 2 is still in final/
    status = backfill_evaluations.backfill(copy)
    assert status[0] == status[2] == "written"
    assert status[1].startswith("not reproduced: eval/accuracy_sampled")
    written = [json.loads(line)["iteration"] for line in (copy / "evaluations.jsonl").read_text().splitlines()]
    assert written == [0, 2]
    assert backfill_evaluations.main([str(copy)]) == 1  # still not reproduced: reported, exit status 1


def test_missing_model_and_bad_input_are_reported(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "evaluations.jsonl").unlink()
    shutil.rmtree(copy / "checkpoints")
    status = backfill_evaluations.backfill(copy, [1])
    assert "no model for iteration 1" in status[1] and not (copy / "evaluations.jsonl").exists()
    assert backfill_evaluations.main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere/config.json not found" in capsys.readouterr().err


def test_run_settings_load_back_from_config_json(run_dir):
    """The settings a run wrote load back as the same RunConfig (paths as Path), so the backfill (and
    anything else reading a run) applies the loop's own rules to them: its thread count and its
    evaluation settings."""
    from algos.config import SamplingConfig
    from algos.training.config import RunConfig
    from algos.training.evaluation import evaluation_settings

    config = json.loads((run_dir / "config.json").read_text())
    run = RunConfig.from_dump(config["run"])
    assert isinstance(run.cache_dir, Path) and isinstance(run.out, Path)
    assert run.out.name == run_dir.name and run.seed == config["run"]["seed"]
    assert run.torch_threads() is None  # a model directory: torch's default
    assert RunConfig.from_dump({**config["run"], "model": "tiny"}).torch_threads() == 1  # the tiny model on CPU
    assert RunConfig.from_dump({**config["run"], "threads": 2}).torch_threads() == 2
    settings = evaluation_settings(run, SamplingConfig(**config["algo"]["sampling"]))
    assert settings["sampled_temperature"] == config["algo"]["sampling"]["temperature"]
    assert settings["samples"] == config["run"]["eval_samples"]
    # an older run's extra key is ignored; a bad value is named with its source
    assert RunConfig.from_dump({**config["run"], "a_removed_setting": 1}).seed == run.seed
    with pytest.raises(ValueError, match=r"config.json.*eval_top_p"):
        RunConfig.from_dump({**config["run"], "eval_top_p": 1.5})
    with pytest.raises(TypeError, match="JSON object"):
        RunConfig.from_dump([1, 2])
