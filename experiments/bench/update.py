"""Update benchmark: seconds per `algos.actor.actor_update` on the cached tiny models, side by side for
unsorted vs length-sorted micro-batches and fp32 vs bf16 autocast.

    python experiments/bench/update.py                 # both tiny models, 3 rounds (~3 min on 1 CPU thread)
    python experiments/bench/update.py --rounds 1 --episodes 32
    python experiments/bench/update.py --out /tmp/update.json

What is timed: one whole actor update as a trainer runs it — the no-grad π_old and π_ref passes over
the iteration's episodes, then ``--epochs`` epochs of mini-batches (forward + backward per micro-batch,
clipping, AdamW step) — for ``--episodes`` episodes whose prompts are the task's prompts and whose
responses are the reference solutions of random train problems (lengths vary as the gold solutions
do). The configurations run round-robin (``--rounds`` times each) so that background load hits them
alike; the table gives the median and the minimum seconds per update. ``padding`` is the fraction of
the token positions run through the model in the training micro-batches that are padding (first
epoch's mini-batches, replayed from the same shuffle).

bf16 is ``ActorSettings(bf16_autocast=True)``: the π_old, π_ref and training forward passes under
``torch.autocast("cpu", dtype=torch.bfloat16)``, micro-batch widths rounded up to 32 tokens; weights,
optimiser, backward-accumulated gradients and the loss maths stay fp32 (logits are cast to fp32 before
the log-softmax). ``ratio`` / ``clip_frac`` are the update's own statistics: with one epoch and π_old
computed in the same precision they show the precision noise (fp32: ratio 1, clip_frac 0).

Models: the offline warm starts ``tiny-arithmetic-1ff0469af7546829`` and ``tiny-gsm8k-66a5d80612191031``
under ``~/.cache/langenv`` (built by `algos.models.warm_start.warm_start_tiny`), loaded in float32.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import torch

from algos.actor import AUTOCAST_WIDTH_MULTIPLE, ActorSettings, actor_update, micro_batch_rows
from algos.models.policy import batch_sequences, clone_reference, load_policy
from algos.rollout import Episode
from langenv.state import EnvState
from langenv.tasks import make_task

MODELS = {"arithmetic": "~/.cache/langenv/tiny-arithmetic-1ff0469af7546829",
          "gsm8k": "~/.cache/langenv/tiny-gsm8k-66a5d80612191031"}
CONFIGS = [("unsorted", "fp32"), ("sorted", "fp32"), ("unsorted", "bf16"), ("sorted", "bf16")]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def make_episodes(task_name: str, tokenizer, n: int, seed: int) -> list[Episode]:
    task = make_task(task_name)
    problems = task.load("train")
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(problems), generator=g)[:n].tolist()
    episodes = []
    for i in picks:
        p = problems[i]
        prompt = tuple(tokenizer(task.prompt(p)).input_ids)
        response = tuple(tokenizer(task.target(p), add_special_tokens=False).input_ids) + (tokenizer.eos_token_id,)
        state = EnvState(p, prompt, response, max_new_tokens=max(len(response), 1), terminated=True)
        episodes.append(Episode(state, 1.0, "correct", ""))
    return episodes


def padding_fraction(episodes, settings: ActorSettings, pad_id: int, seed: int) -> float:
    """Padding share of the positions the first epoch's training micro-batches run (widths as
    `algos.actor.actor_update` trims them)."""
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], pad_id)
    lengths = batch["attention_mask"].sum(1)
    order = torch.randperm(len(episodes), generator=torch.Generator().manual_seed(seed)).tolist()
    real = padded = 0
    multiple = AUTOCAST_WIDTH_MULTIPLE if settings.bf16_autocast else 1
    for start in range(0, len(order), settings.minibatch_size):
        rows = order[start:start + settings.minibatch_size]
        mask = batch["attention_mask"][rows]
        for part in micro_batch_rows(mask, settings.micro_batch_size, settings.sort_micro_batches):
            longest = int(lengths[[rows[i] for i in part]].max())
            width = min(-(-longest // multiple) * multiple, int(lengths[rows].max()))
            padded += width * len(part)
            real += int(lengths[[rows[i] for i in part]].sum())
    return 1.0 - real / padded


def time_update(policy, reference, episodes, advantages, settings, pad_id, seed: int) -> tuple[float, dict]:
    """Seconds of one `actor_update` (lr 1e-7, so the policy barely moves between rounds) and its stats."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-7)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    t0 = time.perf_counter()
    stats = actor_update(policy, reference, optimizer, scheduler, episodes, advantages, settings, pad_id,
                         torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - t0
    if stats["optimizer_steps"] < 1:
        raise RuntimeError(f"update took no optimiser step: {stats}")
    return seconds, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--episodes", type=int, default=64, help="episodes per update")
    ap.add_argument("--minibatch", type=int, default=32, help="episodes per optimiser step")
    ap.add_argument("--micro", type=int, default=8, help="episodes per forward/backward pass")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="timed updates per configuration (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "update.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    print(f"# update benchmark  {date}")
    print(f"# machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']} with "
          f"{info['torch_threads']} thread(s); avx512_bf16={info['avx512_bf16']} amx_bf16={info['amx_bf16']}")
    print(f"# {args.episodes} episodes, mini-batch {args.minibatch}, micro-batch {args.micro}, {args.epochs} epoch(s), "
          f"{args.rounds} timed round(s) per configuration")
    results = []
    for name in args.models:
        policy, tokenizer = load_policy(MODELS[name], dtype=torch.float32)
        reference = clone_reference(policy)
        episodes = make_episodes(name, tokenizer, args.episodes, seed=0)
        g = torch.Generator().manual_seed(1)
        advantages = [torch.randn(len(e.response_ids), generator=g).tolist() for e in episodes]
        lengths = [len(e.prompt_ids) + len(e.response_ids) for e in episodes]
        n_params = sum(p.numel() for p in policy.parameters())
        print(f"\n## {name}: {n_params / 1e6:.2f}M parameters; sequence length min/median/max "
              f"{min(lengths)}/{int(statistics.median(lengths))}/{max(lengths)} tokens")
        settings = {(sort, precision): ActorSettings(
            epochs=args.epochs, minibatch_size=args.minibatch, micro_batch_size=args.micro, clip_eps=0.2,
            kl_coef=1e-4, temperature=0.6, grad_clip=1.0, sort_micro_batches=sort == "sorted",
            bf16_autocast=precision == "bf16") for sort, precision in CONFIGS}
        times: dict[tuple[str, str], list[float]] = {c: [] for c in CONFIGS}
        last: dict[tuple[str, str], dict] = {}
        for r in range(args.rounds + 1):  # round 0 warms up
            for config in CONFIGS:
                s, last[config] = time_update(policy, reference, episodes, advantages, settings[config],
                                              tokenizer.pad_token_id, seed=r)
                if r > 0:
                    times[config].append(s)
        base = statistics.median(times[("unsorted", "fp32")])
        print(f"{'micro-batches':<14}{'precision':<11}{'median s':>10}{'min s':>9}{'vs unsorted fp32':>18}"
              f"{'padding':>9}{'ratio':>9}{'clip_frac':>11}")
        for config in CONFIGS:
            sort, precision = config
            t = times[config]
            pad = padding_fraction(episodes, settings[config], tokenizer.pad_token_id, seed=1)
            med = statistics.median(t)
            ratio, clip = last[config]["ratio"], last[config]["clip_frac"]
            print(f"{sort:<14}{precision:<11}{med:>10.3f}{min(t):>9.3f}{base / med:>17.2f}x{pad:>9.1%}"
                  f"{ratio:>9.4f}{clip:>11.4f}")
            results.append({"model": name, "model_path": MODELS[name], "parameters": n_params,
                            "micro_batches": sort, "precision": precision, "seconds": t, "median_s": med,
                            "min_s": min(t), "speedup_vs_unsorted_fp32": base / med, "padding_fraction": pad,
                            "update_stats": last[config]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": date, "machine": info, "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "results": results}
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
