"""Benchmark: VinePPO Monte-Carlo rollouts with three ways of sampling K continuations per prefix.

    python experiments/bench/mc_rollouts.py                              # default size (~2 min on 2 CPU cores)
    python experiments/bench/mc_rollouts.py --prefixes 16 --k 4          # smaller
    python experiments/bench/mc_rollouts.py --threads 2 --out /tmp/mc.json

Setup: the cached offline arithmetic model (`algos.models.warm_start.warm_start_tiny`, built if absent) samples
``--problems`` x ``--samples`` trajectories (VinePPO settings: T 0.6, top-p 0.9, the task's stop string).
Their step-boundary prefixes are computed as `algos.vineppo.VinePPO.estimate_values` computes them
(`step_layout`, `EnvState.prefix`, identical prefixes merged), the first ``--prefixes`` are kept, and
the SAME prefixes are continued K times through `algos.rollout.continue_states` (the code path of
`estimate_values`, env stepping and grading included but not timed) with:

1. ``naive``: one `model.generate(num_return_sequences=K)` call per prefix (stop strings checked by
   `HFSampler`'s stopping criterion, since transformers' own ``stop_strings`` fails on the character
   tokenizer; no log-probs are computed, which only favours it);
2. ``hf_batched``: `algos.samplers.hf.HFSampler`, all prefixes x K rows batched (``--batch-size`` rows);
3. ``fast_expanded``: `algos.samplers.prefix_sharing.PrefixSharingSampler` with ``cascade=False``
   (one prefill per prefix, its KV cache copied to each of its K rows, finished rows dropped);
4. ``fast_unfused``: the same sampler with shared-prefix (cascade) attention: each prefix's keys/values
   are kept and read once for all its K rows (`algos.samplers.decode_cache`), every decode step through
   the model's forward pass (``fused_decode=False``);
5. ``fast_chunked``: cascade attention inside the fused decode step (`algos.samplers.fused_decode`: fused
   q/k/v and gate/up products, no per-step module plumbing), rows decoded chunk by chunk
   (``continuous=False``);
6. ``fast``: the sampler as used in training: the fused step with continuous batching
   (`algos.samplers.refill`: the batch is refilled with the next rows as rows finish).

``--task gsm8k`` takes the prefixes from the tiny GSM8K model's trajectories instead (longer
prompts and steps: GSM8K-length prefixes, where sharing the prefix should pay more).

After a short warm-up, each sampler runs ``--repeats`` times (interleaved with the others, each run
with its own seed) and its fastest run is reported. Tokens are those of the returned completions
(EOS included); seconds are those spent in ``sampler.generate``, both wall-clock and this process's
CPU time (`time.process_time`, all threads summed). On a machine shared with other jobs the CPU
figure is the steadier one: time-slicing inflates wall time but not CPU time. A forward hook also
counts the token positions each sampler runs through the model (prefill and decode, padding and
finished rows included) per returned token: the work each one asks for, whatever the machine load. The mean V̂ of each sampler is printed as
a sanity check (they are independent Monte-Carlo estimates of the same values). Writes the numbers as
JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GenerationConfig, StoppingCriteriaList  # noqa: E402

from algos.models.policy import load_policy  # noqa: E402
from algos.models.warm_start import warm_start_tiny  # noqa: E402
from algos.rollout import (  # noqa: E402
    collect_episodes,
    continue_states,
    step_layout,  # noqa: E402
)
from algos.samplers.base import Completion, SamplingParams
from algos.samplers.hf import HFSampler, _StopOnGeneratedText  # noqa: E402
from algos.samplers.prefix_sharing import PrefixSharingSampler  # noqa: E402
from langenv.env import LanguageEnv  # noqa: E402
from langenv.tasks import make_task  # noqa: E402

DEFAULT_OUT = REPO / "experiments" / "bench" / "results" / "mc_rollouts.json"


class NaiveGenerateSampler:
    """The straightforward baseline: ``model.generate(prompt, num_return_sequences=n)`` per prompt.

    Implements the `Sampler` protocol enough for `continue_states`: token ids, finish reason and
    text are right; log-probs are zeros (not computed). Stop strings: `HFSampler`'s windowed
    criterion on the generated text (transformers' ``StopStringCriteria`` raises on the character
    tokenizer of the arithmetic model: "substring not found" in ``clean_tokenizer_vocab``).
    """

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id

    def update_weights(self, model) -> None:
        pass

    def generate(self, prompts, params: SamplingParams, seed: int | None = None) -> list[list[Completion]]:
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=params.temperature > 0,
            temperature=params.temperature or None, top_p=params.top_p if params.temperature > 0 else None,
            top_k=0 if params.temperature > 0 else None, num_return_sequences=params.n,
            eos_token_id=self.eos_id, pad_token_id=self.pad_id,
        )
        out = []
        with torch.random.fork_rng(enabled=seed is not None), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            for p in prompts:
                ids = torch.tensor([list(p)], dtype=torch.long)
                criteria = StoppingCriteriaList()
                if params.stop_strings:
                    criteria.append(_StopOnGeneratedText(self.tokenizer, params.stop_strings, len(p), params.n))
                seqs = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                           generation_config=config, stopping_criteria=criteria)
                group = []
                for row in seqs[:, len(p):].tolist():
                    end, reason = len(row), "length"
                    if self.eos_id in row:
                        end, reason = row.index(self.eos_id) + 1, "stop"
                    row = row[:end]
                    text = self.tokenizer.decode(row, skip_special_tokens=True)
                    cut = [text.find(s) for s in params.stop_strings if s in text]
                    if cut:
                        text, reason = text[: min(cut)], "stop"
                        # trailing pad ids after a stop-string stop
                        while row and row[-1] == self.pad_id and self.pad_id != self.eos_id:
                            row.pop()
                    group.append(Completion(row, [0.0] * len(row), reason, text))
                out.append(group)
        return out


class Counting:
    """Wraps a sampler; counts the tokens it returns, the wall-clock seconds it spends and the CPU
    seconds this process spends meanwhile (all threads; `time.process_time`)."""

    def __init__(self, inner):
        self.inner, self.tokens, self.seconds, self.cpu_seconds = inner, 0, 0.0, 0.0

    def update_weights(self, model) -> None:
        self.inner.update_weights(model)

    def generate(self, prompts, params, seed=None):
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.inner.generate(prompts, params, seed=seed)
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0
        self.tokens += sum(len(c.token_ids) for group in out for c in group)
        return out


class ForwardWork:
    """Counts the token positions the model processes (rows x sequence length per call, padding
    included): the work a sampler asks of the model, independent of machine load. Counted at the input
    embedding, which both the model's forward pass and the fused decode step
    (`algos.samplers.fused_decode`) call with the token ids."""

    def __init__(self, model):
        self.positions, self.calls = 0, 0
        self._handle = model.get_input_embeddings().register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input", args[0] if args else None)
        self.positions += ids.numel()
        self.calls += 1


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def vineppo_prefixes(episodes, tokenizer, split_steps):
    """Unique step-boundary prefix states, in `VinePPO.estimate_values` order (no step cap)."""
    unique = {}
    for e in episodes:
        for b in step_layout(e, tokenizer, split_steps).boundaries:
            state = e.state.prefix(b)
            unique.setdefault(state.token_ids, state)
    return list(unique.values())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=12, help="train problems whose trajectories give the prefixes")
    ap.add_argument("--samples", type=int, default=4, help="trajectories per problem (G)")
    ap.add_argument("--prefixes", type=int, default=40, help="most step-boundary prefixes to continue (first N)")
    ap.add_argument("--k", type=int, default=9, help="Monte-Carlo continuations per prefix (K; VinePPO paper: 9)")
    ap.add_argument("--task", default="arithmetic", choices=["arithmetic", "gsm8k"],
                    help="task whose tiny warm start and trajectories give the prefixes")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="response budget (tokens); default 96 for arithmetic, 256 for gsm8k")
    ap.add_argument("--batch-size", type=int, default=64, help="max sequences per batch (hf_batched and fast)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=2, help="runs per sampler (interleaved); the fastest is reported")
    ap.add_argument("--seed", type=int, default=0)
    names = ["naive", "hf_batched", "fast_expanded", "fast_unfused", "fast_chunked", "fast"]
    ap.add_argument("--only", nargs="*", default=names, choices=names)
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("LANGENV_CACHE", Path.home() / ".cache" / "langenv")))
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON results path (default {DEFAULT_OUT.name}, mc_rollouts_gsm8k.json for gsm8k)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = DEFAULT_OUT if args.task == "arithmetic" else DEFAULT_OUT.with_name("mc_rollouts_gsm8k.json")
    if args.max_new_tokens is None:
        args.max_new_tokens = 96 if args.task == "arithmetic" else 256
    for name in ("problems", "samples", "prefixes", "k", "max_new_tokens", "batch_size", "threads", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)

    task = make_task(args.task)
    path = warm_start_tiny(task, args.cache_dir)
    policy, tok = load_policy(str(path), dtype=torch.float32)
    context = getattr(policy.config, "max_position_embeddings", None)
    env = LanguageEnv(task, tok, split="train", max_new_tokens=args.max_new_tokens, max_context=context)
    params = SamplingParams(0.6, 0.9, args.max_new_tokens, task.stop_strings, args.samples)
    episodes = collect_episodes(env, HFSampler(policy, tok, max_context=context), env.problems[: args.problems], params,
                                seed=args.seed)
    states = vineppo_prefixes(episodes, tok, task.split_steps)[: args.prefixes]
    prefix_lens = [len(s.token_ids) for s in states]
    print(f"{len(episodes)} trajectories (mean reward {sum(e.reward for e in episodes) / len(episodes):.2f}), "
          f"{len(states)} prefixes of {min(prefix_lens)}-{max(prefix_lens)} tokens, K={args.k}, "
          f"max_new_tokens={args.max_new_tokens}")

    mc = SamplingParams(0.6, 0.9, args.max_new_tokens, task.stop_strings, args.k)
    samplers = {
        "naive": lambda: NaiveGenerateSampler(policy, tok),
        "hf_batched": lambda: HFSampler(policy, tok, max_batch_size=args.batch_size, max_context=context),
        "fast_expanded": lambda: PrefixSharingSampler(policy, tok, max_batch_size=args.batch_size, max_context=context,
                                                      cascade=False),
        "fast_unfused": lambda: PrefixSharingSampler(policy, tok, max_batch_size=args.batch_size, max_context=context,
                                                     fused_decode=False),
        "fast_chunked": lambda: PrefixSharingSampler(policy, tok, max_batch_size=args.batch_size, max_context=context,
                                                     continuous=False),
        "fast": lambda: PrefixSharingSampler(policy, tok, max_batch_size=args.batch_size, max_context=context),
    }
    work = ForwardWork(policy)
    rows = {name: {"runs": []} for name in args.only}
    wrapped = {name: Counting(samplers[name]()) for name in args.only}
    for name, sampler in wrapped.items():  # warm-up (allocator, stop-string masks, lazy imports)
        continue_states(env, sampler, states[:2], SamplingParams(0.6, 0.9, 8, task.stop_strings, 2), seed=1)
    for rep in range(args.repeats):  # interleaved, so that a change of machine load hits every sampler alike
        for name, sampler in wrapped.items():
            sampler.tokens, sampler.seconds, sampler.cpu_seconds = 0, 0.0, 0.0
            work.positions = work.calls = 0
            results = continue_states(env, sampler, states, mc, seed=args.seed + 1 + rep)
            values = [sum(r.reward for r in rs) / len(rs) for rs in results]
            run = {"wall_s": sampler.seconds, "cpu_s": sampler.cpu_seconds, "tokens": sampler.tokens,
                   "forward_positions": work.positions, "forward_calls": work.calls, "mean_value": sum(values) / len(values)}
            if name.startswith("fast"):
                run["stats"] = {k: v for k, v in vars(sampler.inner.stats).items() if k != "buckets"}
            rows[name]["runs"].append(run)
            print(f"  run {rep + 1}/{args.repeats} {name:<13} wall {sampler.seconds:6.2f} s  cpu {sampler.cpu_seconds:6.2f} s  "
                  f"{sampler.tokens:6d} tokens  {work.calls:5d} forwards over {work.positions:6d} positions  "
                  f"mean V̂ {run['mean_value']:.3f}", flush=True)

    # Best run per sampler (least wall time; least CPU time): on a shared machine the fastest run is
    # the one least disturbed by other processes. CPU time is this process's, all threads summed.
    for row in rows.values():
        best_wall = min(row["runs"], key=lambda r: r["wall_s"])
        best_cpu = min(row["runs"], key=lambda r: r["cpu_s"])
        row["tokens_per_s"] = best_wall["tokens"] / best_wall["wall_s"]
        row["tokens_per_cpu_s"] = best_cpu["tokens"] / best_cpu["cpu_s"]
        row["positions_per_token"] = best_wall["forward_positions"] / best_wall["tokens"]
    for name, row in rows.items():
        for key in ("tokens_per_s", "tokens_per_cpu_s"):
            for base in ("naive", "hf_batched", "fast_expanded", "fast_unfused"):
                row[f"{key}_x_{base}"] = row[key] / rows[base][key] if base in rows else float("nan")

    info = machine()
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
          f"transformers {info['transformers']}, {info['date']}")
    print(f"{len(states)} prefixes x K={args.k}, max_new_tokens={args.max_new_tokens}, batch {args.batch_size}, "
          f"best of {args.repeats} runs")
    print(f"{'sampler':<13} {'tok/s wall':>10} {'x naive':>8} {'x hf':>6} {'x exp':>6} {'x unf':>6} | {'tok/cpu-s':>10} "
          f"{'x naive':>8} {'x hf':>6} {'x exp':>6} {'x unf':>6} | {'fwd pos/tok':>11}")
    for name, row in rows.items():
        print(f"{name:<13} {row['tokens_per_s']:10.1f} {row['tokens_per_s_x_naive']:8.2f} "
              f"{row['tokens_per_s_x_hf_batched']:6.2f} {row['tokens_per_s_x_fast_expanded']:6.2f} "
              f"{row['tokens_per_s_x_fast_unfused']:6.2f} | "
              f"{row['tokens_per_cpu_s']:10.1f} {row['tokens_per_cpu_s_x_naive']:8.2f} "
              f"{row['tokens_per_cpu_s_x_hf_batched']:6.2f} {row['tokens_per_cpu_s_x_fast_expanded']:6.2f} "
              f"{row['tokens_per_cpu_s_x_fast_unfused']:6.2f} | {row['positions_per_token']:11.2f}")
    print("x exp: against fast_expanded (the same sampler without shared-prefix attention); x unf: against "
          "fast_unfused (cascade attention, the model's forward pass per decode step)")
    print("fwd pos/tok: token positions run through the model (prefill + decode, padding and finished rows "
          "included) per returned token")
    result = {"machine": info, "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                            "prefixes_used": len(states), "prefix_tokens_min": min(prefix_lens),
                                            "prefix_tokens_max": max(prefix_lens), "model": str(path)},
              "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
