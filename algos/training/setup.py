"""The first phase of a training run (`algos.training.loop.train`): check the settings, prepare the run
directory, load the policy / reference / tokenizer (`algos.models`), make the train and test
environments, run the grading canary, make the sampler, the algorithm (the contract is
`algos.training.context`), the prompt sampler (`algos.training.prompts`) and the Monte-Carlo
diagnostics. Nothing is written before every check has passed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from algos.models.policy import check_model_source, clone_reference
from algos.models.pretrained import gguf_source
from algos.models.sharding import shard_model
from algos.models.warm_start import load_model
from algos.samplers import Sampler, make_sampler
from algos.training.checkpoint import Checkpoint, load_checkpoint, state_fingerprint
from algos.training.config import RunConfig
from algos.training.context import Algorithm, TrainContext
from algos.training.distributed import Dist
from algos.training.distributed import current as current_dist
from algos.training.evaluation import eval_environment
from algos.training.mc_diagnostics import MCDiagnostics
from algos.training.prompts import PromptSampler, make_prompt_sampler
from algos.training.run_control import (
    RESUMABLE_CHANGES,
    config_differences,
    on_main_first,
    prepare_out,
    seed_everything,
    start_out,
)
from langenv.env import LanguageEnv
from langenv.tasks.base import Task, make_task


@dataclass
class BuiltRun:
    """Everything `build_run` makes, read by the training loop's later phases."""

    run: RunConfig
    algo_name: str
    algo_config: Any
    out: Path
    dist: Dist
    config_dump: dict
    resume: Checkpoint | None
    task: Task
    policy: Any
    reference: Any
    tokenizer: Any
    env: LanguageEnv
    train_problems: Sequence
    eval_env: LanguageEnv
    eval_problems: Sequence
    sampler: Sampler
    ctx: TrainContext
    algorithm: Algorithm
    prompts: PromptSampler
    diagnostics: MCDiagnostics | None = None
    reference_fingerprint: str = ""
    """`state_fingerprint` of the reference as loaded (before any sharding)."""
    full_policy: Any = None
    """With ``--sharding fsdp``: the sampler's own unsharded copy of the policy (in sync after every
    update; bf16 with ``--fsdp-bf16``); None otherwise (or with vLLM)."""
    wandb_run: Any = None
    start: float = 0.0
    """`time.perf_counter()` at the (virtual) start of the run: a resumed run counts its earlier time."""

    @property
    def main(self) -> bool:
        return self.dist.is_main

    @property
    def sharded(self) -> bool:
        return self.run.sharding != "none"


def build_run(run: RunConfig, algo_name: str, algo_config: Any, build: Callable[..., Algorithm]) -> BuiltRun:
    """Check the settings, prepare the run directory, load the models, make the environments, the
    sampler and the algorithm. Nothing is written before every check has passed."""
    task = make_task(run.task)
    if run.model != "tiny" and gguf_source(run.model, run.gguf_file) is None:  # a GGUF model is checked there
        check_model_source(run.model)
    dist = current_dist()
    if dist.world_size == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        print("[langenv] note: running as one process. `accelerate launch --cpu` starts several processes only "
              "through MPI; on a CPU use `accelerate launch --multi_gpu --num_processes N` or `torchrun "
              "--nproc_per_node N` (gloo is picked automatically without CUDA)", file=sys.stderr)
    if dist.world_size > 1 and not getattr(build, "supports_distributed", False):  # `build` is the class
        raise ValueError(f"algo:{algo_name} does not support multi-process training (world size {dist.world_size}); "
                         f"run it in one process, or use vineppo, ppo, grpo or rloo")
    if run.dynamic_sampling and not getattr(build, "supports_dynamic_sampling", False):
        raise ValueError(f"--dynamic-sampling: algo:{algo_name} does not collect groups through the dynamic sampler; "
                         f"use vineppo, ppo, grpo or rloo")
    if run.sharding != "none":
        if not (getattr(build, "supports_distributed", False) and hasattr(build, "trainables")):
            raise ValueError(f"--sharding {run.sharding}: algo:{algo_name} does not support sharded training; "
                             f"use --sharding none, or vineppo, ppo, grpo, rloo or reinforce")
        if dist.world_size == 1:
            raise ValueError(f"--sharding {run.sharding} needs several processes (world size 1: there is nothing to "
                             f"shard over); launch with `torchrun --nproc_per_node N` or `accelerate launch "
                             f"--num_processes N`, or use --sharding none")
    if dist.world_size > 1 and run.device == "cuda":  # one GPU per process
        run = dataclasses.replace(run, device=f"cuda:{int(os.environ.get('LOCAL_RANK', dist.rank))}")
    out = on_main_first(dist, lambda: prepare_out(run, algo_name), share=True)
    config_dump = {"algorithm": algo_name, "run": _jsonable(run), "algo": _jsonable(algo_config)}
    resume = load_checkpoint(out) if run.resume is not None else None
    if resume is not None and dist.is_main:
        _warn_changed_settings(out, algo_name, config_dump)
    seed_everything(run.seed)

    policy, tokenizer = on_main_first(dist, lambda: load_model(run.model, task, run.cache_dir, run.device,
                                                                        run.rebuild_warm_start and resume is None,
                                                                        gguf_file=run.gguf_file,
                                                                        chat_template=run.chat_template))
    threads = run.torch_threads()
    if threads:
        torch.set_num_threads(threads)
    policy.eval()
    reference = clone_reference(policy)
    reference_fingerprint = state_fingerprint(reference)
    max_new = algo_config.sampling.max_new_tokens
    context = getattr(policy.config, "max_position_embeddings", None)
    env = LanguageEnv(task, tokenizer, split="train", max_new_tokens=max_new, max_context=context)
    eval_env, eval_problems = eval_environment(task, tokenizer, run, max_new, context)
    train_problems = env.problems[: run.train_problems or None]
    env.check_prompt_lengths()
    eval_env.check_prompt_lengths(eval_problems)
    if dist.is_main:
        if resume is None:
            start_out(out)
        (out / "config.json").write_text(json.dumps(config_dump, indent=2))
    if run.canary_problems:
        from langenv.canary import check_canary

        check_canary(env, count=run.canary_problems)
    full_policy = None
    if run.sharding != "none" and run.sampler != "vllm":  # the sampler's own unsharded copy (one per process)
        full_policy = copy.deepcopy(policy)
        if run.fsdp_bf16:  # it samples in bf16, as the update computes
            full_policy.to(torch.bfloat16)
    sampler = make_sampler(run.sampler, full_policy if full_policy is not None else policy, tokenizer,
                           max_batch_size=run.sampler_batch_size, max_context=context, workdir=out / "vllm")
    if run.sharding == "fsdp":  # in place; π_old, π_ref and the update all run through these sharded modules
        if run.fsdp_bf16:
            policy.float()  # fp32 master weights (and AdamW states); FSDP computes in bf16
        shard_model(policy, bf16=run.fsdp_bf16)
        shard_model(reference, bf16=run.fsdp_bf16)
    ctx = TrainContext(task, env, sampler, policy, reference, tokenizer, run.seed, dist=dist, cache_dir=run.cache_dir,
                       train_problems=train_problems, dynamic_sampling_rounds=run.dynamic_sampling,
                       sharding=run.sharding, sharding_bf16=run.fsdp_bf16)
    ctx.generator.manual_seed(run.seed)
    algorithm = build(algo_config, ctx, run.iterations)
    prompts = make_prompt_sampler(run.prompt_sampler, ctx, algo_config.sampling, run.learnability_pool_factor,
                                  run.learnability_attempts)
    diagnostics = None
    if run.mc_diagnostics_every:
        diagnostics = MCDiagnostics(ctx, algo_config.sampling, run.mc_diagnostics_every, run.mc_diagnostics_states,
                                    run.mc_diagnostics_k)
        ctx.advantage_observers.append(diagnostics.observe)
    return BuiltRun(run, algo_name, algo_config, out, dist, config_dump, resume, task, policy, reference, tokenizer,
                env, train_problems, eval_env, eval_problems, sampler, ctx, algorithm, prompts, diagnostics,
                reference_fingerprint=reference_fingerprint, full_policy=full_policy)


def _warn_changed_settings(out: Path, algo_name: str, config_dump: dict) -> None:
    saved = json.loads((out / "config.json").read_text())
    if saved.get("algorithm") != algo_name:
        raise ValueError(f"--resume {out}: the run was {saved.get('algorithm')!r}, not {algo_name!r}")
    changed = [d for d in config_differences(saved, config_dump) if d.split(":")[0] not in RESUMABLE_CHANGES]
    if changed:
        print(f"[langenv] warning: resuming {out} with changed settings (the continuation is not exact): "
              + "; ".join(changed), file=sys.stderr)


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
