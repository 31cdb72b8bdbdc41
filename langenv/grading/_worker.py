"""Worker side of `langenv.grading.GradingPool`: a separate Python interpreter that grades checks
sent to it over its standard input and answers on its standard output.

The pool starts it with ``subprocess`` (``<python> -c "...; langenv.grading._worker.main()"
<memory_mb> <fault_injection>``), not with `multiprocessing`, so it starts the same way from any
caller: a daemonic `multiprocessing.Pool` worker, a thread, a ``python -`` stdin script, a script
without an ``if __name__ == "__main__":`` guard, a Jupyter kernel, under any start method. It
imports only `langenv.grading` (never the caller's ``__main__``).

Protocol (UTF-8 JSON lines):
    worker -> pool, once, after start-up: ``{"ready": <pid>}`` (the address-space cap is set and
        sympy / math-verify are imported and warm). A start-up failure is a traceback on stderr and
        a non-zero exit before that line.
    pool -> worker, one per check: ``[completion, reference, kind]``.
    worker -> pool, one per check: ``{"grade": [reward, status, cause]}`` (``cause`` is "" except
        for an ``rg:`` kind's "invalid", see `langenv.grading._rg`), or ``{"error": "<exception>"}``
        when the worker's own code failed outside `langenv.grading.grade` (a bug, not a verdict), or
        `langenv.grading.GradingError` was raised (reasoning-gym not importable, unknown dataset).
    An ``rg:`` check imports reasoning-gym on first use (not at start-up: most pools never need it).
The worker's file descriptor 1 is redirected to stderr after start-up, so a stray ``print`` in a
library cannot corrupt the protocol. It exits at end of input, and within a second when its
parent dies (a watchdog thread polls the parent pid: a daemonic parent killed by
``Pool.terminate`` runs no ``atexit`` hooks).

TEST HOOK (fault injection). A worker started with fault_injection "1" (a pool built while
``LANGENV_GRADING_FAULT_INJECTION=1``) acts on a reference whose first line is
``__langenv_fault__:<fault>[:<pid file>]`` (the real reference follows on the next lines): it
first writes its pid to ``<pid file>`` when one is given, then does `FAULTS[<fault>]` and, if it
survives, grades the completion against the real reference.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

#: TEST HOOK: first line of a fault-injecting reference (also exported as
#: `langenv.grading.FAULT_PREFIX`).
FAULT_PREFIX = "__langenv_fault__:"

#: Set by `main`: whether this worker honours fault-injecting references.
_FAULT_INJECTION = False
#: Set by `main`: the RLIMIT_AS cap in MiB (the "oom" fault allocates twice this).
_MEMORY_MB = 0

#: The injectable faults (names -> what the worker does). Test hook only.
FAULTS = {
    "hang": "sleep for an hour (the pool's per-check timeout must kill the worker)",
    "exit": "os._exit(70): the worker dies with a non-zero exit code",
    "exit0": "os._exit(0): the worker dies with exit code 0 (the pool sees its output close)",
    "segv": "SIGSEGV to itself, like a crash in C code",
    "oom": "allocate twice the RLIMIT_AS cap in one block: MemoryError when the cap is in force",
    "raise": "raise RuntimeError from the worker's own code (outside grade): status 'error'",
    "pid": "nothing (only the pid file is written), then grade normally",
}


def cap_memory(memory_mb: int) -> None:
    """Cap this process's address space (RLIMIT_AS) at ``memory_mb`` MiB where the OS allows it."""
    try:
        import resource

        limit = int(memory_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass


def inject_fault(reference: str) -> str:
    """TEST HOOK: act on a fault-injecting reference and return the real reference after it.

    Raises:
        ValueError: for an unknown fault name (the check then reports status "error").
        RuntimeError: for the "raise" fault.
    """
    header, _, real = reference.partition("\n")
    fault, _, pid_file = header[len(FAULT_PREFIX):].partition(":")
    if fault not in FAULTS:
        raise ValueError(f"unknown injected fault {fault!r}; expected one of {sorted(FAULTS)}")
    if pid_file:
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
    if fault == "hang":
        time.sleep(3600)
    elif fault == "exit":
        os._exit(70)
    elif fault == "exit0":
        os._exit(0)
    elif fault == "segv":
        import signal

        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(10)  # the signal is delivered before this returns
    elif fault == "oom":
        block = bytearray(2 * max(_MEMORY_MB, 1) * 1024 * 1024)  # MemoryError under the cap
        del block
    elif fault == "raise":
        raise RuntimeError("injected fault: raise")
    return real


def run(completion: str, reference: str, kind: str | None) -> tuple[float, str, str]:
    """One check; returns (reward, status, cause). A MemoryError outside `grade` (which already maps it
    to "invalid"), e.g. while handling the arguments, is also "invalid"; the worker lives on.

    Raises:
        whatever the worker's own code raises outside `grade` (reported to the pool as "error").
    """
    from langenv.grading._core import grade

    try:
        if _FAULT_INJECTION and isinstance(reference, str) and reference.startswith(FAULT_PREFIX):
            reference = inject_fault(reference)
        g = grade(completion, reference, kind)
        return g.reward, g.status, g.cause
    except MemoryError:
        return 0.0, "invalid", "MemoryError (the worker's memory cap)"


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def main(argv: list[str] | None = None) -> None:
    """Worker entry point. ``argv`` = [memory_mb, fault_injection ("0"/"1")]; default sys.argv[1:]."""
    global _FAULT_INJECTION, _MEMORY_MB
    args = sys.argv[1:] if argv is None else argv
    _MEMORY_MB = int(args[0]) if args else 2048
    _FAULT_INJECTION = len(args) > 1 and args[1] == "1"
    out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)  # the protocol channel
    os.dup2(2, 1)  # stray prints (and C-level writes to fd 1) go to stderr
    sys.stdout = sys.stderr
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    cap_memory(_MEMORY_MB)
    from langenv.grading import _sym  # noqa: F401  (imports and warms up sympy / math-verify)

    out.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin.buffer:
        try:
            completion, reference, kind = json.loads(line)
            reply = {"grade": list(run(completion, reference, kind))}
        except MemoryError:
            reply = {"grade": [0.0, "invalid", "MemoryError (the worker's memory cap)"]}
        except Exception as exc:  # noqa: BLE001 - reported to the pool, which records "error"
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
