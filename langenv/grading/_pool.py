"""Parent side of the grading workers: `GradingPool`.

Each worker is its own Python interpreter started with `subprocess.Popen` (see
`langenv.grading._worker` for the protocol), never through `multiprocessing`: a daemonic process
may start it, no ``__main__`` is re-imported, and the caller's start method does not matter.
The pool reads the workers' answers with `select` and a deadline per check, so a check that runs
past ``timeout_s`` has its worker killed (SIGKILL) and replaced, and no call can wait forever.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from typing import ClassVar, Sequence

from langenv.grading import _extract as X
from langenv.grading._core import Grade, _fast, _g
from langenv.grading._rg import is_rg_kind
from langenv.grading._worker import FAULT_PREFIX

_log = logging.getLogger("langenv.grading")

#: TEST HOOK: set this environment variable to "1" before a `GradingPool` is constructed to let
#: that pool's workers act on references that start with `FAULT_PREFIX` (hang, crash, exhaust
#: memory, ...; see `langenv.grading._worker.FAULTS`). Off by default; never set it in training.
FAULT_INJECTION_ENV = "LANGENV_GRADING_FAULT_INJECTION"
#: The Python interpreter that runs the workers (default `sys.executable`). Set it when
#: ``sys.executable`` is not a Python that can import langenv (an embedded interpreter); tests set
#: it to a path that does not exist or to a program that exits, to simulate a worker that cannot start.
PYTHON_ENV = "LANGENV_GRADING_PYTHON"

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BOOT = ("import sys; sys.path.insert(0, {root!r}); "
         "from langenv.grading._worker import main; main()")
_POOLS: "weakref.WeakSet[GradingPool]" = weakref.WeakSet()


class _Worker:
    """One worker process: its pipes, its stderr (a temp file, read back on failure), its state."""

    def __init__(self, argv: list[str], start_timeout_s: float):
        self.stderr = tempfile.TemporaryFile()
        self.buf = b""
        self.state = "starting"  # -> "idle" <-> "busy"; "dead" once killed or exited
        self.rg_loaded = False  # True once it was given an rg: check (which imports reasoning-gym)
        self.job: tuple[int, tuple] | None = None
        self.deadline = time.monotonic() + start_timeout_s
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            close_fds=True, start_new_session=True,  # Ctrl-C in a terminal does not reach it
        )
        self.fd = self.proc.stdout.fileno()

    def send(self, item: tuple) -> None:
        self.proc.stdin.write((json.dumps(list(item)) + "\n").encode("utf-8"))
        self.proc.stdin.flush()

    def read_lines(self) -> list[bytes] | None:
        """Complete lines available now, or None at end of output (the worker exited)."""
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return lines

    def describe_exit(self) -> str:
        """"exit code N" or "killed by SIGNAME", plus the last lines of its stderr."""
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            how = "still running"
        elif code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit code {code}"
        try:
            self.stderr.seek(0)
            tail = self.stderr.read().decode("utf-8", "replace").strip().splitlines()[-6:]
        except (OSError, ValueError):
            tail = []
        return how + (("; stderr: " + " | ".join(tail)) if tail else "")

    def kill(self) -> None:
        self.state = "dead"
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.close_files()

    def close_files(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout, self.stderr):
            try:
                f.close()
            except OSError:
                pass

    def close(self, wait_s: float = 1.0) -> None:
        """Ask it to exit (end of input), then kill it if it has not within ``wait_s``."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=wait_s)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class GradingPool:
    """Persistent pool of killable, memory-capped grading workers (separate interpreters over pipes).

    Args:
        workers: at most this many worker processes. They start on demand: the first check that
            needs sympy starts one; a call with more such checks starts up to ``workers``.
        timeout_s: wall-clock limit per check (seconds); an overrunning worker is killed (SIGKILL)
            and replaced, and the check is Grade(0, "timeout").
        memory_mb: RLIMIT_AS of each worker (MiB of address space). A check that hits it gets a
            MemoryError, caught in the worker, and is Grade(0, "invalid").
        start_timeout_s: seconds a new worker may take to import and warm up sympy / math-verify
            (about 1 s on 2 idle cores) before it counts as failed to start. The first
            reasoning-gym check (kind ``"rg:<dataset>"``) on a worker also gets this much more than
            ``timeout_s``: it imports reasoning-gym (0.7-2 s) before scoring.

    `grade_many` decides string/numeric checks in process (no IPC) and sends the rest to the
    workers. It never raises for model text and never waits forever. Statuses it adds to those of
    `grade`:

    * "timeout": the check ran past ``timeout_s`` (its worker was killed and replaced);
    * "error" (an infrastructure failure, never a verdict on the answer; `Grade.cause` says why):
      no worker could be started (two starts in a row failed in this call: interpreter missing,
      langenv or sympy not importable from it, start-up past ``start_timeout_s``), a worker died
      twice on the same check (the check is retried once on a fresh worker), or the worker's own
      code raised. ``last_error`` keeps the latest cause.

    Calls from several threads are serialised (one call at a time uses the workers). After
    ``os.fork`` the child does not use the parent's workers; it starts its own when it needs them.
    Use as a context manager or call `close` (the default pool closes at exit; workers also exit
    on their own when this process dies). ``stats`` counts checks decided in process ("fast"),
    sent to workers ("pool"), timeouts, crashes (worker died during a check), errors (checks
    graded "error"), starts and start failures ("start_failed").

    Test hooks: `FAULT_INJECTION_ENV` (fault-injecting references, read at construction) and
    `PYTHON_ENV` (the workers' interpreter, read at each worker start).
    """

    #: Checks that need a worker are retried once on a fresh worker when their worker dies.
    CRASH_RETRIES: ClassVar[int] = 1
    #: Consecutive failed starts after which a call gives up and grades its remaining checks "error".
    START_ATTEMPTS: ClassVar[int] = 2

    def __init__(self, workers: int = 2, timeout_s: float = 2.0, memory_mb: int = 2048,
                 start_timeout_s: float = 30.0):
        if workers < 1 or timeout_s <= 0 or memory_mb < 256 or start_timeout_s <= 0:
            raise ValueError(
                f"GradingPool: need workers >= 1, timeout_s > 0, memory_mb >= 256, start_timeout_s > 0; "
                f"got workers={workers}, timeout_s={timeout_s}, memory_mb={memory_mb}, start_timeout_s={start_timeout_s}")
        self.workers, self.timeout_s, self.memory_mb = workers, float(timeout_s), int(memory_mb)
        self.start_timeout_s = float(start_timeout_s)
        self.fault_injection = os.environ.get(FAULT_INJECTION_ENV) == "1"
        if self.fault_injection:
            _log.warning("GradingPool: %s=1, fault injection (a test hook) is ON", FAULT_INJECTION_ENV)
        self.last_error = ""
        self.stats = {"fast": 0, "pool": 0, "timeout": 0, "crash": 0, "error": 0, "start": 0, "start_failed": 0}
        self._procs: list[_Worker] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        _POOLS.add(self)

    # ------------------------------------------------------------------------------ workers
    def _argv(self) -> list[str]:
        python = os.environ.get(PYTHON_ENV) or sys.executable
        if not python:
            raise RuntimeError(f"sys.executable is empty (an embedded interpreter?); set {PYTHON_ENV} to a Python "
                               "that can import langenv")
        return [python, "-c", _BOOT.format(root=_PACKAGE_ROOT), str(self.memory_mb), "1" if self.fault_injection else "0"]

    def _spawn(self) -> _Worker | str:
        """A new starting worker, or the cause (str) if it could not even be launched."""
        self.stats["start"] += 1
        try:
            w = _Worker(self._argv(), self.start_timeout_s)
        except Exception as exc:  # noqa: BLE001 - FileNotFoundError, PermissionError, EMFILE, ...
            return f"{type(exc).__name__}: {exc}"
        self._procs.append(w)
        return w

    def _after_fork_in_child(self) -> None:
        """Forget the parent's workers (they are not ours to use or kill); close our copies of their pipes."""
        for w in self._procs:
            w.close_files()
        self._procs = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def start(self, n: int = 1, wait: bool = True) -> None:
        """Start workers now (up to ``n``, at most ``workers`` in all) instead of on the first check;
        with ``wait``, return once they are ready.

        Raises:
            GradingError: ``wait`` and a worker could not start (the message names the cause).
        """
        from langenv.grading._core import GradingError

        with self._lock:
            self._check_pid()
            for _ in range(max(0, min(n, self.workers) - len(self._procs))):
                w = self._spawn()
                if isinstance(w, str):
                    raise GradingError(self._start_failure(w))
            if wait:
                for w in [w for w in self._procs if w.state == "starting"]:
                    cause = self._wait_ready(w)
                    if cause:
                        raise GradingError(self._start_failure(cause))

    def _wait_ready(self, w: _Worker) -> str:
        while w.state == "starting":
            left = w.deadline - time.monotonic()
            if left <= 0 or not select.select([w.fd], [], [], left)[0]:
                w.kill()
                self._procs.remove(w)
                return f"not ready within start_timeout_s={self.start_timeout_s:g} s"
            cause = self._on_output(w, {})
            if cause:
                return cause
        return ""

    def _start_failure(self, cause: str) -> str:
        self.stats["start_failed"] += 1
        self.last_error = (f"grading worker could not start ({cause}); interpreter "
                           f"{os.environ.get(PYTHON_ENV) or sys.executable!r} (override with {PYTHON_ENV})")
        _log.error("GradingPool: %s", self.last_error)
        return self.last_error

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:
            self._after_fork_in_child()

    def _on_output(self, w: _Worker, results: dict) -> str:
        """Handle what worker ``w`` wrote. Returns a start-failure cause, else ""; records results
        in ``results``; a worker that exited during a check is left "dead" with its job kept."""
        lines = w.read_lines()
        if lines is None:  # end of output: the worker exited
            starting = w.state == "starting"
            w.state = "dead"
            if starting:
                cause = "exited during start-up, " + w.describe_exit()
                w.kill()
                self._procs.remove(w)
                return cause
            return ""
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # not protocol (cannot happen: fd 1 is redirected); ignore
            if "ready" in msg:
                w.state = "idle"
            elif w.job is not None:
                i = w.job[0]
                if "grade" in msg:
                    reward, status, *cause = msg["grade"]
                    results[i] = Grade(float(reward), str(status), str(cause[0]) if cause else "")
                else:
                    self.stats["error"] += 1
                    self.last_error = f"grading worker raised {msg.get('error')}"
                    _log.error("GradingPool: %s", self.last_error)
                    results[i] = Grade(0.0, "error", self.last_error)
                w.job, w.state = None, "idle"
        return ""

    # ------------------------------------------------------------------------------ grading
    def grade_many(
        self, items: Sequence[tuple[str, str, str | None]], timeout_s: float | None = None
    ) -> list[Grade]:
        """Grade (completion, reference, kind) triples; one Grade per item, in order.

        ``timeout_s`` overrides the pool's per-check limit (seconds) for this call. Never raises
        for model text; an infrastructure failure is Grade(0, "error", cause) (see the class)."""
        timeout = float(timeout_s) if timeout_s else self.timeout_s
        results: list[Grade | None] = []
        pending: list[tuple[int, tuple]] = []
        for i, item in enumerate(items):
            c, r, k = (tuple(item) + (None,))[:3]
            g = None if self._takes_pool_path(r) else _fast(c, r, k)
            results.append(g)
            if g is None:  # only the capped text travels (extraction never looks further)
                # an rg: reference is the JSON of a whole entry: it travels whole
                r_sent = r if self._takes_pool_path(r) or is_rg_kind(k) else X.cap(r)
                pending.append((i, (X.cap(c), r_sent, k)))
        self.stats["fast"] += len(results) - len(pending)
        self.stats["pool"] += len(pending)
        if pending:
            with self._lock:
                self._check_pid()
                done = self._run(pending, timeout)
            for i, g in done.items():
                results[i] = g
        return results  # type: ignore[return-value]

    def _run(self, pending: list[tuple[int, tuple]], timeout: float) -> dict[int, Grade]:
        queue = deque(pending)
        results: dict[int, Grade] = {}
        crashes: dict[int, int] = {}
        failed_starts = 0
        give_up = ""
        while queue or any(w.job for w in self._procs):
            # start workers for the waiting checks (one per check, at most `workers`)
            want = min(self.workers, len(queue) + sum(w.job is not None for w in self._procs))
            while queue and not give_up and len(self._procs) < want:
                w = self._spawn()
                if isinstance(w, str):
                    failed_starts += 1
                    cause = self._start_failure(w)
                    if failed_starts >= self.START_ATTEMPTS:
                        give_up = cause
            if give_up and not any(w.state == "starting" for w in self._procs):
                while queue:  # no worker can take them: an infrastructure failure, said as such
                    i, _ = queue.popleft()
                    self.stats["error"] += 1
                    results[i] = Grade(0.0, "error", give_up)
                if not any(w.job for w in self._procs):
                    break
            # hand checks to idle workers
            for w in self._procs:
                if w.state == "idle" and queue:
                    w.job = queue.popleft()
                    w.state, w.deadline = "busy", time.monotonic() + timeout
                    if is_rg_kind(w.job[1][2]) and not w.rg_loaded:  # it imports reasoning-gym first
                        w.deadline += self.start_timeout_s
                        w.rg_loaded = True
                    try:
                        w.send(w.job[1])
                    except OSError:  # it died while idle: treat as a crash during this check
                        w.state = "dead"
            waiting = [w for w in self._procs if w.state in ("starting", "busy")]
            if waiting:
                left = min(w.deadline for w in waiting) - time.monotonic()
                readable = select.select([w.fd for w in waiting], [], [], max(left, 0.0))[0]
                for w in [w for w in waiting if w.fd in readable]:
                    cause = self._on_output(w, results)
                    if cause:
                        failed_starts += 1
                        cause = self._start_failure(cause)
                        if failed_starts >= self.START_ATTEMPTS:
                            give_up = cause
                    elif w.state == "idle" and failed_starts:
                        failed_starts = 0
            now = time.monotonic()
            for w in list(self._procs):
                if w.state == "starting" and now >= w.deadline:
                    w.kill()
                    self._procs.remove(w)
                    failed_starts += 1
                    cause = self._start_failure(f"not ready within start_timeout_s={self.start_timeout_s:g} s")
                    if failed_starts >= self.START_ATTEMPTS:
                        give_up = cause
                elif w.state == "busy" and now >= w.deadline:  # hard wall-clock limit: kill, replace
                    i, _ = w.job
                    w.job = None
                    w.kill()
                    self._procs.remove(w)
                    self.stats["timeout"] += 1
                    results[i] = _g("timeout")
                elif w.state == "dead":
                    self._procs.remove(w)
                    if w.job is None:
                        w.kill()
                        continue
                    i, item = w.job
                    w.job = None
                    w.kill()
                    self.stats["crash"] += 1
                    how = w.describe_exit()
                    crashes[i] = crashes.get(i, 0) + 1
                    if crashes[i] <= self.CRASH_RETRIES:
                        _log.warning("GradingPool: worker died during a check (%s); retrying it on a new worker", how)
                        queue.appendleft((i, item))
                    else:
                        self.stats["error"] += 1
                        self.last_error = f"grading worker died {crashes[i]} times on the same check (last: {how})"
                        _log.error("GradingPool: %s", self.last_error)
                        results[i] = Grade(0.0, "error", self.last_error)
        return results

    def _takes_pool_path(self, reference) -> bool:
        return self.fault_injection and isinstance(reference, str) and reference.startswith(FAULT_PREFIX)

    def close(self) -> None:
        """Stop the workers (idempotent). The pool starts new ones if used again."""
        with self._lock:
            if os.getpid() != self._pid:
                self._after_fork_in_child()
                return
            procs, self._procs = self._procs, []
        for w in procs:
            w.close()

    def __enter__(self) -> "GradingPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
