"""The shared-prompt forward (`algos.models.policy.shared_prompt_logprobs`, ``ActorSettings.share_prompt_forward``):
each distinct prompt of a micro-batch runs once and its KV cache is expanded to the rows that repeat it. Its
log-probs, loss, gradients and updated parameters must be those of the plain path (one forward pass over every
row's prompt + response) up to float rounding, for groups of different prompt and response lengths (responses
of 0 and 1 tokens included) and rows with a prompt of their own. Behaviour only, no timing."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_actor_efficiency import GradRecorder, NoSchedule

from algos import actor
from algos.actor import ActorSettings, actor_update, batch_logprobs, micro_batch_rows
from algos.models.policy import batch_sequences, prompt_groups, response_logprobs, shared_prompt_logprobs
from algos.rollout import Episode
from langenv import Problem
from langenv.state import EnvState

# (prompt index, response length): three prompts of different lengths, groups of 4, 3 and 1 rows,
# interleaved; responses of 0 and 1 tokens in both groups
LAYOUT = [(0, 7), (1, 1), (0, 0), (2, 5), (1, 12), (0, 1), (1, 30), (0, 20)]


@pytest.fixture(scope="module")
def texts(gsm8k_task):
    problems = gsm8k_task.load("train")[:3]
    return [gsm8k_task.prompt(p) for p in problems], [gsm8k_task.target(p) for p in problems]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def rows(tokenizer, texts):
    """(prompts, responses) of LAYOUT: the prompts cut to 30, 45 and 12 tokens (different lengths), the
    responses the first n tokens of the reference solutions."""
    prompts_text, targets = texts
    prompts = [_ids(tokenizer, t)[:n] for t, n in zip(prompts_text, (30, 45, 12))]
    assert len({len(p) for p in prompts}) == 3
    solution = _ids(tokenizer, " ".join(targets))
    assert len(solution) >= 30
    return [prompts[p] for p, _ in LAYOUT], [solution[:n] for _, n in LAYOUT]


def _count_forwards(model, monkeypatch) -> list[int]:
    calls: list[int] = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_prompt_groups_follow_the_prompt_ids(rows, tokenizer):
    batch = batch_sequences(*rows, tokenizer.pad_token_id)
    assert prompt_groups(batch) == [p for p, _ in LAYOUT]  # first appearances are 0, 1, 2 in LAYOUT's order


@pytest.mark.parametrize("temperature", [0.6, 1.0, 0.0])
def test_shared_logprobs_equal_the_plain_path(small_model, rows, tokenizer, temperature, monkeypatch):
    batch = batch_sequences(*rows, tokenizer.pad_token_id)
    with torch.no_grad():
        plain = response_logprobs(small_model, batch, temperature)
        calls = _count_forwards(small_model, monkeypatch)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # the current cache API (tests/test_cache_api.py)
            shared = response_logprobs(small_model, batch, temperature, share_prompt=True)
            rounded = shared_prompt_logprobs(small_model, batch, temperature, width_multiple=32)
    assert len(calls) == 4  # prompts once + responses once, twice
    mask = batch["response_mask"]
    assert shared.shape == plain.shape and (shared[~mask] == 0).all() and (shared[mask] < 0).all()
    assert float((shared - plain).abs().max()) <= 1e-5
    assert float((rounded - plain).abs().max()) <= 1e-5


def test_unique_prompts_or_empty_responses_take_the_plain_path(small_model, rows, tokenizer, monkeypatch):
    prompts, responses = rows
    unique = batch_sequences([prompts[0], prompts[1], prompts[3]], [responses[0], responses[1], responses[3]],
                             tokenizer.pad_token_id)
    empty = batch_sequences([prompts[0], prompts[2]], [[], []], tokenizer.pad_token_id)
    with torch.no_grad():
        calls = _count_forwards(small_model, monkeypatch)
        for batch in (unique, empty):
            calls.clear()
            shared = response_logprobs(small_model, batch, 0.6, share_prompt=True)
            assert len(calls) == 1
            assert torch.equal(shared, response_logprobs(small_model, batch, 0.6))
    assert (shared == 0).all()


def test_a_group_of_one_token_responses(small_model, rows, tokenizer):
    prompts, responses = rows
    batch = batch_sequences([prompts[0]] * 3, [responses[1], responses[1][:0], [responses[0][3]]],
                            tokenizer.pad_token_id)
    with torch.no_grad():
        plain = response_logprobs(small_model, batch, 0.6)
        shared = shared_prompt_logprobs(small_model, batch, 0.6)
    assert float((shared - plain).abs().max()) <= 1e-5 and int((shared != 0).sum()) == 2


def test_shared_logprobs_have_the_plain_gradient(small_model, rows, tokenizer):
    batch = batch_sequences(*rows, tokenizer.pad_token_id)
    weights = torch.randn(batch["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    grads = []
    for share in (False, True):
        small_model.zero_grad(set_to_none=True)
        (response_logprobs(small_model, batch, 0.6, share_prompt=share) * weights).sum().backward()
        grads.append([p.grad.clone() for p in small_model.parameters()])
    for a, b in zip(*grads):
        assert float((a - b).abs().max()) <= 1e-5 * (float(a.abs().max()) + 1e-12)


def test_micro_batch_rows_keep_a_prompt_s_rows_together():
    mask = torch.zeros(8, 12, dtype=torch.long)
    for i, n in enumerate([3, 9, 1, 9, 5, 12, 2, 6]):
        mask[i, :n] = 1
    groups = [0, 1, 0, 1, 2, 0, 1, 2]
    parts = micro_batch_rows(mask, 3, groups=groups)
    # group 0 holds the longest row (5), then group 1 (rows 1, 3: 9), then group 2 (7: 6); longest first within
    assert parts == [[5, 0, 2], [1, 3, 6], [7, 4]]
    assert micro_batch_rows(mask, 3, sort=False, groups=groups) == [[0, 2, 5], [1, 3, 6], [4, 7]]
    distinct = list(range(8))
    assert micro_batch_rows(mask, 3, groups=distinct) == micro_batch_rows(mask, 3)  # no repeats: as before
    with pytest.raises(ValueError, match="groups"):
        micro_batch_rows(mask, 3, groups=groups[:5])


@pytest.mark.parametrize("micro", [3, 8])
def test_batch_logprobs_shared_equals_plain_in_input_order(small_model, rows, tokenizer, micro):
    batch = batch_sequences(*rows, tokenizer.pad_token_id)
    plain = batch_logprobs(small_model, batch, 0.6, micro)
    shared = batch_logprobs(small_model, batch, 0.6, micro, share_prompt=True)
    assert float((shared - plain).abs().max()) <= 1e-5


def _episodes(rows) -> tuple[list[Episode], list[list[float]]]:
    prompts, responses = rows
    g = torch.Generator().manual_seed(1)
    episodes, advantages = [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        state = EnvState(Problem(f"p{LAYOUT[i][0]}", "q", "s", "1"), tuple(p), tuple(r), max_new_tokens=64,
                         terminated=True)
        episodes.append(Episode(state, float(i % 2), "correct", ""))
        advantages.append(torch.randn(len(r), generator=g).tolist())
    return episodes, advantages


def _settings(share: bool, **overrides) -> ActorSettings:
    base = {"epochs": 1, "minibatch_size": 8, "micro_batch_size": 3, "clip_eps": 0.2, "kl_coef": 0.1,
            "temperature": 0.6, "grad_clip": 1e9, "share_prompt_forward": share}
    return ActorSettings(**{**base, **overrides})


def _reference(policy):
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():  # differs from the policy, so the KL term has a gradient
        for p in ref.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return ref


@pytest.mark.parametrize("pg,kl,whiten", [("token_mean", "seq_mean_token_sum", True),
                                          ("seq_mean_token_mean", "seq_mean_token_mean", False)])
def test_one_minibatch_has_the_plain_loss_and_gradient(small_model, rows, pg, kl, whiten, monkeypatch):
    episodes, advantages = _episodes(rows)
    reference = _reference(small_model)
    out = {}
    for share in (False, True):
        policy = copy.deepcopy(small_model)
        calls = _count_forwards(policy, monkeypatch)
        optimizer = GradRecorder(policy.parameters())
        s = _settings(share, pg_aggregation=pg, kl_aggregation=kl, whiten_advantages=whiten)
        stats = actor_update(policy, reference, optimizer, NoSchedule(), episodes, advantages, s,
                             0, torch.Generator().manual_seed(0))
        assert len(optimizer.grads) == 1
        out[share] = (optimizer.grads[0], stats, len(calls))
    (plain, plain_stats, plain_calls), (shared, shared_stats, shared_calls) = out[False], out[True]
    # training pass only (single step: no π_old pass): 3 micro-batches of 3, 3 and 2 rows; grouped, the
    # first holds prompt 1's 3 rows (the longest), the second 3 of prompt 0's, the third prompt 0's last row
    # and prompt 2's only row (distinct prompts: the plain path, one forward pass)
    assert plain_calls == 3 and shared_calls == 2 + 2 + 1
    assert any(float(g.abs().max()) > 0 for g in plain)
    for a, b in zip(plain, shared):
        assert float((a - b).abs().max()) <= 1e-5 * (float(a.abs().max()) + 1e-12)
    for key in ("loss", "pg_loss", "kl", "clip_frac", "ratio", "grad_norm"):
        assert shared_stats[key] == pytest.approx(plain_stats[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("epochs,minibatch,kl_coef", [(3, 4, 0.0), (2, 8, 0.1), (1, 4, 0.1)])
def test_updates_end_at_the_same_parameters(small_model, rows, epochs, minibatch, kl_coef):
    """Several optimiser steps (π_old from its own pass, shared too), with and without a KL term: the
    parameters after the update are the same with the setting on and off. SGD, whose step is linear in the
    gradient (AdamW's m / √v turns float-rounding differences of near-zero gradient entries into
    differences of up to 2·lr, which would say nothing about this change)."""
    episodes, advantages = _episodes(rows)
    reference = _reference(small_model)
    after = {}
    for share in (False, True):
        policy = copy.deepcopy(small_model)
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.05)
        stats = actor_update(policy, reference, optimizer, NoSchedule(), episodes, advantages,
                             _settings(share, epochs=epochs, minibatch_size=minibatch, kl_coef=kl_coef),
                             0, torch.Generator().manual_seed(0))
        assert stats["optimizer_steps"] == epochs * (8 // minibatch) and stats["skipped_minibatches"] == 0
        after[share] = [p.detach().clone() for p in policy.parameters()]
    moved = max(float((a - b.detach()).abs().max()) for a, b in zip(after[False], small_model.parameters()))
    assert moved > 1e-3
    worst = max(float((a - b).abs().max()) for a, b in zip(after[False], after[True]))
    assert worst <= 2e-5 * moved  # measured: at most 4e-6 of the distance moved


def test_the_setting_reaches_the_update(monkeypatch):
    from algos.config import with_fields
    from algos.grpo import GRPOConfig

    cfg = with_fields(GRPOConfig(), share_prompt_forward=False)
    assert cfg.actor.share_prompt_forward is False and GRPOConfig().actor.share_prompt_forward is True
    s = ActorSettings.from_configs(cfg.optim, cfg.actor, cfg.sampling.temperature)
    assert s.share_prompt_forward is False
    assert actor.sharing_prompts(torch.nn.Linear(2, 2), True)
    assert not actor.sharing_prompts(torch.nn.Linear(2, 2), False)


def test_bf16_autocast_with_rounded_widths(small_model, rows, tokenizer):
    """Under bf16 autocast with `AUTOCAST_WIDTH_MULTIPLE` widths (bf16 keys and values in the shared cache) the
    shared path runs and stays within bf16 rounding of the plain one; an update with it takes its step."""
    batch = batch_sequences(*rows, tokenizer.pad_token_id)
    plain = batch_logprobs(small_model, batch, 0.6, 3, bf16_autocast=True)
    shared = batch_logprobs(small_model, batch, 0.6, 3, bf16_autocast=True, share_prompt=True)
    exact = batch_logprobs(small_model, batch, 0.6, 3)
    assert (shared[~batch["response_mask"]] == 0).all()
    assert float((shared - exact).abs().max()) <= 2 * float((plain - exact).abs().max()) + 1e-2
    episodes, advantages = _episodes(rows)
    policy = copy.deepcopy(small_model)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)  # π_old pass vs training pass: ρ ≈ 1 up to bf16
    stats = actor_update(policy, _reference(small_model), optimizer, NoSchedule(), episodes, advantages,
                         _settings(True, bf16_autocast=True, minibatch_size=4), 0, torch.Generator().manual_seed(0))
    assert stats["optimizer_steps"] == 2 and abs(stats["ratio"] - 1.0) < 1e-2 and stats["grad_norm"] > 0
