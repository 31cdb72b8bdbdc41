"""Sharded training with FSDP2 (``--sharding fsdp``, algos/models/sharding.py), on CPU with gloo.

1. One sharded update equals the single-process update on the same global batch: two processes
   (launched as in tests/test_distributed.py, whose scenarios and helpers this reuses) shard the
   policy, the reference and a critic with ``fully_shard``, run `actor_update` / `critic_update` on
   their halves of the episodes, gather the full weights, and the test compares them with one
   process on the concatenated batch (FSDP sums the gradients; no extra all-reduce).
2. A sharded run resumes exactly: ``torchrun`` with 2 processes runs PPO (policy, reference and
   critic sharded; the sampler on its own unsharded copy) 2 iterations straight, and 1 iteration,
   then ``--resume`` in new processes; metrics and the consolidated final weights are equal.
3. The refusals: one process, and algorithms without multi-process support.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
for path in (str(ROOT), str(TESTS)):
    if path not in sys.path:
        sys.path.insert(0, path)

from test_distributed import (
    N_EPISODES,
    SCENARIOS,
    STAT_KEYS,
    actor_settings,
    free_port,
    launch_two_workers,
    load_payload,
    make_optimizer,
    run_updates,
    tiny_llama,
)

from algos.actor import actor_update, place_per_token
from algos.critic import CriticSettings, ValueModel, compute_values, critic_update
from algos.models.policy import batch_sequences
from algos.models.sharding import full_tensors, is_sharded, shard_model
from algos.samplers.base import copy_weights
from algos.training.distributed import current

# ---------------------------------------------------------------- 1. one update, two ranks

BF16_SCENARIO = "token_mean_whiten_kl_sgd"  # SGD: the update is linear in the gradient (AdamW's first
# step is about lr * sign(g), which bf16 noise flips for the near-zero gradients)


def sharded_updates(policy, reference, episodes, advantages, returns, dist) -> dict:
    """`test_distributed.run_updates` with every module sharded by FSDP2; returns the gathered full
    state dicts (the same on every rank) and the stats."""
    sharded_reference = shard_model(copy.deepcopy(reference))
    out = {}
    for name, (overrides, opt_kind) in SCENARIOS.items():
        model = shard_model(copy.deepcopy(policy))
        opt, sched = make_optimizer(model, opt_kind)  # AdamW / SGD over the DTensor shards
        stats = actor_update(model, sharded_reference, opt, sched, episodes, advantages, actor_settings(overrides), 0,
                             torch.Generator().manual_seed(1), dist=dist)
        full = {k: v.clone() for k, v in full_tensors(model)}
        # a sampler's own unsharded copy receives exactly these weights
        sampler_copy = copy.deepcopy(policy)
        copy_weights(sampler_copy, model)
        assert all(torch.equal(sampler_copy.state_dict()[k], full[k]) for k in full), name
        out[name] = (full, stats)
    # FSDP mixed precision (bf16 compute, fp32 master weights and reduction): the same step, to bf16 accuracy
    overrides, opt_kind = SCENARIOS[BF16_SCENARIO]
    model = shard_model(copy.deepcopy(policy), bf16=True)
    opt, sched = make_optimizer(model, opt_kind)
    stats = actor_update(model, shard_model(copy.deepcopy(reference), bf16=True), opt, sched, episodes, advantages,
                         actor_settings(overrides), 0, torch.Generator().manual_seed(1), dist=dist)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    out["bf16"] = ({k: v.clone() for k, v in full_tensors(model)}, stats)
    # the critic built from a sharded policy (its backbone gathered), then sharded itself
    critic = shard_model(ValueModel.from_policy(shard_model(copy.deepcopy(policy)),
                                                generator=torch.Generator().manual_seed(0)))
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], 0)
    old_values = compute_values(critic, batch, 2)
    opt, sched = make_optimizer(critic, "sgd")
    stats = critic_update(critic, opt, sched, batch, old_values, place_per_token(batch, returns),
                          CriticSettings(epochs=2, minibatch_size=N_EPISODES, micro_batch_size=3, value_clip=0.2,
                                         grad_clip=0.1), torch.Generator().manual_seed(2), dist=dist)
    out["critic"] = ({k: v.clone() for k, v in full_tensors(critic)}, stats)
    return out


def worker(directory: Path) -> None:
    torch.set_num_threads(1)
    dist = current()
    assert dist.world_size == 2
    policy, reference, payload = load_payload(directory)
    episodes, advantages, returns = (dist.shard(payload[k]) for k in ("episodes", "advantages", "returns"))
    probe = shard_model(copy.deepcopy(policy))
    assert is_sharded(probe)
    local = sum(p.to_local().numel() for p in probe.parameters())
    total = sum(p.numel() for p in policy.parameters())
    results = sharded_updates(policy, reference, episodes, advantages, returns, dist)
    torch.save({"results": results, "local_numel": local, "total_numel": total}, directory / f"rank{dist.rank}.pt")
    dist.barrier()


def launch_workers(directory: Path, timeout: float = 300) -> None:
    launch_two_workers(Path(__file__), directory, timeout, what="sharded")


def test_one_sharded_update_equals_the_single_process_update(tmp_path):
    from test_actor_efficiency import fake_episodes

    policy = tiny_llama()
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    episodes, advantages = fake_episodes(N_EPISODES, seed=5)
    g = torch.Generator().manual_seed(6)
    returns = [(torch.rand(len(e.response_ids), generator=g) > 0.5).float().tolist() for e in episodes]
    policy.save_pretrained(tmp_path / "policy")
    reference.save_pretrained(tmp_path / "reference")
    torch.save({"episodes": episodes, "advantages": advantages, "returns": returns}, tmp_path / "payload.pt")
    launch_workers(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # each rank holds about half of every parameter (dim-0 shards; odd sizes round up)
    for rank in ranks:
        assert rank["local_numel"] <= rank["total_numel"] // 2 + 64, rank

    single = run_updates(policy, reference, episodes, advantages, returns, None)
    for name in list(SCENARIOS) + ["critic"]:
        (state0, stats0), (state1, stats1) = ranks[0]["results"][name], ranks[1]["results"][name]
        state, stats = single[name]
        assert state0.keys() == state1.keys() == state.keys()
        start = (ValueModel.from_policy(policy, generator=torch.Generator().manual_seed(0)) if name == "critic"
                 else policy).state_dict()
        assert max(float((state[k] - start[k]).abs().max()) for k in state) > 1e-4, f"{name}: nothing moved"
        for key in state:
            assert torch.equal(state0[key], state1[key]), f"{name}: {key} differs between ranks"
            err = float((state0[key] - state[key]).abs().max())
            assert err <= 1e-6 * max(float(state[key].abs().max()), 1.0), f"{name}: {key} off by {err}"
        for key in STAT_KEYS:
            if key in stats:
                assert stats0[key] == pytest.approx(stats[key], rel=1e-5, abs=1e-6), f"{name}: {key}"
                assert stats1[key] == stats0[key], f"{name}: {key} differs between ranks"
        assert stats0["optimizer_steps"] == stats["optimizer_steps"] > 0

    # bf16 mixed precision: identical on both ranks, and within bf16 rounding of the fp32 update
    (state0, stats0), (state1, _) = ranks[0]["results"]["bf16"], ranks[1]["results"]["bf16"]
    state, stats = single[BF16_SCENARIO]
    start = policy.state_dict()
    for key in state:
        assert torch.equal(state0[key], state1[key]), f"bf16: {key} differs between ranks"
    delta = torch.cat([(state[k] - start[k]).flatten() for k in state])
    delta_bf16 = torch.cat([(state0[k] - start[k]).flatten() for k in state])
    rel = float((delta_bf16 - delta).norm() / delta.norm())
    assert rel < 0.05, f"bf16 update differs from the fp32 one by {rel:.3f} (relative L2)"
    assert stats0["loss"] == pytest.approx(stats["loss"], rel=0.05, abs=1e-3)


# ---------------------------------------------------------------- 2. a sharded run resumes exactly

PPO_FLAGS = ["--samples-per-prompt", "2", "--minibatch-size", "4", "--micro-batch-size", "2", "--learning-rate", "1e-3",
             "--critic-learning-rate", "1e-3"]


def torchrun(tmp_path: Path, args: list[str], timeout: float = 420) -> subprocess.CompletedProcess:
    script = tmp_path / "launch.py"
    script.write_text(
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(TESTS)!r}]\n"
        "from conftest import GuessTask\n"
        "from langenv.tasks.base import register_task\n"
        "register_task('guess', GuessTask)\n"
        "from experiments.run import main\n"
        "main(sys.argv[1:])\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), *args]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False)


def common(model_dir: Path, out: Path, iterations: int) -> list[str]:
    return ["--task", "guess", "--model", str(model_dir), "--out", str(out), "--iterations", str(iterations),
            "--wandb", "disabled", "--prompts-per-iteration", "2", "--max-new-tokens", "16", "--eval-problems", "4",
            "--eval-every", "1", "--save-every", "1", "--threads", "1", "--canary-problems", "0",
            "--sharding", "fsdp"]


def metric_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_sharded_ppo_run_resumes_exactly(tmp_path, guess_model_dir):
    straight, split = tmp_path / "straight", tmp_path / "split"
    done = torchrun(tmp_path, ["algo:ppo", *common(guess_model_dir, straight, 2), *PPO_FLAGS])
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    done = torchrun(tmp_path, ["algo:ppo", *common(guess_model_dir, split, 2), *PPO_FLAGS, "--stop-after", "1"])
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    ckpt = split / "checkpoints" / "iter-000001"
    assert (ckpt / "sharded" / ".metadata").is_file() and (ckpt / "policy" / "config.json").is_file()
    assert len(list((ckpt / "sharded").glob("*.distcp"))) == 2  # one file per rank
    algorithm_state = torch.load(ckpt / "algorithm.pt")
    assert "optimizer" not in algorithm_state and "critic" not in algorithm_state  # they are in sharded/
    done = torchrun(tmp_path, ["--resume", str(split)])
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    assert "resuming" in done.stdout

    a, b = metric_rows(straight), metric_rows(split)
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b] == [0, 1, 2]
    assert a[2]["update/optimizer_steps"] > 0 and a[2]["value/optimizer_steps"] > 0
    assert a == b
    for sub in ("", "value_model"):
        name = "value_head.safetensors" if sub else "model.safetensors"
        wa, wb = load_file(straight / "final" / sub / name), load_file(split / "final" / sub / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), sub
    # the consolidated final/ is an ordinary Hugging Face model that moved away from the start
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(straight / "final", local_files_only=True)
    start = AutoModelForCausalLM.from_pretrained(guess_model_dir, local_files_only=True)
    moved = max(float((final.state_dict()[k] - v).abs().max()) for k, v in start.state_dict().items())
    assert moved > 0


def test_sharded_grpo_run_with_bf16_mixed_precision(tmp_path, guess_model_dir):
    """``--fsdp-bf16``: fp32 master weights, the sampler's copy in bf16, so the consolidated policy is
    gathered from the shards (`full_state_dict`) rather than taken from that copy."""
    out = tmp_path / "run"
    done = torchrun(tmp_path, ["algo:grpo", *common(guess_model_dir, out, 1), "--fsdp-bf16", "--samples-per-prompt",
                               "4", "--minibatch-size", "8", "--micro-batch-size", "4", "--learning-rate", "1e-3",
                               "--warmup-ratio", "0"])
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    rows = metric_rows(out)
    assert rows[1]["update/optimizer_steps"] == 1
    assert all(math.isfinite(v) for k, v in rows[1].items() if k.startswith("update/"))
    final = load_file(out / "final" / "model.safetensors")
    start = load_file(Path(guess_model_dir) / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in final.values())  # the fp32 master weights, not the bf16 copy
    assert any(not torch.equal(final[k], start[k]) for k in start)


VINEPPO_FLAGS = ["--samples-per-prompt", "2", "--mc-rollouts", "2", "--minibatch-size", "4", "--micro-batch-size", "2",
                 "--learning-rate", "1e-3", "--warmup-ratio", "0"]


def test_sharded_vineppo_run_matches_the_data_parallel_run(tmp_path, guess_model_dir):
    """One VinePPO iteration with 2 processes, sharded and not: the same episodes and Monte-Carlo
    values (the samplers start from the same weights), the same update to float rounding. The
    shared-prompt forward is off under sharding, so the data-parallel run turns it off too: the same
    micro-batches and forward passes (with it on, the float rounding differs by ~1e-6 relative and AdamW
    turns that into differences of ~1e-3 of the step in near-zero-gradient entries; tests/test_shared_prompt_update.py
    checks the shared path itself)."""
    runs = {}
    for sharding in ("none", "fsdp"):
        out = tmp_path / sharding
        args = [a if a != "fsdp" else sharding for a in common(guess_model_dir, out, 1)]
        share = ["--no-share-prompt-forward"] if sharding == "none" else []
        done = torchrun(tmp_path, ["algo:vineppo", *args, *VINEPPO_FLAGS, "--no-eval-sampled", *share])
        assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
        runs[sharding] = metric_rows(out)[1]
    dp, sharded = runs["none"], runs["fsdp"]
    assert dp["update/optimizer_steps"] == sharded["update/optimizer_steps"] > 0
    assert dp.keys() == sharded.keys()
    for key in dp:
        if key.startswith(("update/", "train/", "value", "tokens/", "grading/")):
            assert sharded[key] == pytest.approx(dp[key], rel=1e-4, abs=1e-6), key
    wa, wb = (load_file(tmp_path / s / "final" / "model.safetensors") for s in ("none", "fsdp"))
    start = load_file(Path(guess_model_dir) / "model.safetensors")
    for key in start:
        step = float((wa[key] - start[key]).abs().max())
        assert float((wb[key] - wa[key]).abs().max()) <= 1e-3 * max(step, 1e-6), key


# ---------------------------------------------------------------- 3. refusals (one process)


def test_sharding_is_refused_in_one_process_and_for_algorithms_without_support(tmp_path, guess_model_dir,
                                                                               monkeypatch):
    from experiments.run import main

    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    base = ["--task", "guess", "--model", str(guess_model_dir), "--iterations", "1", "--wandb", "disabled",
            "--sharding", "fsdp"]
    with pytest.raises(ValueError, match="needs several processes"):
        main(["algo:grpo", *base, "--out", str(tmp_path / "grpo")])
    with pytest.raises(ValueError, match="algo:dpo-plus does not support sharded training"):
        main(["algo:dpo-plus", *base, "--out", str(tmp_path / "dpo")])
    assert not (tmp_path / "grpo").exists() and not (tmp_path / "dpo").exists()  # refused before writing


def test_sharding_settings_and_checkpoint_kinds_are_checked(tmp_path):
    from algos.training.checkpoint import CheckpointError, load_sharded
    from algos.training.config import RunConfig

    with pytest.raises(ValueError, match="fsdp_bf16: FSDP mixed precision needs --sharding fsdp"):
        RunConfig(fsdp_bf16=True)
    assert RunConfig(sharding="fsdp", fsdp_bf16=True).sharding == "fsdp"
    # a checkpoint without sharded state (written with --sharding none): a clear error before any collective
    with pytest.raises(CheckpointError, match="without --sharding fsdp"):
        load_sharded(tmp_path / "sharded", {})


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    worker(Path(sys.argv[2]))
