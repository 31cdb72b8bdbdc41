"""Reasoning tasks: the `Task` protocol, the registry, and the built-in tasks."""

from langenv.tasks.arithmetic import ArithmeticTask
from langenv.tasks.base import Problem, Task, make_task, register_task, register_task_prefix, task_names, task_prefixes
from langenv.tasks.gsm8k import GSM8KTask
from langenv.tasks.math import MATHTask
from langenv.tasks.reasoning_gym import ReasoningGymTask

register_task("gsm8k", GSM8KTask)
register_task("math", MATHTask)
register_task("arithmetic", ArithmeticTask)
register_task_prefix("rg:", ReasoningGymTask)  # any reasoning-gym dataset: "rg:countdown" (needs reasoning-gym)

__all__ = ["Problem", "Task", "make_task", "register_task", "register_task_prefix", "task_names", "task_prefixes",
           "ArithmeticTask", "GSM8KTask", "MATHTask", "ReasoningGymTask"]
