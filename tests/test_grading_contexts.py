"""The grader gives the right answer in every process a user calls it from (issue 12).

Each test runs a real program in a fresh interpreter, as a user would: a `multiprocessing.Pool`
worker (a daemonic process) under the spawn, fork and forkserver start methods, a ``python -``
script fed on standard input, a script file without an ``if __name__ == "__main__":`` guard, a
thread, ``datasets.map(num_proc=2)``, and the conformance script inside a Pool worker. Every one
grades answers that need the symbolic checker (the sympy workers), so a worker that cannot start
there shows as a wrong figure or an error, never as a pass. CPU only; about 1 min on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from langenv import grading

REPO = Path(__file__).resolve().parents[1]

#: (completion, reference, expected): each needs a symbolic check (none is decided in process).
CASES = [
    ("The answer is $(x+1)^2$", "x^2+2x+1", True),
    ("so \\boxed{-2/3}", "2/(-3)", True),
    ("\\boxed{(-\\infty, 3)}", "x<3", True),
    ("\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{1}{\\sqrt{3}}", True),
    ("The answer is $(x+1)^2$", "x^2+1", False),
]
EXPECTED = [c[2] for c in CASES]

#: Shared by every program: grades CASES with `is_correct` and prints one JSON line.
PRELUDE = textwrap.dedent(f"""
    import json, os, sys
    CASES = {CASES!r}

    def check(case):
        from langenv.grading import is_correct
        return is_correct(case[0], case[1])

    def report(tag, results):
        import langenv
        print("RESULT " + json.dumps({{"tag": tag, "results": results, "langenv": langenv.__file__}}), flush=True)
""")


def test_cases_need_the_symbolic_workers():
    assert all(grading._fast(c, r, None) is None for c, r, _ in CASES)


def run_program(code: str, tmp_path: Path, stdin: bool = False, timeout: float = 240) -> list[dict]:
    """Run ``PRELUDE + code`` as a script file (or on stdin with ``python -``); return its RESULT lines."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("LANGENV_GRADING_FAULT_INJECTION", None)  # the test hooks are off
    env.pop("LANGENV_GRADING_PYTHON", None)
    source = PRELUDE + textwrap.dedent(code)
    if stdin:
        proc = subprocess.run([sys.executable, "-"], input=source, text=True, capture_output=True,
                              cwd=tmp_path, env=env, timeout=timeout)
    else:
        script = tmp_path / "user_script.py"
        script.write_text(source)
        proc = subprocess.run([sys.executable, str(script)], text=True, capture_output=True, cwd=tmp_path,
                              env=env, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    out = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert out, proc.stdout + proc.stderr
    for r in out:  # the programs (and their workers) use this checkout's langenv
        assert r["langenv"].startswith(str(REPO / "langenv")), r["langenv"]
    return out


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_inside_a_multiprocessing_pool_worker(tmp_path, method):
    """Pool workers are daemonic; with fork, the parent's already-started grader is inherited too."""
    [warm, pooled] = run_program(f"""
        import multiprocessing
        if __name__ == "__main__":
            multiprocessing.set_start_method({method!r})
            report("parent", [check(c) for c in CASES])   # the parent's own workers are running
            with multiprocessing.Pool(2) as pool:
                report("pool", pool.map(check, CASES))
    """, tmp_path)
    assert warm["results"] == EXPECTED
    assert pooled["results"] == EXPECTED


def test_python_stdin_script(tmp_path):
    [r] = run_program('report("stdin", [check(c) for c in CASES])\n', tmp_path, stdin=True)
    assert r["results"] == EXPECTED


def test_script_without_main_guard_runs_its_top_level_once(tmp_path):
    marker = tmp_path / "ran.txt"
    [r] = run_program(f"""
        with open({str(marker)!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        report("no-guard", [check(c) for c in CASES])
    """, tmp_path)
    assert r["results"] == EXPECTED
    assert len(marker.read_text().splitlines()) == 1, "the script's top-level code ran more than once"


def test_from_a_thread(tmp_path):
    [r] = run_program("""
        import threading
        out = []
        t = threading.Thread(target=lambda: out.append([check(c) for c in CASES]))
        t.start(); t.join()
        report("thread", out[0])
    """, tmp_path)
    assert r["results"] == EXPECTED


def test_datasets_map_with_two_processes(tmp_path):
    [r] = run_program("""
        import datasets
        if __name__ == "__main__":
            ds = datasets.Dataset.from_dict({"c": [c[0] for c in CASES], "r": [c[1] for c in CASES]})
            ds = ds.map(lambda row: {"ok": check((row["c"], row["r"]))}, num_proc=2)
            report("datasets", list(ds["ok"]))
    """, tmp_path)
    assert r["results"] == EXPECTED


def _scored(output: str) -> str:
    m = re.search(r"accuracy, scored:\s+(\d+/\d+)", output)
    assert m, output[-2000:]
    return m.group(1)


def test_conformance_inside_a_pool_worker_matches_a_plain_process():
    """A subset (the first 150 cases, many of them symbolic); the full file is run by hand (report)."""
    script = REPO / "experiments" / "bench" / "grader_conformance.py"
    cases = REPO.parent / "shared" / "testdata" / "grader_cases.jsonl"
    if not cases.exists():
        pytest.skip(f"{cases} not available")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    figures = []
    for extra in ([], ["--in-pool-worker"]):
        proc = subprocess.run([sys.executable, str(script), "--limit", "150", *extra], capture_output=True,
                              text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        figures.append(_scored(proc.stdout))
    assert figures[0] == figures[1]
    ok, n = map(int, figures[0].split("/"))
    assert ok == n
