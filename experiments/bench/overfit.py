"""Overfit check: on a fixed set of training problems, training reward must climb.

The first diagnostic of the learning issue (issue 11 §1): before asking whether an algorithm
generalises, ask whether it can fit. Every run trains on the same ``--problems`` train problems
(``--train-problems``; each iteration samples all of them, ``--samples`` responses each) from the same
warm start, for ``--iterations`` iterations, with test evaluation off. With ``--null``, each
algorithm also runs as its null control (``--permute-advantages``: the advantages permuted within
each mini-batch, the same update size without the signal), so "RL minus null" is learning and
"null minus start" is drift.

    python experiments/bench/overfit.py                                   # vineppo ppo grpo rloo, 32 problems, 50 iterations
    python experiments/bench/overfit.py --algos grpo --iterations 20 --null --jobs 2

Runs go through `experiments/compare.py`'s runner (one `experiments/run.py` process each, finished
runs skipped, interrupted ones resumed from their last checkpoint), into
``experiments/bench/results/overfit-<task>/``. The script prints, per run, the training reward
(mean over each window of ``--window`` iterations), the share of groups with mixed rewards, and the
climb: the mean of the last window minus the first, with its standard error from the per-iteration
rewards; it writes ``summary.json`` and ``reward_curves.png`` there.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.compare import RunSpec, load_rows, run_all  # noqa: E402


@dataclass
class OverfitConfig:
    """The overfit check's settings."""

    algos: list[str] = field(default_factory=lambda: ["vineppo", "ppo", "grpo", "rloo"])
    """Algorithms to check (names of `experiments/run.py algo:NAME`)."""
    task: str = "arithmetic"
    """Registered task."""
    model: str = "tiny"
    """Model of every run ('tiny' = the cached offline warm start)."""
    problems: int = 32
    """Fixed training problems (the first N of the train split); every iteration samples all of them."""
    samples: int = 4
    """Responses per problem per iteration."""
    iterations: int = 50
    """Iterations per run."""
    seed: int = 0
    """Seed of every run."""
    window: int = 5
    """Iterations per point of the printed curve."""
    null: bool = False
    """Also run each algorithm as its null control (--permute-advantages)."""
    flags: str = ""
    """Extra flags for every run, one string (e.g. --flags="--learning-rate 3e-5")."""
    jobs: int = 1
    """Runs at once (each tiny-model run uses one CPU thread)."""
    out: Path | None = None
    """Results folder (default experiments/bench/results/overfit-<task>)."""
    report_only: bool = False
    """Only print and write the report of what the runs have logged so far (finished or not)."""


def specs(cfg: OverfitConfig) -> list[RunSpec]:
    minibatch = max(cfg.problems * cfg.samples // 2, 1)  # two optimiser steps per epoch
    common = ["--train-problems", str(cfg.problems), "--prompts-per-iteration", str(cfg.problems),
              "--samples-per-prompt", str(cfg.samples), "--minibatch-size", str(minibatch),
              "--micro-batch-size", str(min(16, minibatch)),
              "--eval-every", "0", "--eval-problems", "16", "--no-eval-sampled", *shlex.split(cfg.flags)]
    out = [RunSpec(a, a, cfg.seed, tuple(common)) for a in cfg.algos]
    if cfg.null:
        out += [RunSpec(f"{a}-null", a, cfg.seed, (*common, "--permute-advantages")) for a in cfg.algos]
    return out


def climb(rewards: list[float], window: int) -> tuple[float, float]:
    """Mean of the last ``window`` rewards minus the mean of the first ``window``, and its standard
    error (the two windows' iterations treated as independent samples)."""
    first, last = rewards[:window], rewards[-window:]

    def mean_var(xs: list[float]) -> tuple[float, float]:
        m = sum(xs) / len(xs)
        return m, sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)

    (m0, v0), (m1, v1) = mean_var(first), mean_var(last)
    return m1 - m0, math.sqrt(v0 / len(first) + v1 / len(last))


def report(cfg: OverfitConfig, run_specs: list[RunSpec], out: Path) -> dict:
    results: dict[str, dict] = {}
    lines = [f"overfit check: {cfg.task}, {cfg.problems} fixed problems x {cfg.samples} samples, {cfg.iterations} "
             f"iterations, seed {cfg.seed}; {platform.processor() or platform.machine()}, "
             f"{time.strftime('%Y-%m-%d')}", ""]
    for spec in run_specs:
        rows = [r for r in load_rows(out / spec.dirname) if r.get("iteration", 0) > 0 and "train/reward" in r]
        if not rows:
            lines.append(f"{spec.label:>14}: no iterations yet")
            continue
        rewards = [r["train/reward"] for r in rows]
        mixed = [r.get("train/groups_mixed", float("nan")) for r in rows]
        w = cfg.window
        curve = [sum(rewards[i:i + w]) / len(rewards[i:i + w]) for i in range(0, len(rewards), w)]
        gain, se = climb(rewards, w) if len(rewards) >= 2 * w else (float("nan"), float("nan"))
        results[spec.label] = {"iterations": len(rewards), "reward_curve": curve, "climb": gain, "climb_se": se,
                               "groups_mixed_first": mixed[0], "groups_mixed_last": mixed[-1],
                               "kl_last": rows[-1].get("update/kl")}
        verdict = "climbs" if gain - 2 * se > 0 else ("falls" if gain + 2 * se < 0 else "flat")
        lines.append(f"{spec.label:>14}: reward by {w} iterations " + " ".join(f"{c:.2f}" for c in curve)
                     + f" | climb {gain:+.3f} ± {se:.3f} ({verdict}); mixed groups {mixed[0]:.2f} -> {mixed[-1]:.2f}")
    text = "\n".join(lines)
    print(text)
    (out / "summary.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(cfg).items()},
                                                  "runs": results}, indent=2))
    (out / "summary.txt").write_text(text + "\n")
    if results:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for label, r in results.items():
            xs = [cfg.window * (i + 0.5) for i in range(len(r["reward_curve"]))]
            ax.plot(xs, r["reward_curve"], label=label, linestyle="--" if label.endswith("-null") else "-")
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"training reward (mean of {cfg.window} iterations)")
        ax.set_title(f"overfit check: {cfg.problems} fixed {cfg.task} problems")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "reward_curves.png", dpi=120)
    return results


def main(argv: list[str] | None = None) -> dict:
    import tyro

    cfg = tyro.cli(OverfitConfig, args=argv)
    out = cfg.out or Path(__file__).resolve().parent / "results" / f"overfit-{cfg.task}"
    run_specs = specs(cfg)
    if not cfg.report_only:
        run_all(run_specs, cfg.task, cfg.model, cfg.iterations, out, cfg.jobs)
    return report(cfg, run_specs, out)


if __name__ == "__main__":
    main()
