"""langenv: a resettable-state Gymnasium language environment for RL on LLM reasoning.

Importing the package registers the tasks ``gsm8k``, ``math`` and ``arithmetic`` and the Gymnasium
ids ``langenv/GSM8K-v0``, ``langenv/MATH-v0`` and ``langenv/Arithmetic-v0`` (bump the version when
extraction, grading or, for arithmetic, problem generation changes).
"""

import gymnasium as gym

from langenv.env import LanguageEnv, StepResult
from langenv.state import EnvState, transition
from langenv.tasks import Problem, Task, make_task, register_task, task_names

__all__ = [
    "EnvState", "LanguageEnv", "Problem", "StepResult", "Task",
    "make_task", "register_task", "task_names", "transition",
]

for _id, _task in (
    ("langenv/GSM8K-v0", "gsm8k"), ("langenv/MATH-v0", "math"), ("langenv/Arithmetic-v0", "arithmetic"),
):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point="langenv.env:LanguageEnv", kwargs={"task": _task})
