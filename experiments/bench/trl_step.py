"""Per-step time vs TRL (issue 16 item 3): TRL's ``GRPOTrainer`` step and our GRPO iteration, side by side.

    python experiments/bench/trl_step.py                      # both modes, 5 timed steps after a warm-up (~1 min)
    python experiments/bench/trl_step.py --repeats 3 --modes forced64
    python experiments/bench/trl_step.py --out /tmp/trl_step.json

One process, one model directory (default: the arithmetic warm start as runs get it, from the cache or the
package's shipped copy, a 4.2M-parameter Llama with a
54-token character tokenizer, Hugging Face format), loaded separately by each side from the same files,
float32 on the CPU with ``--threads`` torch threads. Every step on every side is one GRPO step as its library
does it: 1 arithmetic train prompt (the same problem for every side at a given step: problem k of
``langenv.integrations.trl.trl_dataset("arithmetic", "train")`` at step k) x 8 completions of at most 64 tokens
at temperature 1, top-p 1, graded by our grader (TRL through ``langenv.integrations.trl.reward_function``, ours
through the environment), group-normalised advantages (mean and std), the clipped surrogate with
per-sequence token means (TRL ``loss_type="grpo"``, ours ``seq_mean_token_mean``), β = 0 (no reference
model), one AdamW step (lr 1e-5, weight decay 0, gradient-norm clip 1; TRL with a constant schedule, ours
with its linear decay over 10,000 iterations, i.e. ≈ constant).

Sides (interleaved: at each step TRL, then each of ours, in that order; the first step is a warm-up and
dropped; our sides' order rotates from step to step; the table gives the median over ``--repeats``
steps):

* ``trl``: ``trl.GRPOTrainer`` (1.16) with ``per_device_train_batch_size=8, num_generations=8``; the model is
  given by path, the tokenizer loaded by TRL from the same directory. TRL's ``train()`` runs all steps; our
  steps run inside its ``on_step_end`` callback, and a TRL step is the time from the end of that callback
  to the next ``on_step_end`` (data loading, generation, reward, loss forward/backward, clipping,
  optimiser step, the previous step's logging). Its phases are read without touching TRL's code: the
  model's ``generate`` (wrapped on the model instance) = sampling, the reward function = grading, the
  ``on_pre_optimizer_step``..``on_optimizer_step`` callbacks = the optimiser step, and the rest of
  ``on_step_begin``..``on_pre_optimizer_step`` = TRL's training forward/backward, clipping and bookkeeping.
  TRL computes no separate π_old pass at one step per generation (it detaches the training pass).
* ``ours-fast`` / ``ours-hf``: `algos.grpo.GRPO.iteration` (collect through the environment with the
  prefix-sharing / HF sampler, grade, `algos.actor.actor_update`), built as `algos.training.loop` builds it
  (`TrainContext`), with ``prompts_per_iteration=1, samples_per_prompt=8, minibatch_size=8,
  micro_batch_size=8``. Phases from the iteration's own ``time/*`` metrics.
* ``ours-fast+old``: the same as ``ours-fast`` with the separate π_old log-prob pass forced back on (the
  code path before `algos.actor.single_step` let a one-step update reuse its training pass; done here by
  replacing ``algos.actor.single_step`` for that side only): the before/after of that change.
* ``ours-fast-unfused``: the same as ``ours-fast`` with ``PrefixSharingSampler(fused_decode=False)``: each decode
  step through the model's forward pass instead of `algos.samplers.fused_decode` (the code before that change).
* ``ours-fast-noshare``: the same as ``ours-fast`` with ``share_prompt_forward=False`` (every row's prompt +
  response in one training forward pass, the code before the shared-prompt forward,
  `algos.models.policy.shared_prompt_logprobs`): the before/after of that change.

Modes: ``natural`` (completions end at EOS, so the two libraries may sample different lengths: completion
tokens per step are reported for each side) and ``forced64`` (every completion exactly 64 tokens: TRL with
``generation_kwargs={"min_new_tokens": 64}``, ours with EOS set to the never-sampled ``<unk>`` in our copy of
the tokenizer and no stop string, so generation runs to the 64-token budget; the responses are then
truncated, reward 0, and both sides still run the full update on 8 x 64 tokens).

Writes the numbers as JSON to ``--out`` and prints a table: seconds per step (median, min, max), completion
tokens per step (mean over the timed steps), the phase medians, and TRL / ours.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

import torch

SIDES = ("trl", "ours-fast", "ours-fast-unfused", "ours-fast-noshare", "ours-fast+old", "ours-hf")
PHASES = ("sampling", "grading", "logprob passes", "update", "other")
G, MAX_NEW, LR = 8, 64, 1e-5


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers
    import trl

    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


class Ours:
    """Our GRPO on its own copy of the model: ``step(k)`` runs one `GRPO.iteration` on train problem k and
    returns (seconds, completion tokens, phases in seconds, problem id)."""

    def __init__(self, model_dir: Path, sampler: str, forced: bool, old_pass: bool, seed: int, share: bool = True,
                 fused: bool = True):
        from algos.config import with_fields
        from algos.grpo import GRPO, GRPOConfig
        from algos.models.policy import load_policy
        from algos.samplers import make_sampler
        from algos.training.context import TrainContext
        from langenv import LanguageEnv
        from langenv.tasks import make_task

        policy, tokenizer = load_policy(str(model_dir), dtype=torch.float32)
        if forced:  # an EOS the model never samples: every completion runs to the 64-token budget
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.eos_token = "<unk>"
        task = make_task("arithmetic")
        if forced:  # nor cut at the task's stop string: TRL has none
            task.stop_strings = ()
        context = policy.config.max_position_embeddings
        env = LanguageEnv(task, tokenizer, split="train", max_new_tokens=MAX_NEW, max_context=context)
        sampler_ = make_sampler(sampler, policy, tokenizer, max_batch_size=64, max_context=context, workdir=Path("."))
        if not fused:
            sampler_.fused_decode = False
        # β = 0: the reference is never run; the policy stands in for it
        self.ctx = TrainContext(task, env, sampler_, policy, policy, tokenizer, seed)
        self.ctx.generator.manual_seed(seed)
        cfg = with_fields(GRPOConfig(), prompts_per_iteration=1, samples_per_prompt=G, max_new_tokens=MAX_NEW,
                          temperature=1.0, top_p=1.0, minibatch_size=G, micro_batch_size=G, epochs=1,
                          learning_rate=LR, warmup_ratio=0.0, weight_decay=0.0, grad_clip=1.0, kl_coef=0.0,
                          aggregation="seq_mean_token_mean", bf16_autocast=False, share_prompt_forward=share)
        self.algo = GRPO(cfg, self.ctx, total_iterations=10_000)
        self.old_pass = old_pass

    def step(self, k: int) -> tuple[float, float, dict[str, float], str]:
        from algos import actor

        problem = self.ctx.env.problems[k]
        original = actor.single_step
        if self.old_pass:  # the code path before the single-step reuse: always a separate π_old pass
            actor.single_step = lambda *a, **kw: False
        try:
            t0 = time.perf_counter()
            m = self.algo.iteration([problem], k)
            seconds = time.perf_counter() - t0
        finally:
            actor.single_step = original
        phases = {"sampling": m["time/sampling"], "grading": m["time/grading"],
                  "logprob passes": m["time/logprobs"], "update": m["time/update"] - m["time/logprobs"]}
        phases["other"] = seconds - sum(phases.values())
        return seconds, m["tokens/episodes"], phases, problem.id


def run_mode(mode: str, args) -> dict:
    """One TRL training run of 1 + repeats steps with our sides' steps interleaved; the timings of every step."""
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from langenv.integrations.trl import reward_function, trl_dataset

    forced = mode == "forced64"
    steps = 1 + args.repeats
    ours = {"ours-fast": Ours(args.model, "fast", forced, False, args.seed),
            "ours-fast-unfused": Ours(args.model, "fast", forced, False, args.seed, fused=False),
            "ours-fast-noshare": Ours(args.model, "fast", forced, False, args.seed, share=False),
            "ours-fast+old": Ours(args.model, "fast", forced, True, args.seed),
            "ours-hf": Ours(args.model, "hf", forced, False, args.seed)}
    records: dict[str, list[dict]] = {side: [] for side in SIDES}
    clock: dict[str, float] = {}
    trl_phase = {"generate": 0.0, "reward": 0.0, "tokens": 0.0, "problem": ""}
    graded = reward_function("arithmetic")

    def reward(**kwargs):
        t = time.perf_counter()
        out = graded(**kwargs)
        trl_phase["reward"] += time.perf_counter() - t
        trl_phase["problem"] = kwargs["problem_id"][0]
        return out

    reward.__name__ = graded.__name__

    class Interleave(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            clock["start"] = time.perf_counter()

        def on_step_begin(self, *a, **kw):
            clock["begin"] = time.perf_counter()

        def on_pre_optimizer_step(self, *a, **kw):
            clock["pre_opt"] = time.perf_counter()

        def on_optimizer_step(self, *a, **kw):
            clock["opt"] = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            now = time.perf_counter()
            seconds = now - clock["start"]
            train = clock["pre_opt"] - clock["begin"] - trl_phase["generate"] - trl_phase["reward"]
            phases = {"sampling": trl_phase["generate"], "grading": trl_phase["reward"], "logprob passes": 0.0,
                      "update": train + clock["opt"] - clock["pre_opt"]}
            phases["other"] = seconds - sum(phases.values())
            k = state.global_step - 1
            records["trl"].append({"step": k, "seconds": seconds, "tokens": trl_phase["tokens"], "phases": phases,
                                   "optimizer_s": clock["opt"] - clock["pre_opt"], "problem": trl_phase["problem"]})
            order = list(ours.items())
            for side, runner in order[k % len(order):] + order[:k % len(order)]:  # rotated: no side always first
                s, tokens, ph, pid = runner.step(k)
                records[side].append({"step": k, "seconds": s, "tokens": tokens, "phases": ph, "problem": pid})
            trl_phase.update(generate=0.0, reward=0.0, tokens=0.0)
            clock["start"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=G, num_generations=G, gradient_accumulation_steps=1,
            max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0, learning_rate=LR, weight_decay=0.0,
            max_grad_norm=1.0, lr_scheduler_type="constant", beta=0.0, num_iterations=1, loss_type="grpo",
            scale_rewards="group", max_steps=steps, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
            save_strategy="no", seed=args.seed, shuffle_dataset=False, dataloader_num_workers=0,
            model_init_kwargs={"dtype": "float32"},
            generation_kwargs={"min_new_tokens": MAX_NEW} if forced else None)
        trainer = GRPOTrainer(model=str(args.model), reward_funcs=reward, args=config,
                              train_dataset=trl_dataset("arithmetic", "train", limit=steps), callbacks=[Interleave()])
        eos = {trainer.processing_class.eos_token_id, *trainer.eos_token_ids}
        model = trainer.model
        generate = model.generate

        def timed_generate(*a, **kw):  # an instance attribute on the model: TRL's code is not touched
            t = time.perf_counter()
            out = generate(*a, **kw)
            trl_phase["generate"] += time.perf_counter() - t
            prompt_width = (kw.get("input_ids") if "input_ids" in kw else a[0]).shape[1]
            for row in out[:, prompt_width:].tolist():  # completion tokens up to and including the first EOS
                trl_phase["tokens"] += next((i + 1 for i, tok in enumerate(row) if tok in eos), len(row))
            return out

        model.generate = timed_generate
        trainer.train()
        threads = torch.get_num_threads()
    if threads != args.threads:
        raise SystemExit(f"torch threads changed during the run: {threads}, asked for {args.threads}")
    problems = {side: [r["problem"] for r in recs] for side, recs in records.items()}
    if len({tuple(p) for p in problems.values()}) != 1:
        raise SystemExit(f"the sides saw different problems: {problems}")
    return summarise(mode, records)


def summarise(mode: str, records: dict[str, list[dict]]) -> dict:
    out = {"mode": mode, "problems": [r["problem"] for r in records["trl"][1:]], "sides": {}}
    for side, recs in records.items():
        timed = recs[1:]  # the first step is the warm-up
        secs = [r["seconds"] for r in timed]
        out["sides"][side] = {
            "median_s": statistics.median(secs), "min_s": min(secs), "max_s": max(secs), "steps_s": secs,
            "tokens_per_step": statistics.mean(r["tokens"] for r in timed),
            "tokens_per_step_each": [r["tokens"] for r in timed],
            "phases_median_s": {p: statistics.median(r["phases"][p] for r in timed) for p in PHASES},
            "warmup_s": recs[0]["seconds"],
        }
    trl = out["sides"]["trl"]["median_s"]
    out["trl_over_ours"] = {side: trl / out["sides"][side]["median_s"] for side in SIDES if side != "trl"}
    return out


def print_table(result: dict) -> None:
    sides = result["sides"]
    print(f"\nmode {result['mode']}: problems {', '.join(p.rsplit('/', 1)[-1] for p in result['problems'])}")
    print(f"{'':28}" + "".join(f"{s:>15}" for s in SIDES))
    print(f"{'s / step, median':28}" + "".join(f"{sides[s]['median_s']:15.3f}" for s in SIDES))
    print(f"{'s / step, min .. max':28}" + "".join(f"{sides[s]['min_s']:7.3f}..{sides[s]['max_s']:.3f}"[-15:].rjust(15)
                                                for s in SIDES))
    print(f"{'completion tokens / step':28}" + "".join(f"{sides[s]['tokens_per_step']:15.1f}" for s in SIDES))
    for p in PHASES:
        print(f"{'  ' + p + ' (median s)':28}" + "".join(f"{sides[s]['phases_median_s'][p]:15.3f}" for s in SIDES))
    print(f"{'ms / completion token':28}" + "".join(
        f"{1000 * sides[s]['median_s'] / max(sides[s]['tokens_per_step'], 1):15.2f}" for s in SIDES))
    print(f"{'TRL / ours (speed-up)':28}{'':15}" + "".join(f"{result['trl_over_ours'][s]:14.2f}x" for s in SIDES[1:]))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None,
                   help="a Hugging Face model directory (both sides); default: the arithmetic warm start")
    p.add_argument("--modes", nargs="+", default=["natural", "forced64"], choices=["natural", "forced64"])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side after the warm-up step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "experiments" / "bench" / "results" / "trl_step.json")
    args = p.parse_args(argv)
    if args.model is None:  # what `run.py --task arithmetic` starts from: cache, else the shipped copy, else trained
        from algos.models.warm_start import warm_start_tiny
        from algos.training.config import RunConfig
        from langenv.tasks import make_task

        args.model = warm_start_tiny(make_task("arithmetic"), RunConfig().cache_dir)
    if not (args.model / "config.json").exists():
        raise SystemExit(f"--model {args.model}: no config.json there (pass a Hugging Face model directory)")
    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = [run_mode(mode, args) for mode in args.modes]
    load_after = os.getloadavg()
    where = machine()
    print(f"\nGRPO step, TRL {where['trl']} vs ours: {args.model.name}, 1 prompt x {G} completions <= {MAX_NEW} tokens, "
          f"fp32, {args.threads} threads; {where['cpu']}, torch {where['torch']}, transformers "
          f"{where['transformers']}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    for result in results:
        print_table(result)
    report = {"machine": where, "settings": {**vars(args), "completions": G, "max_new_tokens": MAX_NEW, "lr": LR},
              "loadavg_before": load_before, "loadavg_after": load_after, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
