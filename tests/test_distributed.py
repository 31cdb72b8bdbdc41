"""Data-parallel updates (algos/training/distributed.py + the ``dist`` argument of actor_update / critic_update).

The two-process test launches this file twice as a script (``python tests/test_distributed.py
worker DIR``) with the environment a launcher sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), so `algos.training.distributed.current` initialises a gloo group through accelerate. Each
rank trains on its shard; the test then checks that the ranks' parameters are bitwise equal and
match a single-process update on the concatenated batch.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from algos.actor import ActorSettings, actor_update
from algos.critic import CriticSettings, ValueModel, compute_values, critic_update
from algos.models.policy import batch_sequences
from algos.training.distributed import Dist, current

N_EPISODES = 8  # global batch
#: name -> (ActorSettings overrides, optimiser); one global mini-batch per epoch, so every rank's
#: mini-batch is its whole shard and the composition matches the single-process run.
SCENARIOS = {
    "token_mean_whiten_kl_sgd": ({"epochs": 2, "pg_aggregation": "token_mean", "kl_aggregation": "seq_mean_token_sum",
                                  "whiten_advantages": True, "kl_coef": 0.1, "grad_clip": 0.05}, "sgd"),
    "seq_mean_token_mean_adamw": ({"epochs": 1, "pg_aggregation": "seq_mean_token_mean",
                                   "kl_aggregation": "seq_mean_token_mean", "whiten_advantages": False,
                                   "kl_coef": 0.05, "grad_clip": 1.0}, "adamw"),
}
STAT_KEYS = ("loss", "pg_loss", "kl", "clip_frac", "ratio", "grad_norm", "optimizer_steps", "nonfinite_trailing")


def actor_settings(overrides: dict) -> ActorSettings:
    base = {"epochs": 1, "minibatch_size": N_EPISODES, "micro_batch_size": 2, "clip_eps": 0.2, "kl_coef": 0.1,
            "temperature": 0.7, "grad_clip": 1.0}
    base.update(overrides)
    return ActorSettings(**base)


def make_optimizer(model, kind: str):
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def load_payload(directory: Path):
    """The model (policy and a perturbed reference), episodes, advantages and returns saved by the test."""
    from transformers import AutoModelForCausalLM

    payload = torch.load(directory / "payload.pt", weights_only=False)
    policy = AutoModelForCausalLM.from_pretrained(directory / "policy", local_files_only=True).eval()
    reference = AutoModelForCausalLM.from_pretrained(directory / "reference", local_files_only=True).eval()
    reference.requires_grad_(False)
    return policy, reference, payload


def run_updates(policy, reference, episodes, advantages, returns, dist) -> dict:
    """Every scenario from the same start (deep copies), then one critic update; returns final
    state dicts and stats."""
    out = {}
    for name, (overrides, opt_kind) in SCENARIOS.items():
        model = copy.deepcopy(policy)
        opt, sched = make_optimizer(model, opt_kind)
        stats = actor_update(model, reference, opt, sched, episodes, advantages, actor_settings(overrides), 0,
                             torch.Generator().manual_seed(1), dist=dist)
        out[name] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, stats)
    critic = ValueModel.from_policy(policy, generator=torch.Generator().manual_seed(0))
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], 0)
    old_values = compute_values(critic, batch, 2)
    from algos.actor import place_per_token

    ret = place_per_token(batch, returns)
    opt, sched = make_optimizer(critic, "sgd")
    stats = critic_update(critic, opt, sched, batch, old_values, ret,
                          CriticSettings(epochs=2, minibatch_size=N_EPISODES, micro_batch_size=3, value_clip=0.2,
                                         grad_clip=0.1), torch.Generator().manual_seed(2), dist=dist)
    out["critic"] = ({k: v.detach().clone() for k, v in critic.state_dict().items()}, stats)
    return out


def worker(directory: Path) -> None:
    """One rank: check the collectives, run the updates on this rank's shard, save the results."""
    torch.set_num_threads(1)
    dist = current()
    assert dist.world_size == 2 and dist.is_main == (dist.rank == 0), dist
    r = dist.rank
    # collectives
    assert dist.all_reduce_sum(torch.tensor([1.0, float(r)])).tolist() == [2.0, 1.0]
    assert dist.broadcast_object({"from": r}) == {"from": 0}
    assert dist.all_gather_object(r * 10) == [0, 10]
    lin = torch.nn.Linear(2, 2)
    lin.weight.grad = torch.full((2, 2), float(r + 1))
    if r == 0:
        lin.bias.grad = torch.ones(2)  # None on rank 1: zeros there, summed
    dist.all_reduce_grads(lin)
    assert lin.weight.grad.tolist() == [[3.0, 3.0]] * 2 and lin.bias.grad.tolist() == [1.0, 1.0]
    dist.barrier()

    policy, reference, payload = load_payload(directory)
    episodes, advantages, returns = (dist.shard(payload[k]) for k in ("episodes", "advantages", "returns"))
    # uneven ranks and a global mini-batch that does not divide: the same ValueError on every rank
    errors = []
    uneven = episodes[:1] if r == 0 else episodes  # 1 vs 4 episodes: 1 vs 2 steps per epoch
    for eps, mb in ((uneven, 4), (episodes, 3)):
        try:
            actor_update(copy.deepcopy(policy), reference, torch.optim.SGD(policy.parameters(), lr=0.0), None,
                         eps, advantages[:len(eps)], actor_settings({"minibatch_size": mb}), 0,
                         torch.Generator(), dist=dist)
        except ValueError as exc:
            errors.append(str(exc))
    results = run_updates(policy, reference, episodes, advantages, returns, dist)
    torch.save({"results": results, "errors": errors}, directory / f"rank{r}.pt")
    dist.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_workers(script: Path, directory: Path, timeout: float, what: str) -> None:
    """Run ``script worker directory`` as ranks 0 and 1 of a 2-process gloo group on this machine (one
    thread each) and fail the test with both logs if either rank fails or runs past ``timeout`` s."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, str(script), "worker", str(directory)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"{what} workers timed out:\n" + "\n".join(logs))
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(logs)[-6000:]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def test_two_ranks_match_one_process_on_the_global_batch(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
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

    launch_two_workers(Path(__file__), tmp_path, timeout=120, what="distributed")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # the same clear error on both ranks, before any work
    for rank in ranks:
        assert len(rank["errors"]) == 2, rank["errors"]
        assert "[1, 4] episodes" in rank["errors"][0] and "same number" in rank["errors"][0]
        assert "minibatch_size 3" in rank["errors"][1] and "world_size 2" in rank["errors"][1]

    single = run_updates(policy, reference, episodes, advantages, returns, None)
    for name in list(SCENARIOS) + ["critic"]:
        (state0, stats0), (state1, _) = ranks[0]["results"][name], ranks[1]["results"][name]
        state, stats = single[name]
        assert state0.keys() == state1.keys() == state.keys()
        for key in state:
            assert torch.equal(state0[key], state1[key]), f"{name}: {key} differs between ranks"
        moved = max(float((state[k] - policy_or_critic_start(name, policy, k)).abs().max()) for k in state)
        assert moved > 1e-4, f"{name}: the update did not move the parameters"
        for key in state:
            err = float((state0[key] - state[key]).abs().max())
            assert err <= 1e-6 * max(float(state[key].abs().max()), 1.0), f"{name}: {key} off by {err}"
        for key in STAT_KEYS:
            if key in stats:
                assert stats0[key] == pytest.approx(stats[key], rel=1e-5, abs=1e-6), f"{name}: {key}"
        assert stats0["optimizer_steps"] == stats["optimizer_steps"] > 0


def policy_or_critic_start(name: str, policy, key: str) -> torch.Tensor:
    if name != "critic":
        return policy.state_dict()[key]
    critic = ValueModel.from_policy(policy, generator=torch.Generator().manual_seed(0))
    return critic.state_dict()[key]


# ---------------------------------------------------------------- one process

def test_shard_is_contiguous_and_rejects_uneven_lengths():
    items = list(range(6))
    assert Dist(0, 2).shard(items) == [0, 1, 2] and Dist(1, 2).shard(items) == [3, 4, 5]
    assert Dist(2, 3).shard(items) == [4, 5] and Dist().shard(items) == items
    with pytest.raises(ValueError, match="5 items.*world_size 2"):
        Dist(1, 2).shard(range(5))


def test_dist_fields_are_validated():
    assert Dist().is_main and not Dist(1, 2).is_main and Dist(0, 4).is_main
    for args in ((0, 0), (2, 2), (-1, 2)):
        with pytest.raises(ValueError):
            Dist(*args)
    with pytest.raises(ValueError, match="is_main"):
        Dist(1, 2, True)


def test_world_one_collectives_are_local_noops():
    d = Dist()
    t = torch.tensor([1.0, 2.0], requires_grad=True)
    out = d.all_reduce_sum(t)
    assert torch.equal(out, t.detach()) and out is not t and not out.requires_grad
    out += 1
    assert t.tolist() == [1.0, 2.0]
    lin = torch.nn.Linear(2, 1)
    lin.weight.grad = torch.full((1, 2), 3.0)
    d.all_reduce_grads(lin)
    assert lin.weight.grad.tolist() == [[3.0, 3.0]] and lin.bias.grad is None
    d.barrier()
    obj = {"a": [1]}
    assert d.broadcast_object(obj) is obj and d.all_gather_object(obj) == [obj]


def test_current_is_world_one_without_a_launcher(monkeypatch):
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert current() == Dist(0, 1, True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert current().world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        current()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    worker(Path(sys.argv[2]))
