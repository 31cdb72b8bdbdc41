"""Sharding benchmark: memory and seconds per `algos.actor.actor_update` with whole replicas vs FSDP2
(`algos.models.sharding.shard_model`), on a randomly initialised Llama of a chosen shape.

    python experiments/bench/sharded_memory.py --shape 1b --device cuda          # every mode, one process each
    python experiments/bench/sharded_memory.py --shape tiny --device cpu --rounds 1   # a quick check on a CPU
    torchrun --nproc_per_node 8 experiments/bench/sharded_memory.py --shape 7b --device cuda --mode fsdp-bf16

Modes (each in a fresh process, so peaks do not mix): ``replica`` (fp32 policy and reference, AdamW:
the trainer without sharding), ``replica-autocast`` (the same with ``ActorSettings.bf16_autocast``),
``fsdp`` (policy and reference wrapped with ``fully_shard`` per decoder layer, fp32) and ``fsdp-bf16``
(FSDP2 ``MixedPrecisionPolicy(bf16, reduce fp32)``). In one process (world size 1) FSDP shards
nothing: the fsdp modes then measure FSDP's own overhead and mixed precision, not the saving, which
needs several GPUs (run it under torchrun; every rank reports its own memory). The table also gives
the arithmetic per GPU for 8 and 16 ranks.

What is timed: one whole actor update (no-grad π_old and π_ref passes, then one mini-batch of
``--episodes`` episodes of ``--prompt-len`` + ``--response-len`` random tokens in micro-batches of
``--micro``, clipping, AdamW step), the median of ``--rounds`` after one warm-up update. Memory:
``torch.cuda.max_memory_allocated`` (GPU) or the process's peak RSS (CPU) after building the models,
and the peak during the updates.

The GPU image of this workplace lacks gymnasium (langenv imports it): carry its wheel and
farama-notifications' (see /work/.library/device/README.md) or install them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

import torch

MODES = ("replica", "replica-autocast", "fsdp", "fsdp-bf16")
#: Llama shapes: TinyLlama / Rho-1.1B, DeepSeekMath-7B (Llama-2-7B-like, vocab 102400), and a CPU toy.
SHAPES = {
    "1b": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4},
    "7b": {"vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 30,
           "num_attention_heads": 32, "num_key_value_heads": 32},
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4},
}


def _memory(device: torch.device) -> float:
    """Peak bytes so far: CUDA allocator peak, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _episodes(n: int, prompt_len: int, response_len: int, vocab: int):
    from algos.rollout import Episode
    from langenv.state import EnvState
    from langenv.tasks.base import Problem

    g = torch.Generator().manual_seed(0)
    episodes, advantages = [], []
    for i in range(n):
        prompt = tuple(torch.randint(3, vocab, (prompt_len,), generator=g).tolist())
        response = tuple(torch.randint(3, vocab, (response_len,), generator=g).tolist())
        state = EnvState(Problem(f"p{i}", "q", "s", "1"), prompt, response, max_new_tokens=response_len,
                         terminated=True)
        episodes.append(Episode(state, float(i % 2), "correct", ""))
        advantages.append(torch.randn(response_len, generator=g).tolist())
    return episodes, advantages


def run_mode(args) -> dict:
    """One mode in this process; returns its measurements (rank 0's, plus every rank's peak)."""
    import copy

    import torch.distributed as td
    from transformers import LlamaConfig, LlamaForCausalLM

    from algos.actor import ActorSettings, actor_update
    from algos.models.sharding import shard_model
    from algos.training.distributed import Dist

    torch.set_num_threads(args.threads)
    sharded = args.mode.startswith("fsdp")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if sharded or world > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(args.port))
        td.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    dist = Dist(rank, world)
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(0)
    with device:
        policy = LlamaForCausalLM(config).float()
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    n_params = sum(p.numel() for p in policy.parameters())
    if sharded:
        shard_model(policy, bf16=args.mode == "fsdp-bf16")
        shard_model(reference, bf16=args.mode == "fsdp-bf16")
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    built = _memory(device)
    local_episodes = args.episodes // world
    episodes, advantages = _episodes(local_episodes, args.prompt_len, args.response_len, config.vocab_size)
    settings = ActorSettings(epochs=1, minibatch_size=args.episodes, micro_batch_size=args.micro, clip_eps=0.2,
                             kl_coef=1e-4, temperature=0.6, grad_clip=1.0,
                             bf16_autocast=args.mode == "replica-autocast")
    times = []
    for i in range(args.rounds + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        stats = actor_update(policy, reference, opt, sched, episodes, advantages, settings, 0,
                             torch.Generator().manual_seed(i), dist=dist)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first is a warm-up (kernels, allocator, Adam states created)
            times.append(time.perf_counter() - t)
    peak = _memory(device)
    peaks = dist.all_gather_object(peak) if world > 1 else [peak]
    if td.is_initialized():
        td.destroy_process_group()
    return {"mode": args.mode, "shape": args.shape, "params": n_params, "world_size": world,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "memory_after_build_GiB": built / 2**30, "peak_GiB": peak / 2**30,
            "peak_GiB_per_rank": [p / 2**30 for p in peaks], "seconds_per_update": statistics.median(times),
            "seconds_all": times, "optimizer_steps": stats["optimizer_steps"], "loss": stats["loss"]}


def arithmetic(params: float, ranks: int) -> dict[str, float]:
    """GB per GPU (1e9 bytes) for VinePPO and PPO with fp32 master weights + grads + Adam (16 B/param),
    a bf16 reference (2 B), a bf16 sampler copy (2 B, not sharded); PPO adds a critic (16 B)."""
    gb = params / 1e9
    policy, reference, sampler, critic = 16 * gb / ranks, 2 * gb / ranks, 2 * gb, 16 * gb / ranks
    return {"vineppo": policy + reference + sampler, "ppo": policy + reference + sampler + critic}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--mode", choices=MODES, default=None, help="run one mode here (default: all, one process each)")
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--response-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--port", type=int, default=29561)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "bench" / "results" / "sharded_memory.json")
    args = ap.parse_args()
    if args.mode is not None:
        result = run_mode(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return
    results = []
    for i, mode in enumerate(MODES):
        cmd = [sys.executable, __file__, "--mode", mode, "--port", str(args.port + i)] + [
            a for k in ("shape", "device", "episodes", "micro", "prompt_len", "response_len", "rounds", "threads")
            for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "WORLD_SIZE": "1", "RANK": "0"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{mode}: failed (exit {done.returncode})\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))
        r = results[-1]
        print(f"{mode:17s} params {r['params'] / 1e9:.3f} B  after build {r['memory_after_build_GiB']:7.2f} GiB  "
              f"peak {r['peak_GiB']:7.2f} GiB  {r['seconds_per_update']:.3f} s/update  loss {r['loss']:.4f}",
              flush=True)
    if results:
        params = results[0]["params"]
        table = {f"{n}_ranks": arithmetic(params, n) for n in (1, 8, 16)}
        print("arithmetic, GB per GPU before activations (fp32 master+grads+Adam, bf16 reference and sampler copy): "
              + json.dumps({k: {a: round(v, 1) for a, v in d.items()} for k, d in table.items()}))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"results": results, "arithmetic_GB": table, "argv": sys.argv[1:],
                                        "torch": torch.__version__}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
