"""Grading kinds ``"rg:<dataset>"``: a reasoning-gym dataset's own ``score_answer`` as the grader.

reasoning-gym (https://github.com/open-thought/reasoning-gym, ``pip install reasoning-gym``) ships,
with every procedural dataset, a scorer ``ProceduralDataset.score_answer(answer, entry) -> float``
(1.0 for a correct answer). `langenv.tasks.reasoning_gym.ReasoningGymTask` makes such a dataset a
langenv task whose grading kind is ``"rg:<dataset>"`` and whose `Problem.answer` is the JSON
reference written by `make_reference`; this module grades a completion against it.

Pipeline (`grade_rg`):

1. Extraction (`extract`): the completion's final answer is what follows its LAST ``####`` marker:
   the rest of that line, stripped (the VinePPO/GSM8K strict rule) - or, when the reference answer
   itself spans several lines (grids, boards), everything after the marker to the end of the text,
   stripped. No ``####`` (or nothing after it) is ``"no_answer"``, and the scorer is not called (a
   format-only reward such as countdown's 0.01 for a missing answer would be 0 anyway, see 3).
2. Scoring: ``score_answer(answer, entry)`` of the dataset, built once per (dataset, config) with
   ``reasoning_gym.create_dataset(name, size=1, seed=0, **config)`` - the scorer reads the entry
   (its ``answer`` and ``metadata``), not the generator's seed. Some scorers parse model text
   (countdown calls sympy's ``parse_expr``, which evaluates it): that is why this runs only inside a
   `GradingPool` worker, with its hard timeout and memory cap; langenv itself never evaluates it.
   `langenv.grading._core._fast` never decides an ``rg:`` kind in process.
3. Partial credit is mapped to a BINARY reward: score >= 1.0 is ``"correct"`` (reward 1.0); any
   other finite score (countdown's 0.01 for a formatted wrong answer and 0.05 for a wrong set of
   numbers, the default scorer's ``len(oracle) / len(answer)`` when the answer merely contains the
   oracle) is ``"incorrect"`` (reward 0.0). Every algorithm here assumes correct/incorrect rewards
   (DPO+ pairs, RestEM filters, VinePPO values are success probabilities), and a format bonus would
   be learnt in place of the task.
4. Failures: a scorer that raises, or returns something that is not a finite number, is
   ``"invalid"`` with the cause in `Grade.cause` (a verdict on this answer/reference pair, like a
   refused answer; not a crash). A reference that is not our JSON, or that names another dataset
   than the kind, is ``"invalid"`` with its cause. reasoning-gym missing from the worker's
   interpreter, or a dataset it does not know, is an infrastructure failure: `GradingError`, hence
   status ``"error"`` from the pool - never a reward 0.

The first ``rg:`` check on a worker imports reasoning-gym (0.7-2 s); the pool gives that one check
``start_timeout_s`` more (see `langenv.grading.GradingPool`).
"""

from __future__ import annotations

import json
import math
import numbers
import re
from functools import lru_cache
from typing import Any

#: Prefix of the reasoning-gym grading kinds: ``"rg:" + <dataset name>``.
RG_PREFIX = "rg:"

_HASHES = re.compile(r"####")


def is_rg_kind(kind: Any) -> bool:
    """True for a grading kind ``"rg:<dataset>"`` (a str with a non-empty dataset name)."""
    return isinstance(kind, str) and kind.startswith(RG_PREFIX) and len(kind) > len(RG_PREFIX)


def make_reference(dataset: str, config: dict[str, Any], entry: dict[str, Any]) -> str:
    """The reference string (`Problem.answer`) of one reasoning-gym entry: a JSON object
    ``{"dataset": <name>, "config": <config kwargs>, "entry": {"question", "answer", "metadata"}}``
    with sorted keys. JSON turns tuples into lists (the scorers of the datasets we test read lists
    the same; the grading canary checks that reference answers still score 1.0).

    Raises:
        ValueError: the entry or the config is not JSON-serialisable (names the dataset and the cause).
    """
    try:
        return json.dumps({"dataset": dataset, "config": config, "entry": entry}, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rg:{dataset}: the entry or config cannot be written as JSON for the grader: {exc}") from exc


def parse_reference(reference: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(dataset, config, entry) of a reference written by `make_reference`.

    Raises:
        ValueError: not such a JSON object (the message says what is missing).
    """
    try:
        obj = json.loads(reference)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the reference is not the JSON of a reasoning-gym entry ({exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("dataset"), str) or not isinstance(obj.get("entry"), dict):
        raise ValueError("the reference JSON needs a 'dataset' name and an 'entry' object")
    config = obj.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"the reference's 'config' must be an object, got {type(config).__name__}")
    return obj["dataset"], config, obj["entry"]


def extract(text: str, multiline: bool = False) -> str | None:
    """The answer after the last ``####`` of ``text``: the rest of that line, stripped; with
    ``multiline``, everything after the marker, stripped. None when there is no ``####`` or
    nothing after it. Text after an end-of-turn token (``<|im_end|>``, ...) is ignored. Never raises
    for a str."""
    from langenv.grading import _extract as X

    if not isinstance(text, str):
        return None
    text = X.cap(text)
    hashes = list(_HASHES.finditer(text))
    if not hashes:
        return None
    rest = text[hashes[-1].end():]
    answer = (rest if multiline else rest.split("\n", 1)[0]).strip()
    return answer or None


@lru_cache(maxsize=64)
def _scorer_dataset(name: str, config_json: str):
    """The reasoning-gym dataset whose ``score_answer`` grades entries of ``name`` with this config.

    Raises:
        GradingError: reasoning-gym cannot be imported, or does not know ``name`` / the config.
    """
    from langenv.grading._core import GradingError

    try:
        import reasoning_gym
    except ImportError as exc:
        raise GradingError(f"reasoning-gym is not importable in the grading worker ({exc}); pip install reasoning-gym") from exc
    try:
        return reasoning_gym.create_dataset(name, size=1, seed=0, **json.loads(config_json))
    except Exception as exc:  # an unknown dataset or config is a set-up error, not a verdict
        raise GradingError(f"reasoning-gym cannot build dataset {name!r} for grading: {type(exc).__name__}: {exc}") from exc


def grade_rg(completion: str, reference: str, kind: str):
    """Grade ``completion`` against a `make_reference` reference with the dataset's ``score_answer``
    (see the module docstring for extraction, the partial-credit mapping and the statuses).

    Returns:
        A `langenv.grading.Grade`: "correct" (1.0), "incorrect", "no_answer" or "invalid" (with a cause).

    Raises:
        GradingError: reasoning-gym is not importable, or the dataset / its config is unknown to it.
    """
    from langenv.grading._core import Grade, _g

    dataset = kind[len(RG_PREFIX):]
    if not isinstance(completion, str) or not isinstance(reference, str):
        return Grade(0.0, "invalid", "completion and reference must be str")
    try:
        name, config, entry = parse_reference(reference)
    except ValueError as exc:
        return Grade(0.0, "invalid", str(exc))
    if name != dataset:
        return Grade(0.0, "invalid", f"the reference is an entry of {name!r}, the grading kind is {kind!r}")
    oracle = entry.get("answer")
    answer = extract(completion, multiline=isinstance(oracle, str) and "\n" in oracle.strip())
    if answer is None:
        return _g("no_answer")
    scorer = _scorer_dataset(name, json.dumps(config, sort_keys=True))
    try:
        score = scorer.score_answer(answer, entry)
    except ImportError as exc:  # a scorer's optional dependency is missing: the grader's fault
        from langenv.grading._core import GradingError

        raise GradingError(f"reasoning-gym's {name} score_answer cannot import a dependency: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - includes RecursionError and MemoryError (the worker's cap)
        return Grade(0.0, "invalid", f"reasoning-gym's {name} score_answer raised {type(exc).__name__}: {exc}"[:500])
    if isinstance(score, bool) or not isinstance(score, numbers.Real) or not math.isfinite(float(score)):
        return Grade(0.0, "invalid", f"reasoning-gym's {name} score_answer returned {score!r}, not a finite number"[:500])
    return _g("correct" if float(score) >= 1.0 else "incorrect")
