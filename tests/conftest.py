"""Shared fixtures: a tokenizer built locally from GSM8K text and a small random Llama (no hub)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def gsm8k_task():
    from langenv.tasks import make_task

    return make_task("gsm8k")


@pytest.fixture(scope="session")
def tokenizer(gsm8k_task):
    from algos.models.tiny import build_tokenizer

    problems = gsm8k_task.load("train")[:400]
    texts = [p.question for p in problems] + [gsm8k_task.target(p) for p in problems] + [gsm8k_task.prompt(problems[0])]
    return build_tokenizer(texts, vocab_size=512)


@pytest.fixture
def small_model(tokenizer):
    """A 2-layer random Llama, small enough for CPU tests."""
    from algos.models.tiny import build_tiny_model

    torch.manual_seed(0)
    return build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=2).eval()


def fake_episodes(rewards_by_problem: dict[str, list[float]]) -> list:
    """Finished episodes with the given rewards per problem id: prompt (1,), response (5, 6 + j, EOS=2)."""
    from algos.rollout import Episode
    from langenv.state import EnvState
    from langenv.tasks.base import Problem

    out = []
    for pid, rewards in rewards_by_problem.items():
        problem = Problem(id=pid, question="q", solution="s", answer="1")
        for j, r in enumerate(rewards):
            state = EnvState(problem, (1,), (5, 6 + j, 2), max_new_tokens=8, eos_token_id=2, terminated=True)
            out.append(Episode(state, r, "correct" if r == 1.0 else "incorrect", f"{pid}-{j}"))
    return out


class ToyTask:
    """``n`` problems whose answer is always 1, with a plain prompt (no stop strings): for tests that
    feed fixed completions through a real `LanguageEnv`."""

    name, grading_kind, stop_strings = "toy", "gsm8k", ()

    def __init__(self, n=2):
        from langenv.tasks.base import Problem

        self.problems = [Problem(id=f"toy/{i}", question=f"pick {i}", solution="so\n#### 1", answer="1")
                         for i in range(n)]

    def load(self, split):
        return self.problems

    def prompt(self, problem):
        return f"Q: {problem.question}\nA:"

    def target(self, problem):
        return problem.solution

    def split_steps(self, response):
        from langenv.steps import split_gsm8k

        return split_gsm8k(response)


class GuessTask:
    """A task where a lightly fine-tuned small model is right about half the time: the answer of
    problem i is 1 or 2 by parity of i, which the question does not reveal. Every algorithm then
    sees groups with both correct and incorrect responses (signal for the smoke runs)."""

    name = "guess"
    grading_kind = "gsm8k"

    def __init__(self) -> None:
        from langenv.tasks.base import VINEPPO_STOP

        self.stop_strings = VINEPPO_STOP

    def load(self, split: str):
        from langenv.tasks.base import Problem

        sizes = {"train": 64, "validation": 16, "test": 16}
        if split not in sizes:
            raise ValueError(f"unknown split {split!r}")
        return [Problem(f"guess/{split}/{i}", f"Guess the number of item {i}.", f"So the answer is\n#### {1 + i % 2}",
                        str(1 + i % 2)) for i in range(sizes[split])]

    def prompt(self, problem):
        from langenv.tasks.base import VINEPPO_PROMPT

        return VINEPPO_PROMPT.format(problem=problem.question)

    def target(self, problem):
        return "\n" + problem.solution

    def split_steps(self, response: str):
        from langenv.steps import split_gsm8k

        return split_gsm8k(response)


@pytest.fixture(scope="session")
def guess_model_dir(tmp_path_factory, tokenizer):
    """A 2-layer Llama fine-tuned for a few steps on the guess task (registered as ``guess``),
    saved with its tokenizer; greedy it answers one way, sampled it answers 1 or 2."""
    from algos.models.sft import SFTConfig, train_sft
    from algos.models.tiny import build_tiny_model
    from langenv.tasks.base import _REGISTRY, register_task

    if "guess" not in _REGISTRY:
        register_task("guess", GuessTask)
    task = GuessTask()
    examples = [(task.prompt(p), task.target(p)) for p in task.load("train")]
    torch.manual_seed(0)
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=2)
    train_sft(model, tokenizer, examples, SFTConfig(learning_rate=1e-2, batch_size=16, max_steps=40, bf16_autocast=False,
                                                    warmup_ratio=0.1), progress=False)
    path = tmp_path_factory.mktemp("guess-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
