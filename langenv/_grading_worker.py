"""Worker side of `langenv.grading.GradingPool` (kept light: the trainer imports it for the
function references that pebble pickles).

Under the forkserver start method the server preloads `langenv._grading_sym`, which imports and
warms up sympy/math-verify, so every worker, including one that replaces a killed worker, is
forked warm. Under spawn each worker imports it in `init`.
"""

from __future__ import annotations

from langenv.grading import grade


def init(memory_mb: int) -> None:
    """Pool initializer: cap this worker's address space (RLIMIT_AS) at ``memory_mb`` MiB and
    make sure the symbolic checker is imported and warm."""
    try:
        import resource

        limit = int(memory_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass
    from langenv import _grading_sym  # noqa: F401  (no-op when the forkserver preloaded it)


def run(completion: str, reference: str, kind: str | None) -> tuple[float, str]:
    """One check; returns (reward, status) (a plain tuple pickles faster than a Grade)."""
    g = grade(completion, reference, kind)
    return g.reward, g.status
