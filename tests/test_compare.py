"""experiments/compare.py: flags, skipping finished runs, the summary table and plots, one real run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments import compare  # noqa: E402


def _fake_run(run_dir: Path, accs: list[float], steps_per_it: float, kl: float, wall: float) -> None:
    run_dir.mkdir(parents=True)
    rows = []
    for i, acc in enumerate(accs):
        rows.append({"iteration": i, "eval/accuracy": acc, "eval/accuracy_stderr": 0.01,
                     "eval/accuracy_sampled": acc / 2, "eval/accuracy_sampled_stderr": 0.02, "eval/kl": kl * i,
                     "total/optimizer_steps": steps_per_it * i, "total/tokens": 100.0 * i, "time/elapsed": 60.0 * i})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").write_text(json.dumps({
        "wall_time_s": wall, "total/optimizer_steps": steps_per_it * (len(accs) - 1),
        "total/tokens": 100.0 * (len(accs) - 1)}))


def test_summary_table_aggregates_seeds_and_writes_plots(tmp_path):
    specs = [compare.RunSpec("grpo", "grpo", 0), compare.RunSpec("grpo", "grpo", 1), compare.RunSpec("ppo", "ppo", 0),
             compare.RunSpec("rloo", "rloo", 0)]
    _fake_run(tmp_path / "grpo-seed0", [0.40, 0.50, 0.60], 4, 0.01, 120)
    _fake_run(tmp_path / "grpo-seed1", [0.40, 0.45, 0.40], 4, 0.03, 180)
    _fake_run(tmp_path / "ppo-seed0", [0.40, 0.42], 8, 0.02, 60)
    text = compare.summarize(specs, tmp_path, title="test")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| run")}
    # grpo: final mean 0.5, across-seed standard error = std([0.6, 0.4]) / sqrt(2) = 0.1
    assert rows["grpo"][:4] == ["2", "40.0 ± 0.0", "50.0 ± 10.0", "52.5 ± 7.5"]  # best: mean of 0.6 and 0.45
    assert rows["grpo"][5] == "8" and rows["grpo"][6] == "2.5"  # mean gradient steps, mean wall minutes
    # one seed: the evaluation's own standard error
    assert rows["ppo"][2] == "42.0 ± 1.0" and rows["ppo"][4] == "21.0 ± 2.0"
    assert rows["rloo"][0] == "0"  # not run yet
    for name in ("accuracy_vs_steps.png", "accuracy_vs_wallclock.png", "accuracy_vs_kl.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert (tmp_path / "summary.md").read_text() == text


def test_finished_runs_are_skipped(tmp_path):
    _fake_run(tmp_path / "grpo-seed0", [0.1, 0.2], 1, 0.0, 1)
    status = compare.run_all([compare.RunSpec("grpo", "grpo", 0)], "gsm8k", "unused-model", 1, tmp_path)
    assert status == {"grpo-seed0": "skipped"}


def test_per_algorithm_flags_are_parsed_and_checked():
    flags = compare.parse_flags(["grpo: --learning-rate 3e-5", "grpo: --epochs 2", "ppo:--kl-coef 0"], ["grpo", "ppo"])
    assert flags == {"grpo": ("--learning-rate", "3e-5", "--epochs", "2"), "ppo": ("--kl-coef", "0")}
    with pytest.raises(ValueError, match="ALGO one of"):
        compare.parse_flags(["vineppo: --mc-rollouts 2"], ["grpo"])
    with pytest.raises(ValueError, match="ALGO"):
        compare.parse_flags(["--learning-rate 1"], ["grpo"])


def test_unknown_algorithm_lists_the_valid_names(tmp_path):
    with pytest.raises(SystemExit, match="valid: vineppo, ppo, vc-ppo, grpo"):
        compare.main(["--algos", "grpo", "trpo", "--out", str(tmp_path)])


def test_a_real_comparison_runs_and_summarises(tmp_path, tokenizer, small_model):
    model_dir = tmp_path / "model"
    small_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "cmp"
    text = compare.main([
        "--algos", "grpo", "sft", "--model", str(model_dir), "--iterations", "1", "--out", str(out),
        "--run-flags=--prompts-per-iteration 2 --max-new-tokens 16 --eval-problems 3",
        "--flags", "grpo: --samples-per-prompt 2 --minibatch-size 4 --micro-batch-size 4",
    ])
    assert (out / "grpo-seed0" / "summary.json").is_file() and (out / "sft-seed0" / "summary.json").is_file()
    assert "| grpo | 1 |" in text and "| sft | 1 |" in text
    config = json.loads((out / "grpo-seed0" / "config.json").read_text())
    assert config["algo"]["sampling"]["samples_per_prompt"] == 2 and config["run"]["eval_problems"] == 3


def test_an_interrupted_run_is_resumed_not_restarted(tmp_path, tokenizer, small_model):
    model_dir = tmp_path / "model"
    small_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "cmp"
    args = ["--algos", "grpo", "--model", str(model_dir), "--iterations", "2", "--out", str(out),
            "--flags", "grpo: --samples-per-prompt 2 --minibatch-size 4 --micro-batch-size 4 --save-every 1"]
    run_flags = "--run-flags=--prompts-per-iteration 2 --max-new-tokens 16 --eval-problems 2 --no-eval-sampled"
    compare.main([*args, run_flags + " --stop-after 1"])  # the run stops after iteration 1 with a checkpoint
    run_dir = out / "grpo-seed0"
    assert not (run_dir / "summary.json").is_file() and (run_dir / "checkpoints" / "latest").is_file()
    assert compare.command(compare.RunSpec("grpo", "grpo", 0), "gsm8k", "tiny", 2, out)[2] == "--resume"
    compare.main([*args, run_flags])
    iterations = [r["iteration"] for r in compare.load_rows(run_dir)]
    assert iterations == [0, 1, 2] and (run_dir / "summary.json").is_file()
    assert "resuming" in (run_dir / "run.log").read_text()


def test_overfit_check_runs_algorithm_and_null_control(tmp_path, tokenizer, small_model):
    from experiments.bench import overfit

    model_dir = tmp_path / "model"
    small_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "overfit"
    results = overfit.main(["--algos", "grpo", "--task", "gsm8k", "--model", str(model_dir), "--problems", "2",
                            "--samples", "2", "--iterations", "2", "--window", "1", "--null", "--out", str(out),
                            "--flags=--max-new-tokens 16"])
    assert set(results) == {"grpo", "grpo-null"} and all(r["iterations"] == 2 for r in results.values())
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"grpo", "grpo-null"} and (out / "reward_curves.png").is_file()
    null_config = json.loads((out / "grpo-null-seed0" / "config.json").read_text())
    assert null_config["algo"]["actor"]["permute_advantages"] is True
    assert null_config["run"]["train_problems"] == 2


def _fake_sampled_run(run_dir: Path, start: float, final: float, stderr: float = 0.01) -> None:
    run_dir.mkdir(parents=True)
    rows = [{"iteration": 0, "eval/accuracy": 0.3, "eval/accuracy_sampled": start, "eval/accuracy_sampled_stderr": stderr,
             "eval/kl": 0.0},
            {"iteration": 10, "eval/accuracy": 0.3, "eval/accuracy_sampled": final,
             "eval/accuracy_sampled_stderr": stderr, "eval/kl": 0.01}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").write_text(json.dumps({"wall_time_s": 1.0, "total/optimizer_steps": 20,
                                                      "total/tokens": 10}))


def test_learning_benchmark_gains_by_hand(tmp_path):
    from experiments.bench import learning

    for seed, (s, f) in enumerate([(0.30, 0.36), (0.30, 0.34), (0.31, 0.38)]):
        _fake_sampled_run(tmp_path / f"grpo-seed{seed}", s, f)
    _fake_sampled_run(tmp_path / "null-seed0", 0.30, 0.29, stderr=0.012)
    specs = [compare.RunSpec("grpo", "grpo", s) for s in range(3)] + [compare.RunSpec("null", "grpo", 0),
                                                                        compare.RunSpec("ppo", "ppo", 0)]
    table = learning.gains(specs, tmp_path)
    g = table["grpo"]
    assert g["seeds"] == 3 and g["start"] == pytest.approx(0.91 / 3) and g["final"] == pytest.approx(1.08 / 3)
    assert g["gain_mean"] == pytest.approx(0.17 / 3)
    deltas = [0.06, 0.04, 0.07]
    mean = sum(deltas) / 3
    assert g["gain_se"] == pytest.approx((sum((d - mean) ** 2 for d in deltas) / 2 / 3) ** 0.5)
    # one seed without per-problem records: the two evaluations' errors, unpaired
    assert table["null"]["gain_mean"] == pytest.approx(-0.01)
    assert table["null"]["gain_se"] == pytest.approx((2 * 0.012 ** 2) ** 0.5)
    assert table["null"]["gain_se_kind"] == "unpaired evaluations"
    # three seeds against a one-seed control: the seeds' spread of the finals plus the control's own gain error
    finals = [0.36, 0.34, 0.38]
    finals_se = (sum((f - 0.36) ** 2 for f in finals) / 2 / 3) ** 0.5
    assert g["vs_null"]["diff"] == pytest.approx(1.08 / 3 - 0.29)
    assert g["vs_null"]["se"] == pytest.approx((finals_se ** 2 + 2 * 0.012 ** 2) ** 0.5)
    assert g["vs_null"]["se_kind"] == "seeds, one-seed side's own error added"
    assert "ppo" not in table  # nothing finished

    # three seeds against a three-seed control: unpaired, from both sides' seeds
    for seed, f in enumerate([0.31, 0.33, 0.32]):
        _fake_sampled_run(tmp_path / f"sft-seed{seed}", 0.30, f)
    specs += [compare.RunSpec("sft", "sft", s) for s in range(3)]
    table = learning.gains(specs, tmp_path)
    sft_se = (sum((f - 0.32) ** 2 for f in [0.31, 0.33, 0.32]) / 2 / 3) ** 0.5
    assert table["grpo"]["vs_sft"]["diff"] == pytest.approx(0.36 - 0.32)
    assert table["grpo"]["vs_sft"]["se"] == pytest.approx((finals_se ** 2 + sft_se ** 2) ** 0.5)
    assert table["grpo"]["vs_sft"]["se_kind"] == "seeds"
    # one seed against three: the one-seed side's gain error added to the control's spread
    assert table["null"]["vs_sft"]["diff"] == pytest.approx(0.29 - 0.32)
    assert table["null"]["vs_sft"]["se"] == pytest.approx((sft_se ** 2 + 2 * 0.012 ** 2) ** 0.5)
    text = learning.gains_table(table)
    assert "| run | seeds | start | final | gain | vs sft control | vs null control |" in text
    assert "vs null+dynamic" not in text  # a control that did not run gets no column


def _records(run_dir: Path, start: list[int], final: list[int], samples: int = 4) -> None:
    recs = [{"iteration": it, "problem_ids": [str(i) for i in range(len(c))], "samples": 1, "correct": [0] * len(c),
             "sampled_samples": samples, "sampled_correct": c} for it, c in ((0, start), (10, final))]
    (run_dir / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_learning_benchmark_pairs_one_seed_runs_over_problems(tmp_path):
    """With per-problem records (evaluations.jsonl), one-seed gains and differences from the controls
    are paired over the test problems: hand-computed means and standard errors."""
    from experiments.bench import learning

    start = [0, 2, 4, 4]  # of 4 samples: pass@1 0.625
    _fake_sampled_run(tmp_path / "grpo-seed0", 0.625, 0.75)
    _records(tmp_path / "grpo-seed0", start, [1, 3, 4, 4])  # 12/16
    _fake_sampled_run(tmp_path / "sft-seed0", 0.625, 0.6875)
    _records(tmp_path / "sft-seed0", start, [0, 3, 4, 4])  # 11/16
    specs = [compare.RunSpec("grpo", "grpo", 0), compare.RunSpec("sft", "sft", 0)]
    table = learning.gains(specs, tmp_path)
    g = table["grpo"]
    # per-problem gains 0.25, 0.25, 0, 0: mean 0.125, sd sqrt(1/48), se sqrt(1/48)/2
    assert g["gain_mean"] == pytest.approx(0.125) and g["gain_se_kind"] == "paired problems"
    assert g["gain_se"] == pytest.approx((1 / 48) ** 0.5 / 2)
    # against the SFT control: per-problem differences 0.25, 0, 0, 0
    assert g["vs_sft"]["diff"] == pytest.approx(0.0625) and g["vs_sft"]["se_kind"] == "paired problems"
    assert g["vs_sft"]["se"] == pytest.approx(0.0625)  # sum of squares 3/64, / 3 / 4 = 1/256
    assert "| grpo | 1 | 62.5 | 75.0 | +12.5 ± 7.2 (paired problems) | +6.2 ± 6.2 (paired problems) |" \
        in learning.gains_table(table)

    # a run with only its final record (backfilled) borrows the seed's start record when its logged
    # start is the same evaluation; one whose logged start differs does not
    for name, start_acc in (("null-seed0", 0.625), ("rloo-seed0", 0.6)):
        _fake_sampled_run(tmp_path / name, start_acc, 0.6875)
        _records(tmp_path / name, start, [0, 3, 4, 4])
        lines = (tmp_path / name / "evaluations.jsonl").read_text().splitlines()
        (tmp_path / name / "evaluations.jsonl").write_text(lines[1] + "\n")
    specs += [compare.RunSpec("null", "grpo", 0), compare.RunSpec("rloo", "rloo", 0)]
    table = learning.gains(specs, tmp_path)
    assert table["null"]["gain_se_kind"] == "paired problems"
    assert table["null"]["gain_se"] == pytest.approx(0.0625)  # per-problem gains 0, 0.25, 0, 0
    assert table["rloo"]["gain_se_kind"] == "unpaired evaluations"
    with pytest.raises(ValueError, match="same problems"):
        learning.paired([0.0, 1.0], [1.0])


def test_learning_benchmark_specs_pair_every_run_with_its_controls():
    from experiments.bench import learning

    runs = learning.specs(learning.LearningBench(seeds=[0, 1]))
    labels = [s.dirname for s in runs]
    assert labels.count("grpo-seed1") == 1 and "null-seed0" in labels and "null-seed1" not in labels
    assert "sft-seed1" in labels  # the fair control runs every seed, like the algorithms it is compared with
    null_dynamic = next(s for s in runs if s.label == "null+dynamic")
    assert null_dynamic.algo == "grpo" and {"--permute-advantages", "--dynamic-sampling"} <= set(null_dynamic.flags)
    null = next(s for s in runs if s.label == "null")
    assert null.algo == "grpo" and "--permute-advantages" in null.flags
    sft = next(s for s in runs if s.label == "sft")
    grpo = next(s for s in runs if s.label == "grpo")
    for flag in ("--learning-rate", "--minibatch-size", "--epochs", "--samples-per-prompt", "--warmup-ratio"):
        assert sft.flags[sft.flags.index(flag) + 1] == grpo.flags[grpo.flags.index(flag) + 1], flag


def test_every_learning_benchmark_run_parses_as_a_run_command(tmp_path):
    """Each run's command line is accepted by experiments/run.py's parser (flags exist, values validate),
    so no part of a multi-hour benchmark fails at its start; the ablation rows differ from their base only where
    they should."""
    import tyro

    from experiments import run
    from experiments.bench import learning

    runs = learning.specs(learning.LearningBench(seeds=[0]))
    parsed = {}
    for spec in runs:
        argv = compare.command(spec, "arithmetic", "tiny", 50, tmp_path)[2:]
        parsed[spec.label] = tyro.cli(run.Command, args=argv, config=(tyro.conf.OmitArgPrefixes,))
    assert set(parsed) == set(learning.SETTINGS)
    k_rows = ("vineppo+dynamic-k1", "vineppo+dynamic", "vineppo+dynamic-k9")
    assert [parsed[k].algo.mc_rollouts for k in k_rows] == [1, 4, 9]
    for label in ("vineppo+dynamic-t1.2", "ppo+dynamic-t1.2"):
        assert parsed[label].algo.sampling.temperature == 1.2 and parsed[label].run.eval_sampled_temperature == 0.6
    assert parsed["vineppo"].run.eval_sampled_temperature is None
