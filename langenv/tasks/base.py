"""The `Task` protocol and the task registry.

A task is everything the environment needs to know about one reasoning dataset: how to load its
problems, how to build a prompt, what the reference answer is, how to grade a response and how to
split a response into reasoning steps. Adding a task is one small class plus one
`register_task(...)` call; every algorithm then runs on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

#: VinePPO's prompt for both GSM8K and MATH (McGill-NLP/VinePPO,
#: configs/prompt_library/MATH_step_by_step_sft.jsonnet). BOS is prepended by the tokenizer.
VINEPPO_PROMPT = "[MATH_TASK] Problem:\n{problem}\n\nSolution:"

#: VinePPO's stop string, a guard against few-shot style continuation.
VINEPPO_STOP = ("\n\n\nProblem:",)


@dataclass(frozen=True)
class Problem:
    """One problem of a task.

    Attributes:
        id: stable identifier within the task and split (e.g. ``"gsm8k/test/17"``).
        question: the problem statement.
        solution: the reference solution text used as the SFT target (no leading newline).
        answer: the reference given to the grader: the bare final answer (GSM8K, MATH, arithmetic),
            or whatever the task's grading kind needs (``rg:<dataset>``: the JSON of the
            reasoning-gym entry, `langenv.grading._rg.make_reference`).
        meta: extra read-only fields (subject, level, ...), as sorted key/value pairs.
    """

    id: str
    question: str
    solution: str
    answer: str
    meta: tuple[tuple[str, str], ...] = field(default=())


@runtime_checkable
class Task(Protocol):
    """What the environment needs from a reasoning task."""

    name: str
    #: grading family passed to `langenv.grading` ("gsm8k"/"gsm8k_strict" numeric, "math" symbolic,
    #: or "rg:<dataset>": reasoning-gym's own scorer).
    grading_kind: str
    #: generation stops when one of these appears in the response text.
    stop_strings: tuple[str, ...]

    def load(self, split: str) -> Sequence[Problem]:
        """Problems of ``split`` ("train", "validation", "test"). Raises ValueError on an unknown split."""

    def prompt(self, problem: Problem) -> str:
        """The prompt text (without BOS) the policy continues."""

    def target(self, problem: Problem) -> str:
        """The reference response text for SFT: what should follow the prompt (without EOS)."""

    def split_steps(self, response: str) -> list[str]:
        """Reasoning steps of a response; ``"".join(steps) == response``."""


_REGISTRY: dict[str, Callable[..., Task]] = {}
#: prefix -> factory(rest_of_name, **kwargs), for task families such as ``"rg:<dataset>"``.
_PREFIXES: dict[str, Callable[..., Task]] = {}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Register a task factory under ``name`` (used by `make_task` and the CLI ``--task`` flag).

    Raises:
        ValueError: if ``name`` is already registered with a different factory.
    """
    if name in _REGISTRY and _REGISTRY[name] is not factory:
        raise ValueError(f"task {name!r} is already registered")
    _REGISTRY[name] = factory


def register_task_prefix(prefix: str, factory: Callable[..., Task]) -> None:
    """Register a family of tasks: `make_task` builds ``prefix + rest`` (a name not registered
    exactly) as ``factory(rest, **kwargs)``. E.g. ``register_task_prefix("rg:", ReasoningGymTask)``
    makes ``make_task("rg:countdown")`` build ``ReasoningGymTask("countdown")``. The factory
    raises ValueError for a ``rest`` it does not know (naming a few valid ones).

    Raises:
        ValueError: ``prefix`` is empty, or already registered with a different factory.
    """
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix: expected a non-empty str, got {prefix!r}")
    if prefix in _PREFIXES and _PREFIXES[prefix] is not factory:
        raise ValueError(f"task prefix {prefix!r} is already registered")
    _PREFIXES[prefix] = factory


def task_names() -> list[str]:
    """Names of all registered tasks, sorted (task families registered by prefix are listed by
    `task_prefixes`)."""
    return sorted(_REGISTRY)


def task_prefixes() -> list[str]:
    """Prefixes of the registered task families (e.g. ``"rg:"``), sorted."""
    return sorted(_PREFIXES)


def make_task(name: str, **kwargs) -> Task:
    """Build a registered task: an exact name, else ``<prefix><rest>`` of a registered family
    (the longest matching prefix), e.g. ``make_task("rg:countdown", train_size=500)``.

    Raises:
        ValueError: for an unknown name (the message lists the registered names and families), or
            whatever the task's factory raises for its arguments (e.g. an unknown reasoning-gym
            dataset).
        ImportError: the family's optional dependency is missing (e.g. reasoning-gym for ``rg:``).
    """
    if name in _REGISTRY:
        return _REGISTRY[name](**kwargs)
    prefix = max((p for p in _PREFIXES if isinstance(name, str) and name.startswith(p)), key=len, default=None)
    if prefix is not None:
        return _PREFIXES[prefix](name[len(prefix):], **kwargs)
    families = "".join(f", {p}<name>" for p in task_prefixes())
    raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(task_names())}{families}")
