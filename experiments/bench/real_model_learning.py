"""Does a real pretrained model learn here? SmolLM2-135M-Instruct on the arithmetic task: a short format SFT
on reference solutions, then GRPO against the fair SFT control (and the permuted-advantage null control), all
from the same format-SFT model, evaluated on the same test problems (paired).

    flock /tmp/langenv-cpu.lock python experiments/bench/real_model_learning.py     # format SFT and 3 runs: ~2 h
    python experiments/bench/real_model_learning.py --only grpo+dynamic-lr3e-6 sft-lr3e-6 --jobs 2
    python experiments/bench/real_model_learning.py --only grpo grpo+dynamic-lr3e-6 sft-lr3e-6 --summarize-only

Why the format SFT first: zero-shot through its chat template the model never writes the task's ``#### N``
answer line on arithmetic (0/40 strict, BENCHMARKS "Real model: SmolLM2-135M"), so every reward is 0, every
GRPO advantage is 0 and nothing can be learned. ``--format-iterations`` iterations of SFT on reference
solutions (the ``algo:sft`` control's trainer) teach the format; the RL comparison starts from its final model.

Metric as the learning benchmark's (experiments/bench/learning.py): sampled pass@1 (T 0.6, top-p 0.9,
``--eval-samples`` per problem) on the first ``--eval-problems`` test problems before and after, the gain
with its standard error paired over problems, and each run's difference from the controls. Runs, logs and
``summary.{md,json}`` go to ``experiments/bench/results/real-model-learning/``; finished runs are skipped, so
a stopped benchmark continues where it was.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from experiments import compare  # noqa: E402
from experiments.bench import learning  # noqa: E402

PROMPTS = 8  # problems per iteration
G = 8  # samples per problem
MINIBATCH = 32  # episodes per optimiser step: 2 steps per iteration
MAX_NEW = 96  # response budget (tokens); the reference solutions are 20-60 SmolLM2 tokens
LR = "1e-5"


@dataclass
class RealModelLearning:
    """Format SFT, then GRPO vs the SFT control on SmolLM2-135M, arithmetic."""

    model: str = "smollm2-135m"
    """The pretrained model (`--model` of experiments/run.py)."""
    format_iterations: int = 30
    """Format-SFT iterations (16 reference solutions each, mini-batch 8: 2 optimiser steps)."""
    iterations: int = 16
    """Iterations of each compared run (PROMPTS x G episodes, 2 optimiser steps each)."""
    eval_problems: int = 200
    """Test problems per evaluation (the same first N for every run)."""
    eval_samples: int = 4
    """Sampled responses per test problem."""
    only: list[str] = field(default_factory=lambda: ["grpo", "grpo+dynamic-lr3e-6", "sft-lr3e-6"])
    """Compared runs (labels): ``grpo`` (lr 1e-5), ``grpo-lr3e-6``, ``grpo+dynamic-lr3e-6`` (DAPO dynamic
    sampling, 3 extra rounds), ``sft`` / ``sft-lr3e-6`` (the fair SFT controls at each learning rate),
    ``null`` (GRPO at 1e-5 with permuted advantages), ``null+dynamic-lr3e-6`` (the null control of
    ``grpo+dynamic-lr3e-6``)."""
    jobs: int = 1
    """Compared runs at once (each then uses one torch thread)."""
    seed: int = 0
    out: Path = Path(__file__).resolve().parent / "results" / "real-model-learning"
    """Results folder."""
    summarize_only: bool = False
    """Only rebuild summary.md / summary.json from the finished runs."""


def specs(cfg: RealModelLearning) -> tuple[compare.RunSpec, list[compare.RunSpec]]:
    """The format-SFT run and the compared runs (which start from its final model)."""
    evaluation = (f"--max-new-tokens {MAX_NEW} --eval-problems {cfg.eval_problems} --eval-every {cfg.iterations} "
                  f"--eval-sampled-samples {cfg.eval_samples} --save-every 8")
    fmt = compare.RunSpec("format-sft", "sft", cfg.seed, tuple(
        f"--max-new-tokens {MAX_NEW} --eval-problems 20 --no-eval-sampled --eval-every {cfg.format_iterations} "
        f"--save-every 10 --prompts-per-iteration 16 --minibatch-size 8 --micro-batch-size 8 --learning-rate 2e-5 "
        "--warmup-ratio 0.1".split()))
    rl = f"{evaluation} --prompts-per-iteration {PROMPTS} --samples-per-prompt {G} --minibatch-size {MINIBATCH} " \
         "--micro-batch-size 16 --warmup-ratio 0.1 --epochs 1"
    if cfg.jobs > 1:
        rl += " --threads 1"
    flags = {"grpo": ("grpo", f"{rl} --learning-rate {LR} --kl-coef 1e-3"),
             "grpo-lr3e-6": ("grpo", f"{rl} --learning-rate 3e-6 --kl-coef 1e-3"),
             "grpo+dynamic-lr3e-6": ("grpo", f"{rl} --learning-rate 3e-6 --kl-coef 1e-3 --dynamic-sampling 3"),
             "sft": ("sft", f"{rl} --learning-rate {LR}"),
             "sft-lr3e-6": ("sft", f"{rl} --learning-rate 3e-6"),
             "null": ("grpo", f"{rl} --learning-rate {LR} --kl-coef 1e-3 --permute-advantages"),
             "null+dynamic-lr3e-6": ("grpo", f"{rl} --learning-rate 3e-6 --kl-coef 1e-3 --dynamic-sampling 3 "
                                             "--permute-advantages")}
    unknown = [n for n in cfg.only if n not in flags]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; valid: {', '.join(flags)}")
    return fmt, [compare.RunSpec(n, flags[n][0], cfg.seed, tuple(flags[n][1].split())) for n in cfg.only]


def main(argv: list[str] | None = None) -> dict:
    import tyro

    cfg = tyro.cli(RealModelLearning, args=argv)
    fmt, runs = specs(cfg)
    start_model = cfg.out / fmt.dirname / "final"
    if not cfg.summarize_only:
        status = compare.run_all([fmt], "arithmetic", cfg.model, cfg.format_iterations, cfg.out)
        if status[fmt.dirname].startswith("failed"):
            raise SystemExit(f"[real-model-learning] format SFT {status[fmt.dirname]}")
        status = compare.run_all(runs, "arithmetic", str(start_model), cfg.iterations, cfg.out, cfg.jobs)
        for name, why in status.items():
            if why.startswith("failed"):
                print(f"[real-model-learning] {name}: {why}")
    text = compare.summarize([fmt, *runs], cfg.out, title=f"SmolLM2-135M on arithmetic: {cfg.format_iterations} "
                             f"format-SFT iterations, then {cfg.iterations} iterations x {PROMPTS} problems x {G} "
                             f"samples, {cfg.eval_problems} test problems x {cfg.eval_samples}")
    controls = ("sft", "sft-lr3e-6", "null", "null+dynamic-lr3e-6")
    table = learning.gains(runs, cfg.out, controls=controls)
    (cfg.out / "summary.json").write_text(json.dumps({"start_model": str(start_model.relative_to(cfg.out)),
                                                      "runs": table}, indent=2))
    text += "\n" + learning.gains_table(table, controls)
    (cfg.out / "summary.md").write_text(text)
    print(text)
    return table


if __name__ == "__main__":
    main()
