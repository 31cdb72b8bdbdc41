"""Time from a user's first command to its first finished iteration (issue 16 item 4: goal ≤ 60 s).

    python experiments/bench/first_iteration.py                       # default job and --task arithmetic
    python experiments/bench/first_iteration.py --jobs "algo:grpo --task arithmetic"

Each job runs ``python experiments/run.py <job> --iterations 2`` as a user would (two, so that iteration 1 is
logged as soon as it ends, not after the final evaluation), in a fresh process with an
**empty cache** (a new temporary ``--cache-dir``: what a fresh install has) and then a second time with that
cache filled (every later run). The script watches the run's ``metrics.jsonl`` and records, from the
command's start: when the evaluation before training has been logged (iteration 0) and when iteration 1 has
been logged; then it stops the run.
It also reads the run's own split: ``time/eval`` (the evaluation before training) and the iteration's
``time/*`` phases. Where the warm start came from (shipped copy, cache or training) is read from the cache's
marker. Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from experiments.bench.warm_start_threads import cpu_name  # noqa: E402


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return rows


def time_job(job: str, cache: Path, workdir: Path, timeout: float) -> dict:
    """Run one job until its iteration 1 is logged; the seconds from launch to each milestone."""
    out = workdir / f"run-{time.time_ns()}"
    cmd = [sys.executable, str(REPO / "experiments" / "run.py"), *shlex.split(job), "--iterations", "2",
           "--cache-dir", str(cache), "--out", str(out), "--wandb", "disabled"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marks: dict[str, float] = {}
    rows: list[dict] = []
    try:
        while time.perf_counter() - t0 < timeout:
            rows = _rows(out / "metrics.jsonl")
            for row in rows:
                marks.setdefault(f"iteration_{row.get('iteration')}", time.perf_counter() - t0)
            if "iteration_1" in marks or proc.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        proc.kill()
        _, err = proc.communicate()
    if "iteration_1" not in marks:
        raise RuntimeError(f"{job}: no iteration 1 after {time.perf_counter() - t0:.0f} s (rc {proc.returncode}):\n"
                           f"{err[-3000:]}")
    before = next(r for r in rows if r.get("iteration") == 0)
    first = next(r for r in rows if r.get("iteration") == 1)
    markers = [json.loads(p.read_text()) for p in cache.glob("*/warm_start.json")]
    return {"seconds_to_eval_logged": marks["iteration_0"], "seconds_to_iteration_1": marks["iteration_1"],
            "eval_before_seconds": before.get("time/eval"),
            "iteration_phases": {k: v for k, v in first.items() if k.startswith("time/")},
            "warm_start_source": [m.get("source", "trained") for m in markers]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", nargs="+", default=["algo:vineppo", "algo:vineppo --task arithmetic"])
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run before giving up")
    ap.add_argument("--out", type=Path, default=REPO / "experiments/bench/results/first_iteration.json")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs ({cpu_name()}), nice {os.nice(0)}; load average at start "
          f"{os.getloadavg()[0]:.2f}; one run at a time", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="langenv-first-") as tmp:
        for job in args.jobs:
            cache = Path(tmp) / f"cache-{len(results)}"
            fresh = time_job(job, cache, Path(tmp), args.timeout)
            again = time_job(job, cache, Path(tmp), args.timeout)
            results[job] = {"empty_cache": fresh, "filled_cache": again}
            for name, r in (("empty cache", fresh), ("filled cache", again)):
                print(f"{job} ({name}): evaluation before training logged at {r['seconds_to_eval_logged']:.1f} s "
                      f"(of which the evaluation {r['eval_before_seconds']:.1f} s), iteration 1 at "
                      f"{r['seconds_to_iteration_1']:.1f} s; warm start: {r['warm_start_source']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpus": os.cpu_count(), "processor": cpu_name(), "nice": os.nice(0),
                                    "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
