"""reasoning-gym datasets as langenv tasks: ``--task rg:<dataset>``.

reasoning-gym (https://github.com/open-thought/reasoning-gym, Apache-2.0; ``pip install
reasoning-gym``, the ``rg`` extra) has 100+ procedural generators of reasoning problems, each with its
own scorer. `ReasoningGymTask` makes any of them a langenv `Task`, registered as the task family
``"rg:"``: ``make_task("rg:countdown")``, ``python experiments/run.py algo:grpo --task rg:countdown``.

- Problems: ``reasoning_gym.create_dataset(dataset, size=..., seed=<split seed>, **dataset_config)``,
  entry ``{"question", "answer", "metadata"}``. Each split has its own seed, drawn from
  ``numpy.random.SeedSequence([seed, i])`` (train 0, validation 1, test 2) and placed so that the
  three splits' generator seeds never overlap (reasoning-gym seeds entry ``i`` with ``seed + i``, so
  neighbouring seeds would share entries). Test is drawn first with distinct questions; validation
  has distinct questions none of which is in test; train holds no test or validation question but
  may repeat one (as `langenv.tasks.arithmetic`). Changing ``train_size`` never changes the test set.
- Prompt: VinePPO's (`VINEPPO_PROMPT`) around the question plus `ANSWER_INSTRUCTION` (end with a
  line ``#### <answer>``); stop strings `VINEPPO_STOP`.
- Target: ``"\\n#### " + answer``: reasoning-gym has no worked solutions, so SFT on the targets
  teaches the answer format (and the answer), not the reasoning.
- Grading kind ``"rg:<dataset>"``: the answer after the last ``####`` scored by the dataset's own
  ``score_answer`` inside a grading worker; score >= 1.0 is correct, anything lower incorrect (see
  `langenv.grading._rg`). `Problem.answer` is the JSON reference the grader needs (dataset, config,
  the entry with its metadata); `Problem.meta` holds a few readable fields.
- Steps: one per line (`langenv.steps.split_gsm8k`), or a per-dataset splitter: `STEP_SPLITTERS`
  (``register_step_splitter``) or the ``step_splitter`` argument.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from langenv import steps
from langenv.grading._rg import RG_PREFIX, make_reference
from langenv.tasks.base import VINEPPO_PROMPT, VINEPPO_STOP, Problem

#: Splits, in the order of their seed index.
SPLITS = ("train", "validation", "test")
#: Appended to every question: the answer format the grader reads.
ANSWER_INSTRUCTION = "End your response with a final line of the form \"#### <answer>\"."
#: Per-dataset step splitters (dataset name -> ``split(response) -> steps``, ``"".join(steps) ==
#: response``); datasets not listed split by lines. Add with `register_step_splitter`.
STEP_SPLITTERS: dict[str, Callable[[str], list[str]]] = {}
#: Scalar metadata fields copied into `Problem.meta` (besides "dataset"), at most this many.
_META_FIELDS = 6
# Seeds are kept below 2**31 with their whole range of entry indices (some generators seed numpy).
_SEED_SPACE = 2**31


def register_step_splitter(dataset: str, split: Callable[[str], list[str]]) -> None:
    """Use ``split`` as the step splitter of every ``rg:<dataset>`` task built afterwards."""
    STEP_SPLITTERS[dataset] = split


def _import_rg():
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError as exc:
        raise ImportError(
            f"the rg:<dataset> tasks need reasoning-gym, which cannot be imported ({exc}): "
            f"pip install reasoning-gym  (or pip install -e \".[rg]\")") from exc
    return reasoning_gym, DATASETS


def dataset_names() -> list[str]:
    """The names reasoning-gym registers (valid ``rg:<name>`` tasks), sorted.

    Raises:
        ImportError: reasoning-gym is not installed (the message says how to install it).
    """
    return sorted(_import_rg()[1])


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


class ReasoningGymTask:
    """One reasoning-gym dataset as a langenv task (see the module docstring).

    Args:
        dataset: a reasoning-gym dataset name (e.g. "countdown", "chain_sum", "basic_arithmetic").
        train_size, validation_size, test_size: problems per split (ints >= 1). Default 2,000,
            200 and 500 (countdown generates ~10 ms per problem on a loaded 2-core CPU).
        seed: seeds every split (int >= 0). Default 0.
        size: reasoning-gym's name for the number of entries: an alias of ``train_size``.
        step_splitter: ``split(response) -> steps``; default `STEP_SPLITTERS` of the dataset, else
            one step per line (`langenv.steps.split_gsm8k`).
        **dataset_config: the dataset's own config fields (e.g. ``min_terms=2`` for chain_sum),
            passed to ``reasoning_gym.create_dataset`` (``seed`` and ``size`` are the task's own: each
            split derives its generator seed from ``seed``).

    Raises:
        ImportError: reasoning-gym is not installed ("pip install reasoning-gym").
        ValueError: an unknown dataset (the message lists valid names close to it and a few
            others), a bad size or seed, ``size`` together with ``train_size``, or a config field
            the dataset does not have / rejects (naming it and the valid fields). `load` raises
            ValueError for an unknown split and when the config admits too few distinct questions
            to fill a split.
    """

    stop_strings = VINEPPO_STOP

    def __init__(
        self,
        dataset: str,
        *,
        train_size: int | None = None,
        validation_size: int = 200,
        test_size: int = 500,
        seed: int = 0,
        size: int | None = None,
        step_splitter: Callable[[str], list[str]] | None = None,
        **dataset_config: Any,
    ) -> None:
        rg, registry = _import_rg()
        if not isinstance(dataset, str) or dataset not in registry:
            import difflib

            names = sorted(registry)
            close = difflib.get_close_matches(str(dataset), names, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ValueError(
                f"dataset: reasoning-gym has no dataset {dataset!r}; {hint}valid names include "
                f"{', '.join(n for n in ('basic_arithmetic', 'chain_sum', 'countdown', 'gsm_symbolic') if n in registry)} "
                f"({len(names)} in all: langenv.tasks.reasoning_gym.dataset_names())")
        if size is not None and train_size is not None:
            raise ValueError(f"size: an alias of train_size; give one of them, got size={size!r} and train_size={train_size!r}")
        self.dataset = dataset
        self.name = RG_PREFIX + dataset
        self.grading_kind = RG_PREFIX + dataset
        self.seed = _check_int("seed", seed, 0)
        self.train_size = _check_int("size" if size is not None else "train_size",
                                     size if size is not None else (2000 if train_size is None else train_size), 1)
        self.validation_size = _check_int("validation_size", validation_size, 1)
        self.test_size = _check_int("test_size", test_size, 1)
        config_cls = registry[dataset][1]
        fields = [f.name for f in dataclasses.fields(config_cls)] if dataclasses.is_dataclass(config_cls) else []
        unknown = [k for k in dataset_config if fields and k not in fields]
        if unknown:
            valid = [f for f in fields if f not in ("seed", "size")]
            raise ValueError(f"{unknown[0]}: not a config field of reasoning-gym's {dataset!r}; valid fields: {', '.join(valid)}")
        try:  # builds and validates the config now, so that a bad value fails here, not in `load`
            rg.create_dataset(dataset, size=1, seed=0, **dataset_config)
        except Exception as exc:  # reasoning-gym raises AssertionError/ValueError/TypeError
            raise ValueError(f"rg:{dataset}: reasoning-gym rejects the config {dataset_config!r}: "
                             f"{type(exc).__name__}: {exc}") from exc
        try:
            self.config_json = json.dumps(dataset_config, sort_keys=True)
        except TypeError as exc:
            raise ValueError(f"rg:{dataset}: the dataset config must be JSON-serialisable (the grader rebuilds "
                             f"the scorer from it): {exc}") from exc
        self._split = step_splitter or STEP_SPLITTERS.get(dataset) or steps.split_gsm8k

    @property
    def knobs(self) -> tuple:
        """Everything the problems depend on (the cache key of the splits)."""
        return (self.dataset, self.config_json, self.seed, self.train_size, self.validation_size, self.test_size)

    def __repr__(self) -> str:
        config = "".join(f", {k}={v!r}" for k, v in json.loads(self.config_json).items())
        return (f"ReasoningGymTask({self.dataset!r}, train_size={self.train_size}, validation_size="
                f"{self.validation_size}, test_size={self.test_size}, seed={self.seed}{config})")

    def load(self, split: str) -> list[Problem]:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {', '.join(map(repr, SPLITS))}, got {split!r}")
        return _splits(self.knobs)[split]

    def prompt(self, problem: Problem) -> str:
        return VINEPPO_PROMPT.format(problem=problem.question.rstrip() + "\n\n" + ANSWER_INSTRUCTION)

    def target(self, problem: Problem) -> str:
        return "\n" + problem.solution

    def split_steps(self, response: str) -> list[str]:
        return self._split(response)


def split_seeds(seed: int, budgets: dict[str, int]) -> dict[str, int]:
    """Generator seed of each split: drawn from ``SeedSequence([seed, SPLITS.index(split)])`` in
    ``[0, 2**31 - budget)``, then moved, in the order test, validation, train, past any split whose
    entry range ``[s, s + budget)`` it would overlap (reasoning-gym seeds entry ``i`` with
    ``seed + i``), so the splits never share a generator seed."""
    taken: list[tuple[int, int]] = []
    out = {}
    for split in ("test", "validation", "train"):
        budget = budgets[split]
        state = np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1, np.uint32)
        s = int(state[0]) % (_SEED_SPACE - budget)
        while any(s < end and start < s + budget for start, end in taken):
            s = max(end for start, end in taken if s < end and start < s + budget)
            if s + budget > _SEED_SPACE:
                s = 0
        taken.append((s, s + budget))
        out[split] = s
    return out


def _meta(dataset: str, entry: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    meta = {"dataset": dataset}
    for key, value in (entry.get("metadata") or {}).items():
        if len(meta) > _META_FIELDS:
            break
        if key not in ("source_dataset", "difficulty") and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            text = str(value)
            meta[key] = text if len(text) <= 80 else text[:77] + "..."
    return tuple(sorted(meta.items()))


def _generate(knobs: tuple, split: str, size: int, seed: int, budget: int, exclude: set[str],
              distinct: bool) -> list[Problem]:
    dataset, config_json = knobs[0], knobs[1]
    config = json.loads(config_json)
    rg, _ = _import_rg()
    ds = rg.create_dataset(dataset, size=budget, seed=seed, **config)
    seen: set[str] = set()
    problems: list[Problem] = []
    for i in range(budget):
        entry = ds[i]
        question, answer = entry["question"], entry["answer"]
        if question in exclude or (distinct and question in seen):
            continue
        seen.add(question)
        answer = str(answer)
        problems.append(Problem(
            id=f"{RG_PREFIX}{dataset}/{split}/{len(problems)}",
            question=question,
            solution="#### " + answer,
            answer=make_reference(dataset, config, entry),
            meta=_meta(dataset, entry),
        ))
        if len(problems) == size:
            return problems
    raise ValueError(
        f"{split}_size: reasoning-gym's {dataset!r} with config {config} gave only {len(problems)} usable questions "
        f"of {size} in {budget} draws (test and validation questions are distinct and disjoint from train); lower "
        f"test_size/validation_size or widen the dataset's config")


@lru_cache(maxsize=8)
def _splits(knobs: tuple) -> dict[str, list[Problem]]:
    sizes = dict(zip(("train", "validation", "test"), knobs[3:6]))
    budgets = {split: 2 * n + 100 for split, n in sizes.items()}
    seeds = split_seeds(knobs[2], budgets)
    test = _generate(knobs, "test", sizes["test"], seeds["test"], budgets["test"], set(), distinct=True)
    held_out = {p.question for p in test}
    validation = _generate(knobs, "validation", sizes["validation"], seeds["validation"], budgets["validation"],
                           held_out, distinct=True)
    held_out |= {p.question for p in validation}
    train = _generate(knobs, "train", sizes["train"], seeds["train"], budgets["train"], held_out, distinct=False)
    return {"train": train, "validation": validation, "test": test}
