"""Run the public grader conformance cases through `langenv.grading.GradingPool` and report.

Usage (from the repository root):
    python experiments/bench/grader_conformance.py                     # ../shared/testdata/grader_cases.jsonl
    python experiments/bench/grader_conformance.py --cases PATH --workers 2 --timeout 2.0
    python experiments/bench/grader_conformance.py --detect-kind       # ignore the cases' kind field
    python experiments/bench/grader_conformance.py --gold              # + GSM8K/MATH-500 gold solutions
    python experiments/bench/grader_conformance.py --in-pool-worker    # the same, inside a daemonic
                                                                       # multiprocessing.Pool worker
    python experiments/bench/grader_conformance.py --limit 100         # the first 100 cases only

``--in-pool-worker`` runs the grading inside a `multiprocessing.Pool` worker (a daemonic process,
like ``datasets.map(num_proc=N)`` or a DataLoader worker; ``--start-method`` picks the method):
the figure must be the same as in a plain process (issue 12).

Every case is graded on its own (``pool.grade_many([case])``) so that its wall-clock time can be
reported; the pool's per-check hard limit (``--timeout``) is the per-case limit, and a timeout,
crash or error counts as wrong. A second, batched pass over all cases measures throughput and
checks that batching gives the same grades. Prints: accuracy on the scored (non-contested) cases,
excluding Math-Verify/lighteval sources, per kind, per category, per status, the adversarial cases
and their max time, false positives/negatives with ids, contested disagreements, and checks/s.
Exit status 1 if the scored accuracy is below ``--target`` or an adversarial case exceeds
``--adversarial-limit`` seconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from langenv.grading import GradingPool  # noqa: E402

DEFAULT_CASES = REPO.parent / "shared" / "testdata" / "grader_cases.jsonl"
MV_SOURCES = ("huggingface/Math-Verify:", "huggingface/lighteval:")


def load_cases(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run(cases: list[dict], workers: int, timeout_s: float, detect_kind: bool) -> dict:
    """Grade every case; returns per-case records plus the batched-pass timing."""
    items = [
        (c["completion_or_answer"], c["reference"], None if detect_kind else c.get("kind"))
        for c in cases
    ]
    records = []
    with GradingPool(workers=workers, timeout_s=timeout_s) as pool:
        pool.grade_many([("\\boxed{x+1}", "1+x", "math")])  # start and warm the workers
        for case, item in zip(cases, items):
            t0 = time.perf_counter()
            grade = pool.grade_many([item])[0]
            records.append({"case": case, "grade": grade, "seconds": time.perf_counter() - t0})
        stats_single = dict(pool.stats)
        t0 = time.perf_counter()
        batched = pool.grade_many(items)
        batch_s = time.perf_counter() - t0
    return {"records": records, "batched": batched, "batch_s": batch_s, "stats": stats_single}


def _acc(rows: list[dict]) -> str:
    if not rows:
        return "   -/-   "
    ok = sum(r["ok"] for r in rows)
    return f"{ok}/{len(rows)} ({100.0 * ok / len(rows):.1f}%)"


def report(result: dict, target: float, adversarial_limit: float) -> int:
    rows = []
    for rec in result["records"]:
        case, grade = rec["case"], rec["grade"]
        predicted = grade.reward == 1.0
        rows.append({**rec, "pred": predicted, "ok": predicted == bool(case["expected"])})
    scored = [r for r in rows if not r["case"].get("contested")]
    non_mv = [r for r in scored if not r["case"]["source"].startswith(MV_SOURCES)]
    score = sum(r["ok"] for r in scored) / max(1, len(scored))

    print(f"cases: {len(rows)}  scored (non-contested): {len(scored)}  contested: {len(rows) - len(scored)}")
    print(f"accuracy, scored:                     {_acc(scored)}")
    print(f"accuracy, scored excl. MV/lighteval:  {_acc(non_mv)}")
    for kind in sorted({r["case"]["kind"] for r in scored}):
        print(f"  kind {kind:<8} {_acc([r for r in scored if r['case']['kind'] == kind])}")
    for exp in (True, False):
        print(f"  expected {str(exp):<5}  {_acc([r for r in scored if r['case']['expected'] == exp])}")
    print("per category (scored):")
    for cat in sorted({r["case"]["category"] for r in scored}):
        print(f"  {cat:<28} {_acc([r for r in scored if r['case']['category'] == cat])}")
    print("statuses:", dict(collections.Counter(r["grade"].status for r in rows)))

    adv = [r for r in rows if r["case"].get("adversarial")]
    adv_max = max((r["seconds"] for r in adv), default=0.0)
    print(f"adversarial: {_acc(adv)}  max time {adv_max:.3f} s")
    for r in adv:
        print(f"  {r['case']['id']}  {r['grade'].status:<9} {r['seconds']:.3f} s")

    fps = [r for r in scored if not r["ok"] and r["pred"]]
    fns = [r for r in scored if not r["ok"] and not r["pred"]]
    print(f"false positives: {len(fps)}  false negatives: {len(fns)}")
    for r in fps + fns:
        c = r["case"]
        kind = "FP" if r["pred"] else "FN"
        print(f"  {kind} {c['id']} [{c['category']}] {r['grade'].status}: "
              f"{c['completion_or_answer'][-70:]!r} vs {c['reference'][-50:]!r}")
    disagree = [r for r in rows if r["case"].get("contested") and not r["ok"]]
    print(f"contested disagreements: {len(disagree)}/{len(rows) - len(scored)} (policy choices, not scored)")
    for r in disagree:
        c = r["case"]
        print(f"  {c['id']} label={c['expected']} ours={r['pred']}: {c.get('note', '')[:90]}")

    times = sorted(r["seconds"] for r in rows)
    n = len(times)
    print(f"per-case wall time: median {1000 * times[n // 2]:.2f} ms  p90 {1000 * times[int(n * 0.9)]:.1f} ms  "
          f"max {times[-1]:.3f} s  ({n / sum(times):.0f} checks/s one at a time)")
    st = result["stats"]
    print(f"fast path (no IPC): {st['fast']}/{st['fast'] + st['pool']} checks; pool timeouts {st['timeout']}, crashes {st['crash']}")
    same = sum(a.status == r["grade"].status for a, r in zip(result["batched"], rows))
    print(f"throughput, one batched grade_many call: {n / result['batch_s']:.0f} checks/s "
          f"({result['batch_s']:.2f} s for {n}); batched == single grades: {same}/{n}")

    failed = score < target or adv_max > adversarial_limit
    print(f"target {target:.2f}: {'FAIL' if failed else 'PASS'} (scored {score:.4f}, adversarial max {adv_max:.2f} s)")
    return 1 if failed else 0


def load_gold() -> dict[str, list[dict]]:
    """GSM8K test and MATH-500 rows: `langenv.data.load_split` if it works, else ../shared/data."""
    out = {}
    for name in ("gsm8k", "math"):
        try:
            from langenv.data import load_split

            out[name] = [dict(r) for r in load_split(name, "test")]
        except Exception:
            path = REPO.parent / "shared" / "data" / name / "test.jsonl"
            if path.exists():
                out[name] = load_cases(path)
    return out


def gold_report(workers: int, timeout_s: float) -> int:
    """Every gold solution must grade correct against its own answer; also times a mixed
    (shuffled, mostly incorrect) MATH workload."""
    data = load_gold()
    if set(data) != {"gsm8k", "math"}:
        print("gold check: data not found (langenv.data or ../shared/data)")
        return 2
    g, m = data["gsm8k"], data["math"]
    runs = {
        "gsm8k rationale vs final answer": [(r["answer"], r["answer"].split("####")[-1].strip(), "gsm8k") for r in g],
        "gsm8k rationale vs itself": [(r["answer"], r["answer"], "gsm8k") for r in g],
        "MATH-500 solution vs answer": [(r["solution"], r["answer"], "math") for r in m],
        "MATH-500 solution vs next problem's answer": [
            (r["solution"], m[(i + 1) % len(m)]["answer"], "math") for i, r in enumerate(m)
        ],
    }
    bad = 0
    with GradingPool(workers=workers, timeout_s=timeout_s) as pool:
        for name, items in runs.items():
            t0 = time.perf_counter()
            grades = pool.grade_many(items)
            dt = time.perf_counter() - t0
            statuses = collections.Counter(x.status for x in grades)
            print(f"{name}: {dict(statuses)}  {len(items) / dt:.0f} checks/s")
            if "next" not in name:
                wrong = [i for i, x in enumerate(grades) if x.status != "correct"]
                bad += len(wrong)
                for i in wrong[:10]:
                    print(f"  not correct: row {i}: {items[i][1][:60]!r} -> {grades[i]}")
        print(f"pool stats: {pool.stats}")
    print(f"gold solutions not graded correct: {bad}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=Path, default=DEFAULT_CASES, help="JSONL cases file")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=2.0, help="per-check hard limit, seconds")
    ap.add_argument("--detect-kind", action="store_true", help="pass kind=None (detect from reference)")
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--adversarial-limit", type=float, default=2.0)
    ap.add_argument("--limit", type=int, default=0, help="grade only the first N cases (0: all)")
    ap.add_argument("--in-pool-worker", action="store_true",
                    help="grade inside a daemonic multiprocessing.Pool worker instead of this process")
    ap.add_argument("--start-method", choices=multiprocessing.get_all_start_methods(), default=None,
                    help="start method of that Pool (default: the platform's)")
    ap.add_argument("--gold", action="store_true",
                    help="also grade every GSM8K-test / MATH-500 gold solution against its answer")
    args = ap.parse_args(argv)
    if not args.cases.exists():
        print(f"cases file not found: {args.cases}", file=sys.stderr)
        return 2
    cases = load_cases(args.cases)
    if args.limit > 0:
        cases = cases[:args.limit]
    run_args = (cases, args.workers, args.timeout, args.detect_kind)
    if args.in_pool_worker:
        with multiprocessing.get_context(args.start_method).Pool(1) as mp_pool:
            result = mp_pool.apply(run, run_args)
        print(f"graded inside a daemonic multiprocessing.Pool worker (start method "
              f"{args.start_method or multiprocessing.get_start_method()})")
    else:
        result = run(*run_args)
    status = report(result, args.target, args.adversarial_limit)
    if args.gold:
        print()
        status = max(status, gold_report(args.workers, args.timeout))
    return status


if __name__ == "__main__":
    sys.exit(main())
