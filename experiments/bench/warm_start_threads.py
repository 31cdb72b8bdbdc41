"""Warm-start SFT speed on a shared 2-core CPU (issue 16 item 4): torch threads x one competing busy process.

    python experiments/bench/warm_start_threads.py                 # arithmetic recipe, 2 rounds (~6 min)
    python experiments/bench/warm_start_threads.py --task gsm8k --steps 4 --rounds 1

What still trains on the CPU (a warm start whose recipe has no shipped copy: ``--task rg:<dataset>``,
``--rebuild-warm-start``, a changed recipe) must not collapse when another process shares the cores. Each
configuration runs in its own subprocess (thread settings must be fixed before torch starts its OpenMP pool):
the task's warm-start recipe (`algos.models.warm_start.tiny_setup`: tokenizer, model, SFT batch) for
``--warmup + --steps`` SFT steps, timed per step from `algos.models.sft.train_sft`'s ``seconds``; the
figure is the median step time of the last ``--steps``. Configurations:

* ``threads`` 1 or 2 (``torch.set_num_threads`` before training);
* ``competitor``: none, or one other busy process (`COMPETITORS`: a single-threaded Python loop, or a 2-thread
  torch job of small matrix products) started before and killed after the run, the situation the issue describes;
* ``omp_passive``: ``OMP_WAIT_POLICY=PASSIVE`` in the subprocess and its competitor (idle OpenMP threads sleep
  instead of spinning).

Other work on the machine distorts the "quiet" rows: run it alone, or above the rest with
``nice -n -10`` (root), which the output records (the competitor inherits the same priority).

Rounds interleave all configurations (the order rotates per round); the table gives the median over rounds,
and the ratio of each to the first configuration run (2 threads on a quiet machine by default). JSON goes to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
#: One other busy process: a single-threaded Python loop, or a 2-thread torch job (small matrix products in a
#: loop, like a test run or another training run on the tiny model).
COMPETITORS = {
    "python": "while True: pass",
    "torch2": "import torch\ntorch.set_num_threads(2)\na = torch.randn(256, 256)\nwhile True: a @ a",
}
CONFIGS = [  # (name, threads, competitor or None, omp_passive)
    ("2 threads, quiet", 2, None, False),
    ("1 thread, quiet", 1, None, False),
    ("2 threads, 1 busy Python process", 2, "python", False),
    ("2 threads, 1 busy Python process, OMP passive", 2, "python", True),
    ("1 thread, 1 busy Python process", 1, "python", False),
    ("2 threads, a 2-thread torch process", 2, "torch2", False),
    ("2 threads, a 2-thread torch process, OMP passive (both)", 2, "torch2", True),
    ("1 thread, a 2-thread torch process", 1, "torch2", False),
    ("2 threads, quiet, OMP passive", 2, None, True),
]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def worker(task_name: str, threads: int, steps: int) -> list[float]:
    """Run ``steps`` SFT steps of the task's warm-start recipe; return each step's seconds."""
    import dataclasses

    import torch

    from algos.models.sft import train_sft
    from algos.models.tiny import build_char_tokenizer, build_tiny_model, build_tokenizer
    from algos.models.warm_start import _tiny_inputs
    from langenv.tasks import make_task

    torch.set_num_threads(threads)
    _, examples, texts, setup = _tiny_inputs(make_task(task_name))
    tok = build_char_tokenizer(texts) if setup.tokenizer == "char" else build_tokenizer(texts, setup.vocab_size)
    torch.manual_seed(0)
    model = build_tiny_model(tok, **setup.model_overrides)
    config = dataclasses.replace(setup.sft_config, max_steps=steps)
    metrics = train_sft(model, tok, examples, config, progress=False)
    seconds = [m["seconds"] for m in metrics]
    return [b - a for a, b in zip([0.0] + seconds[:-1], seconds)]


def run_config(task: str, threads: int, competitor: str | None, omp_passive: bool, total: int) -> list[float]:
    env = dict(os.environ)
    if omp_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    busy = subprocess.Popen([sys.executable, "-c", COMPETITORS[competitor]], env=env) if competitor else None
    try:
        out = subprocess.run([sys.executable, str(HERE), "--worker", "--task", task, "--threads", str(threads),
                              "--steps", str(total)], env=env, capture_output=True, text=True, check=True, cwd=REPO)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--steps", type=int, default=6, help="timed SFT steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed SFT steps first")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--configs", nargs="+", type=int, default=None,
                   help="indices into CONFIGS to run (default: all); the first one is the ratios' base")
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=REPO / "experiments/bench/results/warm_start_threads.json")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.task, args.threads, args.steps)))
        return

    print(f"task {args.task}: {args.warmup} + {args.steps} SFT steps per run, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs ({cpu_name()}), nice {os.nice(0)}; nothing else was started by this script "
          f"besides the competitor; load average at start {os.getloadavg()[0]:.2f}")
    configs = [CONFIGS[i] for i in args.configs] if args.configs else CONFIGS
    results: dict[str, list[float]] = {name: [] for name, *_ in configs}
    t0 = time.time()
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for name, threads, competitor, passive in order:
            steps = run_config(args.task, threads, competitor, passive, args.warmup + args.steps)[args.warmup:]
            results[name].append(statistics.median(steps))
            print(f"  round {r + 1}: {name}: {results[name][-1]:.3f} s/step", flush=True)
    base = statistics.median(results[configs[0][0]])
    rows = {name: {"seconds_per_step": statistics.median(v), "runs": v,
                   "vs_first": statistics.median(v) / base} for name, v in results.items()}
    print(f"\n{'configuration':42s} {'s/step':>8s} {'x ' + configs[0][0]:>18s}")
    for name, row in rows.items():
        print(f"{name:42s} {row['seconds_per_step']:8.3f} {row['vs_first']:18.2f}")
    import torch

    from algos.models.sft import cpu_has_fast_bf16
    from algos.models.warm_start import tiny_setup

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "task": args.task, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "cpus": os.cpu_count(), "processor": cpu_name(), "nice": os.nice(0), "torch": torch.__version__,
        "bf16_autocast": tiny_setup(args.task).sft_config.bf16_autocast, "cpu_has_fast_bf16": cpu_has_fast_bf16(),
        "wall_seconds": time.time() - t0, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
