"""Iteration breakdown and peak memory: VinePPO vs PPO at equal batch (issue 4, benchmarks (b) and (d)).

    python experiments/bench/iteration.py                          # arithmetic, CPU tiny settings, both samplers
    python experiments/bench/iteration.py --samplers fast --iterations 3
    python experiments/bench/iteration.py --task gsm8k --out experiments/bench/results/iteration-gsm8k.json

Every configuration (algorithm x sampler) is a separate ``experiments/run.py`` process on the same
cached tiny warm start, the same problems (same seed) and the same batch: ``--prompts`` problems x
``--samples`` responses per iteration, one mini-batch per epoch, the CLI's ``cpu_tiny`` settings
otherwise; VinePPO adds ``--mc-rollouts`` continuations per step boundary, PPO trains a critic. The
per-iteration seconds come from each run's own ``metrics.jsonl`` (``time/*`` keys, iteration 1 is
dropped as warm-up when there are more than 2), so evaluation is excluded. Peak memory is the
process's maximum resident set size (``ru_maxrss`` from ``os.wait4``), model loading included, grading
worker processes not included.

Prints, side by side in one run: seconds per iteration in sampling, MC rollouts, grading,
log-prob passes, value/critic work, update; the VinePPO/PPO ratio per sampler; and the peak RSS of
each configuration. Writes the numbers as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

#: phase -> metrics keys summed into it (each algorithm logs the ones it has)
PHASES = {
    "sampling": ("time/sampling",),
    "mc_rollouts": ("time/mc_rollouts",),
    "grading": ("time/grading",),
    "values (critic fwd / step split)": ("time/values", "time/advantages"),
    "logprob passes": ("time/logprobs",),
    "update": ("time/update",),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, python {platform.python_version()}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}")


def run_config(algo: str, sampler: str, args, workdir: Path) -> dict:
    out = workdir / f"{algo}-{sampler}"
    cmd = [sys.executable, str(REPO / "experiments" / "run.py"), f"algo:{algo}", "--task", args.task,
           "--iterations", str(args.iterations), "--out", str(out), "--overwrite", "--wandb", "disabled",
           "--eval-problems", "4", "--eval-every", "0", "--no-eval-sampled", "--save-every", "0",
           "--canary-problems", "0", "--sampler", sampler, "--threads", str(args.threads), "--seed", str(args.seed),
           "--prompts-per-iteration", str(args.prompts), "--samples-per-prompt", str(args.samples),
           "--max-new-tokens", str(args.max_new_tokens), "--minibatch-size", str(args.prompts * args.samples),
           "--micro-batch-size", str(args.micro_batch)]
    if algo == "vineppo":
        cmd += ["--mc-rollouts", str(args.mc_rollouts)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # reaps it ourselves to get its own rusage
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{algo}/{sampler} failed ({proc.returncode}):\n{log[-3000:]}")
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    if len(rows) > 2:
        rows = rows[1:]  # the first iteration pays one-off costs (allocator, caches)
    phases = {name: sum(sum(r.get(k, 0.0) for k in keys) for r in rows) / len(rows) for name, keys in PHASES.items()}
    # time/update includes the log-prob passes where they are reported separately
    phases["update"] -= phases["logprob passes"]
    iteration = sum(r["time/iteration"] for r in rows) / len(rows)
    phases["other"] = iteration - sum(phases.values())
    return {"algo": algo, "sampler": sampler, "iteration_s": iteration, "phases_s": phases, "wall_s": wall,
            "peak_rss_mib": usage.ru_maxrss / 1024, "tokens_per_iteration": sum(
                v for r in rows for k, v in r.items() if k.startswith("tokens/")) / len(rows),
            "iterations_measured": len(rows)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--samplers", nargs="+", default=["hf", "fast"])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--mc-rollouts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "experiments" / "bench" / "results" / "iteration.json")
    p.add_argument("--runs", type=Path, default=None, help="keep the run directories here (default: a temporary dir)")
    args = p.parse_args(argv)

    from algos.models.warm_start import warm_start_tiny
    from langenv.tasks import make_task

    warm_start_tiny(make_task(args.task), Path(os.environ.get("LANGENV_CACHE", Path.home() / ".cache" / "langenv")))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.runs or Path(tmp)
        for sampler in args.samplers:
            for algo in ("vineppo", "ppo"):
                print(f"[bench] {algo} with the {sampler} sampler ...", flush=True)
                results.append(run_config(algo, sampler, args, workdir))

    where = machine()
    print(f"\nIteration breakdown, {args.task}: {args.prompts} problems x {args.samples} samples, K = {args.mc_rollouts}, "
          f"{args.max_new_tokens} new tokens, {args.threads} thread(s); {where}")
    header = f"{'phase (s / iteration)':34}" + "".join(f"{r['algo'] + '/' + r['sampler']:>16}" for r in results)
    print(header)
    for phase in [*PHASES, "other"]:
        print(f"{phase:34}" + "".join(f"{r['phases_s'][phase]:16.2f}" for r in results))
    print(f"{'iteration':34}" + "".join(f"{r['iteration_s']:16.2f}" for r in results))
    print(f"{'tokens sampled / iteration':34}" + "".join(f"{r['tokens_per_iteration']:16.0f}" for r in results))
    print(f"{'peak RSS (MiB)':34}" + "".join(f"{r['peak_rss_mib']:16.0f}" for r in results))
    ratios = {}
    for sampler in args.samplers:
        by = {r["algo"]: r for r in results if r["sampler"] == sampler}
        ratios[sampler] = by["vineppo"]["iteration_s"] / by["ppo"]["iteration_s"]
        print(f"VinePPO / PPO iteration time with the {sampler} sampler: {ratios[sampler]:.2f}x (goal <= 1.5x)")
    if "hf" in args.samplers and "fast" in args.samplers:
        hf = {r["algo"]: r for r in results if r["sampler"] == "hf"}
        fast = {r["algo"]: r for r in results if r["sampler"] == "fast"}
        print(f"VinePPO MC rollouts, hf -> fast sampler: {hf['vineppo']['phases_s']['mc_rollouts'] / max(fast['vineppo']['phases_s']['mc_rollouts'], 1e-9):.2f}x faster; "
              f"VinePPO(fast) / PPO(hf): {fast['vineppo']['iteration_s'] / hf['ppo']['iteration_s']:.2f}x")
    report = {"machine": where, "settings": vars(args), "results": results,
              "vineppo_over_ppo": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
