"""langenv: a resettable-state Gymnasium language environment for RL on LLM reasoning.

Importing the package registers the tasks ``gsm8k``, ``math`` and ``arithmetic``, the task family
``rg:<dataset>`` (any reasoning-gym dataset, when reasoning-gym is installed) and the Gymnasium
ids ``langenv/GSM8K-v1``, ``langenv/MATH-v1`` and ``langenv/Arithmetic-v1`` (bump the version when
extraction, grading, the transition or, for arithmetic, problem generation changes).

Versions: v1 (issue 11 §4) cuts a response stopped by a stop string before the stop string and
appends EOS (v0 kept the stop string's tokens; all three ids), and grades GSM8K and Arithmetic by the
paper's rule, 0 without a ``#### N`` line (v0 fell back to the last number).
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
    ("langenv/GSM8K-v1", "gsm8k"), ("langenv/MATH-v1", "math"), ("langenv/Arithmetic-v1", "arithmetic"),
):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point="langenv.env:LanguageEnv", kwargs={"task": _task})
