"""Run several algorithms on one task side by side and compare them.

    python experiments/compare.py --algos vineppo ppo grpo rloo dpo-plus restem sft --task arithmetic
    python experiments/compare.py --algos vineppo grpo --seeds 0 1 2 --iterations 20 --jobs 2 \\
        --flags "grpo: --learning-rate 3e-5" --run-flags="--eval-problems 1000 --eval-every 5"

Every run uses the same model (the cached warm start for ``--model tiny``, built once up front), the
same seeds, the same number of iterations and prompts per iteration (``--prompts-per-iteration`` in
``--run-flags`` applies to all), and the same evaluation. Each run is a separate
`experiments/run.py` process writing to ``<out>/<label>-seed<seed>/`` (its output goes to
``run.log`` there); a run whose ``summary.json`` exists is skipped and an interrupted one continues
from its last checkpoint (``--resume``), so a comparison may be run in parts. Then ``<out>/summary.md`` gets the table — start accuracy, final and best
test accuracy (greedy, mean ± standard error), final sampled accuracy, gradient steps, wall-clock,
KL to the reference at the end, tokens sampled (Monte-Carlo rollouts included) — and PNG plots of
test accuracy against gradient steps, wall-clock and KL.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: ``label`` names the row (an algorithm, or an algorithm with settings)."""

    label: str
    algo: str
    seed: int
    flags: tuple[str, ...] = ()

    @property
    def dirname(self) -> str:
        return f"{self.label}-seed{self.seed}"


@dataclass
class CompareConfig:
    """Side-by-side comparison of algorithms on one task."""

    algos: list[str] = field(default_factory=lambda: ["vineppo", "ppo", "grpo", "rloo", "dpo-plus", "restem"])
    """Algorithms to run (names of `experiments/run.py algo:NAME`)."""
    task: str = "gsm8k"
    """Registered task."""
    model: str = "tiny"
    """Model for every run ('tiny' = the cached offline warm start)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds; every algorithm runs once per seed."""
    iterations: int = 8
    """Iterations per run."""
    out: Path = Path("runs/compare")
    """Output directory of the comparison."""
    jobs: int = 1
    """Runs at once (each tiny-model run uses one CPU thread)."""
    flags: list[str] = field(default_factory=list)
    """Per-algorithm flags, each "ALGO: --flag value ..." (e.g. "grpo: --learning-rate 3e-5")."""
    run_flags: str = ""
    """Flags passed to every run, one string (write --run-flags="--eval-problems 1000 --eval-every 5")."""
    summarize_only: bool = False
    """Only rebuild summary.md and the plots from finished runs."""


def command(spec: RunSpec, task: str, model: str, iterations: int, out: Path) -> list[str]:
    """The ``experiments/run.py`` command line of one run: a fresh start (``--overwrite``), or
    ``--resume`` when the run directory holds a checkpoint of an interrupted run."""
    run_dir = out / spec.dirname
    if (run_dir / "checkpoints" / "latest").is_file() and (run_dir / "config.json").is_file():
        # the run's own total: a spec may set its own --iterations (e.g. RestEM's rounds), later flags win
        own = [spec.flags[i + 1] for i, f in enumerate(spec.flags[:-1]) if f == "--iterations"]
        return [sys.executable, str(ROOT / "experiments" / "run.py"), "--resume", str(run_dir),
                "--iterations", own[-1] if own else str(iterations)]
    return [sys.executable, str(ROOT / "experiments" / "run.py"), f"algo:{spec.algo}", "--task", task, "--model", model,
            "--seed", str(spec.seed), "--iterations", str(iterations), "--out", str(run_dir),
            "--overwrite", "--wandb", "disabled", *spec.flags]


def run_all(specs: list[RunSpec], task: str, model: str, iterations: int, out: Path, jobs: int = 1) -> dict[str, str]:
    """Run every spec not already finished; returns ``{dirname: "done" | "skipped" | "failed (rc N)"}``.

    Runs go to separate processes (``jobs`` at once) with output in ``<run dir>/run.log``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    todo = []
    for spec in specs:
        if (out / spec.dirname / "summary.json").is_file():
            status[spec.dirname] = "skipped"
        else:
            todo.append(spec)
    if model == "tiny" and todo:  # build the shared warm start once, before runs race for it
        from algos.models.warm_start import warm_start_tiny
        from algos.training.config import RunConfig
        from langenv.tasks import make_task

        print(f"[compare] warm start for {task} (cached after the first build)")
        warm_start_tiny(make_task(task), RunConfig().cache_dir)

    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}

    def one(spec: RunSpec) -> str:
        run_dir = out / spec.dirname
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "run.log", "a") as log:
            rc = subprocess.call(command(spec, task, model, iterations, out), stdout=log, stderr=subprocess.STDOUT, env=env)
        return "done" if rc == 0 and (run_dir / "summary.json").is_file() else f"failed (rc {rc}, see {run_dir / 'run.log'})"

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task_id = bar.add_task(f"runs ({len(status)} already done)", total=len(todo))
        with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
            futures = {pool.submit(one, spec): spec for spec in todo}
            for future in futures:
                spec = futures[future]
                status[spec.dirname] = future.result()
                bar.advance(task_id)
                bar.console.print(f"[compare] {spec.dirname}: {status[spec.dirname]}")
    return status


def load_rows(run_dir: Path) -> list[dict]:
    """The metric rows a run has logged so far (finished or not); [] when it has none."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of a killed run
            break
    return rows


def load_run(run_dir: Path) -> dict | None:
    """A finished run's summary and metric rows, or None if it has not finished."""
    if not (run_dir / "summary.json").is_file():
        return None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"summary": json.loads((run_dir / "summary.json").read_text()), "rows": rows}


def _mean_se(values: list[float], within: list[float] | None = None) -> tuple[float, float]:
    """Mean over seeds and its standard error: across seeds when there are several, else the single
    run's own evaluation standard error (``within``)."""
    n = len(values)
    mean = sum(values) / n
    if n > 1:
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return mean, (within[0] if within else float("nan"))


def _fmt(mean: float, se: float, pct: bool = True) -> str:
    scale = 100.0 if pct else 1.0
    if math.isnan(mean):
        return "–"
    return f"{scale * mean:.1f} ± {scale * se:.1f}" if not math.isnan(se) else f"{scale * mean:.1f}"


def summarize(specs: list[RunSpec], out: Path, title: str = "") -> str:
    """Write ``summary.md`` and the plots for the finished runs of ``specs``; returns the markdown."""
    labels = list(dict.fromkeys(s.label for s in specs))
    runs = {label: [r for s in specs if s.label == label and (r := load_run(out / s.dirname))] for label in labels}
    lines = [f"# {title or 'Comparison'}", "",
             "Accuracy in % on the test problems of each evaluation (greedy unless stated; mean ± standard error — "
             "across seeds when there are several, else the evaluation's own). KL: per-token k3 estimate of "
             "KL(π‖π_ref) on sampled test responses. Tokens: every sampled token, Monte-Carlo rollouts included.", "",
             "| run | seeds | start | final | best | final (sampled) | gradient steps | wall-clock (min) | KL at end | tokens sampled |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        rs = runs[label]
        if not rs:
            lines.append(f"| {label} | 0 | – | – | – | – | – | – | – | – |")
            continue
        evals = [[row for row in r["rows"] if "eval/accuracy" in row] for r in rs]
        start = _mean_se([e[0]["eval/accuracy"] for e in evals], [e[0]["eval/accuracy_stderr"] for e in evals])
        final = _mean_se([e[-1]["eval/accuracy"] for e in evals], [e[-1]["eval/accuracy_stderr"] for e in evals])
        best = _mean_se([max(row["eval/accuracy"] for row in e) for e in evals])
        sampled = ([e[-1]["eval/accuracy_sampled"] for e in evals] if all("eval/accuracy_sampled" in e[-1] for e in evals)
                   else None)
        sampled_se = [e[-1].get("eval/accuracy_sampled_stderr", float("nan")) for e in evals]
        kl = [e[-1].get("eval/kl", float("nan")) for e in evals]
        steps = sum(r["summary"]["total/optimizer_steps"] for r in rs) / len(rs)
        wall = sum(r["summary"]["wall_time_s"] for r in rs) / len(rs) / 60
        tokens = sum(r["summary"]["total/tokens"] for r in rs) / len(rs)
        lines.append(
            f"| {label} | {len(rs)} | {_fmt(*start)} | {_fmt(*final)} | {_fmt(*best)} | "
            f"{_fmt(*_mean_se(sampled, sampled_se)) if sampled else '–'} | {steps:.0f} | {wall:.1f} | "
            f"{sum(kl) / len(kl):.4f} | {tokens:,.0f} |")
    lines += ["", "Plots: `accuracy_vs_steps.png`, `accuracy_vs_wallclock.png`, `accuracy_vs_kl.png`.", ""]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    _plots(runs, out)
    return text


def _plots(runs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_spec = [("total/optimizer_steps", "gradient steps", "accuracy_vs_steps.png"),
                 ("time/elapsed", "wall-clock (min)", "accuracy_vs_wallclock.png"),
                 ("eval/kl", "KL(π‖π_ref) per token (nats)", "accuracy_vs_kl.png")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for x_key, x_label, filename in axes_spec:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, (label, rs) in enumerate(runs.items()):
            for j, r in enumerate(rs):
                pts = [(row.get(x_key, float("nan")), row["eval/accuracy"]) for row in r["rows"] if "eval/accuracy" in row]
                pts = [(x / 60 if x_key == "time/elapsed" else x, y) for x, y in pts if not math.isnan(x)]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, [100 * y for y in ys], marker="o", ms=3, color=colors[i % len(colors)],
                            alpha=0.9 if j == 0 else 0.5, label=label if j == 0 else None)
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=120)
        plt.close(fig)


def parse_flags(entries: list[str], algos: list[str]) -> dict[str, tuple[str, ...]]:
    """``["grpo: --learning-rate 3e-5", ...]`` -> ``{"grpo": ("--learning-rate", "3e-5")}``.

    Raises:
        ValueError: an entry without "ALGO:" or naming an algorithm not in ``algos``.
    """
    out: dict[str, tuple[str, ...]] = {}
    for entry in entries:
        name, sep, rest = entry.partition(":")
        if not sep or name.strip() not in algos:
            raise ValueError(f"--flags entry {entry!r}: expected 'ALGO: --flag value ...' with ALGO one of {algos}")
        out[name.strip()] = out.get(name.strip(), ()) + tuple(shlex.split(rest))
    return out


def main(argv: list[str] | None = None) -> str:
    import tyro

    from experiments.presets import ALGORITHMS

    cfg = tyro.cli(CompareConfig, args=argv)
    unknown = [a for a in cfg.algos if a not in ALGORITHMS]
    if unknown:
        raise SystemExit(f"unknown algorithm(s) {unknown}; valid: {', '.join(ALGORITHMS)}")
    per_algo = parse_flags(cfg.flags, cfg.algos)
    specs = [RunSpec(a, a, seed, tuple(shlex.split(cfg.run_flags)) + per_algo.get(a, ())) for a in cfg.algos for seed in cfg.seeds]
    if not cfg.summarize_only:
        t0 = time.perf_counter()
        status = run_all(specs, cfg.task, cfg.model, cfg.iterations, cfg.out, cfg.jobs)
        failed = {k: v for k, v in status.items() if v.startswith("failed")}
        print(f"[compare] {len(status) - len(failed)} of {len(status)} runs finished in {time.perf_counter() - t0:.0f} s")
        for name, why in failed.items():
            print(f"[compare] {name}: {why}")
    text = summarize(specs, cfg.out, title=f"{', '.join(cfg.algos)} on {cfg.task}")
    print(text)
    print(f"[compare] wrote {cfg.out / 'summary.md'} and plots")
    return text


if __name__ == "__main__":
    main()
