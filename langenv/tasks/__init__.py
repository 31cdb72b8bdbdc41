"""Reasoning tasks: the `Task` protocol, the registry, and the built-in tasks."""

from langenv.tasks.arithmetic import ArithmeticTask
from langenv.tasks.base import Problem, Task, make_task, register_task, task_names
from langenv.tasks.gsm8k import GSM8KTask
from langenv.tasks.math import MATHTask

register_task("gsm8k", GSM8KTask)
register_task("math", MATHTask)
register_task("arithmetic", ArithmeticTask)

__all__ = ["Problem", "Task", "make_task", "register_task", "task_names", "ArithmeticTask", "GSM8KTask", "MATHTask"]
