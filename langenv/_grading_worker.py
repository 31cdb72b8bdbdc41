"""Worker side of `langenv.grading.GradingPool` (kept light: the trainer imports it for the
function references that pebble pickles).

Under the forkserver start method the server preloads `langenv._grading_sym`, which imports and
warms up sympy/math-verify, so every worker, including one that replaces a killed worker, is
forked warm. Under spawn each worker imports it in `init`.

TEST HOOK (fault injection). Workers of a pool built while ``LANGENV_GRADING_FAULT_INJECTION=1``
get ``fault_injection=True`` from `init`; only then does `run` act on a reference whose first line
is ``__langenv_fault__:<fault>[:<pid file>]`` (the real reference follows on the next lines):
the worker first writes its pid to ``<pid file>`` when one is given, then does `FAULTS[<fault>]`
and, if it survives, grades the completion against the real reference. The flag travels through
the pool's initializer arguments (not the environment) because forkserver workers inherit the
environment of the fork server, which may predate the test's setting. Monkeypatching `run` in the
parent would not reach the workers either: they import this module fresh in the fork server.
"""

from __future__ import annotations

import os
import time

from langenv.grading import FAULT_PREFIX, grade

#: Set by `init` in each worker: whether this worker honours fault-injecting references.
_FAULT_INJECTION = False
#: Set by `init`: the RLIMIT_AS cap in MiB (the "oom" fault allocates twice this).
_MEMORY_MB = 0

#: The injectable faults (names -> what the worker does). Test hook only.
FAULTS = {
    "hang": "sleep for an hour (the pool's per-check timeout must kill the worker)",
    "exit": "os._exit(70): the worker dies with a non-zero exit code",
    "exit0": "os._exit(0): the worker dies with exit code 0 (pebble does not report it as expired; "
             "the per-check timeout must catch it)",
    "segv": "SIGSEGV to itself, like a crash in C code",
    "oom": "allocate twice the RLIMIT_AS cap in one block: MemoryError when the cap is in force",
    "raise": "raise RuntimeError from the check",
    "pid": "nothing (only the pid file is written), then grade normally",
}


def init(memory_mb: int, fault_injection: bool = False) -> None:
    """Pool initializer: cap this worker's address space (RLIMIT_AS) at ``memory_mb`` MiB, make
    sure the symbolic checker is imported and warm, and record whether the fault-injection test
    hook is on for this pool."""
    global _FAULT_INJECTION, _MEMORY_MB
    _FAULT_INJECTION, _MEMORY_MB = bool(fault_injection), int(memory_mb)
    try:
        import resource

        limit = int(memory_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass
    from langenv import _grading_sym  # noqa: F401  (no-op when the forkserver preloaded it)


def inject_fault(reference: str) -> str:
    """TEST HOOK: act on a fault-injecting reference and return the real reference after it.

    Raises:
        ValueError: for an unknown fault name (the check then grades "invalid").
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


def run(completion: str, reference: str, kind: str | None) -> tuple[float, str]:
    """One check; returns (reward, status) (a plain tuple pickles faster than a Grade).

    A MemoryError outside `grade` (which already maps it to "invalid"), e.g. while handling the
    arguments, is also "invalid"; the worker lives on."""
    try:
        if _FAULT_INJECTION and isinstance(reference, str) and reference.startswith(FAULT_PREFIX):
            reference = inject_fault(reference)
        g = grade(completion, reference, kind)
        return g.reward, g.status
    except MemoryError:
        return 0.0, "invalid"
