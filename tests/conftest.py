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
    from algos.tiny import build_tokenizer

    problems = gsm8k_task.load("train")[:400]
    texts = [p.question for p in problems] + [gsm8k_task.target(p) for p in problems] + [gsm8k_task.prompt(problems[0])]
    return build_tokenizer(texts, vocab_size=512)


@pytest.fixture
def small_model(tokenizer):
    """A 2-layer random Llama, small enough for CPU tests."""
    from algos.tiny import build_tiny_model

    torch.manual_seed(0)
    return build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=2).eval()
