"""Benchmark (issue 4 (c)): what the environment and the grader cost, next to what an iteration costs.

    python experiments/bench/env_grading.py                                   # ~1-2 min on 2 CPU cores
    python experiments/bench/env_grading.py --metrics RUN/metrics.jsonl       # + shares of an iteration
    python experiments/bench/env_grading.py --quick                           # fewer repeats / checks

Measures, on GSM8K test problems with the offline tiny byte-level BPE tokenizer (`algos.models.tiny`,
vocabulary 2,048, trained on 400 GSM8K train problems):

* environment operations in microseconds per call (median of ``--repeats`` runs): `LanguageEnv.snapshot`,
  `LanguageEnv.restore`, `LanguageEnv.step` with a one-token action and with a step-sized action
  (the first line of the reference solution), at response lengths 0 and 256 tokens (a step
  decodes the whole response to look for stop strings, so its cost grows with the response),
  `EnvState.prefix`, and `LanguageEnv.step_states` on a batch of 64 live states (per item) with
  a step-sized chunk (no grading), and with whole reference completions + EOS (grading included);
* grading throughput in checks/s on real responses: the reference solutions of GSM8K test (1,319)
  and MATH-500 (500) against their answers (correct), and perturbed copies whose final answer was
  changed (wrong: the last digit of the answer is changed, or ``+1`` appended to an answer with no
  digit), graded (a) serially in process with `langenv.grading.grade` and (b) through a fresh
  `GradingPool` (2 workers, 2 s timeout: the in-process fast path plus the killable sympy workers),
  whose start-up (first call) is timed separately. ``pool share`` is the fraction of checks that
  needed a worker (sympy);
* latency (issue 12; goal <= 2 s each): a COLD first check, i.e. ``langenv.grading.is_correct`` in a
  fresh ``python`` process whose pool has not started (the worker's interpreter start, the sympy /
  math-verify import and warm-up, and the check), for ordinary MATH answers that need sympy
  (``$\boxed{50.27}$`` vs ``16\pi``, ``$(x+1)^2$`` vs ``x^2+2x+1``), worst of ``--cold-repeats``
  fresh processes (the import of langenv itself is reported apart); and every ADVERSARIAL probe
  (the ``adversarial`` cases of ``shared/testdata/grader_cases.jsonl`` and the dangerous inputs of
  ``tests/test_grading.py``: exponent towers, huge factorials, deep nesting, 5,000-digit numbers)
  graded one at a time through a warm `GradingPool`, worst case reported.

With ``--metrics`` (a run's ``metrics.jsonl``, written by `algos.training.loop`), the costs are set against
each logged iteration: ``time/grading`` (the run's own measurement of env stepping + grading, from
`algos.rollout`) over ``time/iteration``, and estimates from this benchmark: env = completions x
step_states µs per completion without grading; grading = completions / pool checks/s of the run's
task kind (``run.task`` from the ``config.json`` beside the metrics, or ``--task``: GSM8K rows for
gsm8k/arithmetic, MATH rows for math, all rows otherwise); completions = episodes (the sum of the
``grading/*`` counts) plus ``vineppo/mc_rollouts`` when logged. Goals: env <= 1 % and grading <= 5 %
of an iteration.

Writes JSON to ``--out`` (default ``experiments/bench/results/env_grading.json``) and prints a table
with the machine (CPU model, cores, Python/torch versions) and the date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "experiments" / "bench" / "results" / "env_grading.json"
ENV_GOAL, GRADING_GOAL = 0.01, 0.05  # shares of time/iteration


# ------------------------------------------------------------------------------------ machine
def machine() -> dict:
    """CPU model, cores (logical, and usable by this process), Python/torch versions, date (UTC)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    import torch
    import transformers

    return {
        "cpu": cpu,
        "cores_logical": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    }


# ---------------------------------------------------------------------------------------- env
def _median_us(fn, calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of ``calls`` calls of ``fn()``, in microseconds."""
    runs = []
    for _ in range(repeats):
        t = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter_ns() - t) / calls / 1e3)
    return statistics.median(runs)


def _median_us_with_setup(setup, fn, calls: int, repeats: int) -> float:
    """Like `_median_us`, timing only ``fn(setup())`` (setup excluded), in microseconds."""
    runs = []
    for _ in range(repeats):
        total = 0
        for _ in range(calls):
            arg = setup()
            t = time.perf_counter_ns()
            fn(arg)
            total += time.perf_counter_ns() - t
        runs.append(total / calls / 1e3)
    return statistics.median(runs)


def bench_env(tok, repeats: int) -> dict:
    from langenv import LanguageEnv

    env = LanguageEnv("gsm8k", tok, split="test", max_new_tokens=1024)
    enc = lambda s: list(tok(s, add_special_tokens=False).input_ids)
    problem = env.problems[0]
    gold = enc(env.task.target(problem))
    step_chunk = enc("\n" + problem.solution.split("\n")[0])  # one reasoning step (a line)
    filler = (gold * 20)[:256]
    if tok.eos_token_id in filler:
        raise RuntimeError("filler tokens contain EOS")
    env.reset(options={"problem_index": 0})
    s0 = env.snapshot()
    s256 = env.step_states([s0], [filler])[0].state
    assert not s256.done
    out: dict[str, float] = {}
    out["snapshot"] = _median_us(env.snapshot, 2000, repeats)
    out["restore"] = _median_us(lambda: env.restore(s256), 2000, repeats)
    out["EnvState.prefix(128) of 256"] = _median_us(lambda: s256.prefix(128), 2000, repeats)
    for name, state in (("len 0", s0), ("len 256", s256)):
        out[f"step 1 token ({name})"] = _median_us_with_setup(lambda s=state: env.restore(s), lambda _: env.step([5]), 300, repeats)
        out[f"step {len(step_chunk)}-token step ({name})"] = _median_us_with_setup(
            lambda s=state: env.restore(s), lambda _: env.step(step_chunk), 300, repeats)
    batch = 64
    starts = [env.initial_state(env.problems[i]) for i in range(batch)]
    steps_ = [enc("\n" + p.solution.split("\n")[0]) for p in env.problems[:batch]]
    golds = [enc(env.task.target(p)) + [tok.eos_token_id] for p in env.problems[:batch]]
    out[f"step_states x{batch}, a step each (per item, no grading)"] = _median_us(
        lambda: env.step_states(starts, steps_), 5, repeats) / batch
    no_eos = [g[:-1] for g in golds]
    out[f"step_states x{batch}, whole completion, no EOS (per item, no grading)"] = _median_us(
        lambda: env.step_states(starts, no_eos), 5, repeats) / batch
    env.step_states(starts, golds)  # warm the default pool, if any check needs it
    out[f"step_states x{batch}, whole completion + EOS (per item, grading incl.)"] = _median_us(
        lambda: env.step_states(starts, golds), 5, repeats) / batch
    meta = {"completion_tokens_mean": statistics.mean(len(g) for g in golds), "step_chunk_tokens": len(step_chunk),
            "batch": batch, "vocab": len(tok)}
    return {"us_per_call": out, "meta": meta}


# ------------------------------------------------------------------------------------ grading
def _perturb(answer: str) -> str:
    """A wrong final answer: the last digit changed (+1 mod 10), or ``+1`` appended if no digit."""
    for i in range(len(answer) - 1, -1, -1):
        if answer[i].isdigit():
            return answer[:i] + str((int(answer[i]) + 1) % 10) + answer[i + 1:]
    return answer + "+1"


def _perturb_boxed(solution: str) -> str:
    """The solution with the content of its last ``\\boxed{..}`` perturbed (see `_perturb`)."""
    start = solution.rfind("\\boxed{")
    if start < 0:
        return solution + " \\boxed{-1}"
    i = j = start + len("\\boxed{")
    depth = 1
    while j < len(solution) and depth:
        depth += {"{": 1, "}": -1}.get(solution[j], 0)
        j += 1
    return solution[:i] + _perturb(solution[i:j - 1]) + solution[j - 1:]


def grading_sets(limit: int | None) -> dict[str, list[tuple[str, str, str]]]:
    """(completion, reference answer, kind) triples: correct and wrong, for GSM8K test and MATH-500."""
    from langenv.tasks import make_task

    sets = {}
    for name, kind in (("gsm8k", "gsm8k"), ("math", "math")):
        problems = make_task(name).load("test")[:limit]
        right, wrong = [], []
        for p in problems:
            sol = p.solution
            right.append((sol, p.answer, kind))
            if kind == "gsm8k":
                head, _, ans = sol.rpartition("####")
                wrong.append((f"{head}#### {_perturb(ans.strip())}", p.answer, kind))
            else:
                wrong.append((_perturb_boxed(sol), p.answer, kind))
        sets[f"{name} correct"] = right
        sets[f"{name} wrong"] = wrong
    return sets


def bench_grading(limit: int | None, workers: int, timeout_s: float) -> dict:
    from langenv.grading import GradingPool, grade

    sets = grading_sets(limit)
    rows = {}
    with GradingPool(workers=workers, timeout_s=timeout_s) as pool:
        t = time.perf_counter()
        pool.grade_many([("\\boxed{(x+1)^2}", "x^2+2x+1", "math")])  # start-up: forkserver + sympy import
        startup = time.perf_counter() - t
        for name, items in sets.items():
            t = time.perf_counter()
            serial = [grade(c, r, k) for c, r, k in items]
            t_serial = time.perf_counter() - t
            before = dict(pool.stats)
            t = time.perf_counter()
            pooled = pool.grade_many(items)
            t_pool = time.perf_counter() - t
            sent = pool.stats["pool"] - before["pool"]
            expected = 1.0 if name.endswith("correct") else 0.0
            rows[name] = {
                "checks": len(items),
                "in_process_checks_per_s": len(items) / t_serial,
                "pool_checks_per_s": len(items) / t_pool,
                "pool_share": sent / len(items),
                "pool_timeouts": pool.stats["timeout"] - before["timeout"],
                "accuracy_in_process": sum(g.reward == expected for g in serial) / len(items),
                "accuracy_pool": sum(g.reward == expected for g in pooled) / len(items),
                "agree": sum(a == b for a, b in zip(serial, pooled)) / len(items),
            }
    total = sum(r["checks"] for r in rows.values())
    mixed = total / sum(r["checks"] / r["pool_checks_per_s"] for r in rows.values())
    return {"rows": rows, "pool_startup_s": startup, "pool_mixed_checks_per_s": mixed,
            "workers": workers, "timeout_s": timeout_s}


# ------------------------------------------------------------------------------------ latency
COLD_CASES = [("$\\boxed{50.27}$", "16\\pi"), ("$(x+1)^2$", "$x^2+2x+1$")]
ADVERSARIAL = [
    ("\\boxed{\\dfrac{5^{\\left(5^{\\left(5^{\\left(5^5\\right)}\\right)} - 4\\right)} - 5}{16}}", "5"),
    ("\\boxed{9^{9^{9^{9}}}}", "9"), ("\\boxed{(10^6)!}", "5"), ("\\boxed{10000!}", "5"),
    ("\\boxed{\\frac{1}{2006!}}", "\\frac{1}{2004!}"), ("\\boxed{10^{10^{8}}}", "10"), ("\\boxed{2^{2^{64}}}", "2"),
    ("\\boxed{x^{123456}}", "x"), ("\\boxed{" + "(" * 60 + "1" + ")" * 60 + "}", "1"),
    ("\\boxed{" + "7" * 5000 + "}", "7" * 4999 + "8"), ("\\boxed{" * 500, "5"), ("9" * 20000, "9"),
]
_COLD_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from langenv.grading import is_correct
t1 = time.perf_counter()
ok = is_correct(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_check_s": t2 - t1, "correct": ok}))
"""


def bench_latency(repeats: int, timeout_s: float) -> dict:
    """Cold first check (fresh processes) and adversarial probes (warm pool), in seconds."""
    import subprocess

    from langenv.grading import GradingPool

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cold = []
    for completion, reference in COLD_CASES:
        for _ in range(repeats):
            out = subprocess.run([sys.executable, "-c", _COLD_SCRIPT, completion, reference], capture_output=True,
                                 text=True, env=env, check=True, timeout=120).stdout
            cold.append({"completion": completion, "reference": reference, **json.loads(out.strip().splitlines()[-1])})
    probes = list(ADVERSARIAL)
    cases = REPO.parent / "shared" / "testdata" / "grader_cases.jsonl"
    if cases.exists():
        with open(cases, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        probes += [(r["completion_or_answer"], r["reference"]) for r in rows if r.get("adversarial")]
    adversarial = []
    with GradingPool(workers=2, timeout_s=timeout_s) as pool:
        pool.start(1)
        for completion, reference in probes:
            t = time.perf_counter()
            [g] = pool.grade_many([(completion, reference, "math")])
            adversarial.append({"probe": completion[:60], "status": g.status, "seconds": time.perf_counter() - t})
    return {"cold": cold, "cold_first_check_max_s": max(c["first_check_s"] for c in cold),
            "cold_import_max_s": max(c["import_s"] for c in cold),
            "adversarial": adversarial, "adversarial_max_s": max(a["seconds"] for a in adversarial)}


# ------------------------------------------------------------------------------------- shares
def shares(metrics_path: Path, env_us_per_completion: float, checks_per_s: float) -> dict:
    """Env and grading costs as shares of each logged iteration (see the module docstring)."""
    iters = []
    with open(metrics_path) as f:
        for line in f:
            if not line.strip():
                continue
            m = json.loads(line)
            if not m.get("time/iteration"):
                continue
            episodes = sum(v for k, v in m.items() if k.startswith("grading/"))
            completions = episodes + m.get("vineppo/mc_rollouts", 0.0)
            iters.append({
                "iteration": m.get("iteration"),
                "time_iteration_s": m["time/iteration"],
                "time_grading_s": m.get("time/grading"),
                "completions": completions,
                "measured_env_plus_grading_share": (m["time/grading"] / m["time/iteration"]) if "time/grading" in m else None,
                "estimated_env_share": completions * env_us_per_completion / 1e6 / m["time/iteration"],
                "estimated_grading_share": completions / checks_per_s / m["time/iteration"],
            })
    if not iters:
        raise ValueError(f"{metrics_path}: no line with a non-zero 'time/iteration' key")

    def mean(key):
        vals = [it[key] for it in iters if it[key] is not None]
        return statistics.mean(vals) if vals else None

    summary = {k: mean(k) for k in ("time_iteration_s", "completions", "measured_env_plus_grading_share",
                                    "estimated_env_share", "estimated_grading_share")}
    summary["env_goal_met"] = summary["estimated_env_share"] <= ENV_GOAL
    summary["grading_goal_met"] = summary["estimated_grading_share"] <= GRADING_GOAL
    if summary["measured_env_plus_grading_share"] is not None:
        summary["measured_within_both_goals"] = summary["measured_env_plus_grading_share"] <= ENV_GOAL + GRADING_GOAL
    return {"metrics": str(metrics_path), "iterations": len(iters), "mean": summary, "per_iteration": iters}


def run_task(metrics_path: Path) -> str | None:
    """The task of the run (``run.task`` in the ``config.json`` next to its metrics), or None."""
    try:
        return json.loads((metrics_path.parent / "config.json").read_text())["run"]["task"]
    except (OSError, KeyError, ValueError, TypeError):
        return None


def kind_checks_per_s(grading: dict, kind: str) -> float:
    """Pool checks/s over the correct and wrong sets of one kind together (total checks / total time)."""
    rows = [r for name, r in grading["rows"].items() if name.startswith(kind + " ")]
    return sum(r["checks"] for r in rows) / sum(r["checks"] / r["pool_checks_per_s"] for r in rows)


# -------------------------------------------------------------------------------------- table
def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"\nlangenv env + grading benchmark, {m['date_utc']} UTC")
    print(f"machine: {m['cpu']}, {m['cores_usable']} usable / {m['cores_logical']} logical cores; "
          f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}")
    if "env" in result:  # absent with --latency-only
        _print_env_grading(result)
    _print_rest(result)


def _print_env_grading(result: dict) -> None:
    env = result["env"]
    print(f"\nenvironment (GSM8K test, tiny BPE vocab {env['meta']['vocab']}; completions "
          f"{env['meta']['completion_tokens_mean']:.0f} tokens on average)")
    print(f"  {'operation':<72} {'µs/call':>10}")
    for name, us in env["us_per_call"].items():
        print(f"  {name:<72} {us:>10.2f}")
    g = result["grading"]
    print(f"\ngrading throughput (checks/s; pool: {g['workers']} workers, {g['timeout_s']} s timeout, "
          f"start-up {g['pool_startup_s']:.2f} s)")
    print(f"  {'set':<16} {'checks':>7} {'in-process':>11} {'pool':>9} {'pool share':>11} {'acc in-proc':>12} "
          f"{'acc pool':>9} {'agree':>6}")
    for name, r in g["rows"].items():
        print(f"  {name:<16} {r['checks']:>7} {r['in_process_checks_per_s']:>11.0f} {r['pool_checks_per_s']:>9.0f} "
              f"{r['pool_share']:>11.1%} {r['accuracy_in_process']:>12.1%} {r['accuracy_pool']:>9.1%} {r['agree']:>6.1%}")
    print(f"  all sets through the pool: {g['pool_mixed_checks_per_s']:.0f} checks/s")


def _print_rest(result: dict) -> None:
    lat = result.get("latency")
    if lat:
        print(f"\nlatency (goal <= 2 s): cold first check (fresh process, pool not started) worst "
              f"{lat['cold_first_check_max_s']:.2f} s over {len(lat['cold'])} processes "
              f"(+ import langenv.grading {lat['cold_import_max_s']:.2f} s)")
        for c in lat["cold"]:
            print(f"  {c['completion']!r} vs {c['reference']!r}: {c['first_check_s']:.2f} s (is_correct={c['correct']})")
        print(f"  adversarial probes: {len(lat['adversarial'])}, worst {lat['adversarial_max_s']:.3f} s "
              f"(statuses {sorted({a['status'] for a in lat['adversarial']})})")
    if "shares" in result:
        s = result["shares"]["mean"]
        sh = result["shares"]
        print(f"\nshare of an iteration ({sh['metrics']}, task {sh['task']}, {sh['iterations']} iterations, "
              f"mean {s['time_iteration_s']:.2f} s/iteration, {s['completions']:.0f} completions/iteration; "
              f"grading at {sh['grading_checks_per_s_used']:.0f} checks/s, {sh['grading_rate_from']})")
        if s["measured_env_plus_grading_share"] is not None:
            print(f"  measured by the run: time/grading (env step + grading) / time/iteration = "
                  f"{s['measured_env_plus_grading_share']:.3%}  (goal env+grading <= {ENV_GOAL + GRADING_GOAL:.0%})")
        print(f"  estimated env     = {s['estimated_env_share']:.4%}  (goal <= {ENV_GOAL:.0%}: "
              f"{'met' if s['env_goal_met'] else 'NOT met'})")
        print(f"  estimated grading = {s['estimated_grading_share']:.4%}  (goal <= {GRADING_GOAL:.0%}: "
              f"{'met' if s['grading_goal_met'] else 'NOT met'})")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    ap.add_argument("--metrics", type=Path, default=None, help="a run's metrics.jsonl, for shares of an iteration")
    ap.add_argument("--repeats", type=int, default=5, help="repeats per env timing (the median is reported)")
    ap.add_argument("--limit", type=int, default=None, help="problems per dataset for grading (default: all test)")
    ap.add_argument("--workers", type=int, default=2, help="grading pool workers")
    ap.add_argument("--timeout", type=float, default=2.0, help="grading pool per-check timeout, seconds")
    ap.add_argument("--task", default=None, help="task of the --metrics run (default: its config.json), "
                    "which picks the grading throughput used for its share")
    ap.add_argument("--cold-repeats", type=int, default=3, help="fresh processes per cold-check case")
    ap.add_argument("--latency-only", action="store_true", help="only the latency measurements (a few seconds)")
    ap.add_argument("--quick", action="store_true", help="3 repeats, 200 problems per dataset")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.limit = 3, args.limit or 200
    if args.metrics is not None and not args.metrics.exists():
        ap.error(f"--metrics: {args.metrics} does not exist")

    if args.latency_only:
        result = {"machine": machine(), "latency": bench_latency(args.cold_repeats, args.timeout)}
        print_table(result)
        return result

    import torch

    torch.set_num_threads(1)
    from algos.models.tiny import build_tokenizer
    from langenv.tasks import make_task

    task = make_task("gsm8k")
    train = task.load("train")[:400]
    tok = build_tokenizer([p.question for p in train] + [task.target(p) for p in train], vocab_size=2048)
    result = {"machine": machine(), "env": bench_env(tok, args.repeats),
              "grading": bench_grading(args.limit, args.workers, args.timeout),
              "latency": bench_latency(args.cold_repeats, args.timeout)}
    per_completion = result["env"]["us_per_call"]["step_states x64, whole completion, no EOS (per item, no grading)"]
    if args.metrics is not None:
        task = args.task or run_task(args.metrics)
        kind = {"gsm8k": "gsm8k", "arithmetic": "gsm8k", "math": "math"}.get(task or "")
        g = result["grading"]
        rate = kind_checks_per_s(g, kind) if kind else g["pool_mixed_checks_per_s"]
        result["shares"] = shares(args.metrics, per_completion, rate)
        result["shares"].update(task=task, grading_checks_per_s_used=rate,
                                grading_rate_from=f"{kind} correct + wrong" if kind else "all sets")
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
