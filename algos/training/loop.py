"""The loop every algorithm shares: select prompts -> collect -> advantages -> update -> evaluate
-> log -> checkpoint.

`train` reads in four phases, in the order they run:

1. `algos.training.setup.build_run`: the run directory, the policy / reference / tokenizer
   (`algos.models`), the train and test environments, the grading canary, the sampler, the algorithm
   (the contract is `algos.training.context`) and the prompt sampler (`algos.training.prompts`);
2. `_restore`: a fresh run's state, or everything a checkpoint holds (`--resume`);
3. `_loop`: the iterations, with evaluations, metrics, checkpoints, signals and the non-finite guard;
4. `_finish`: the final model, ``summary.json`` and what the run prints last.

Checkpoint files are in `algos.training.checkpoint`; the run directory, resume helpers, signals and
the non-finite guard in `algos.training.run_control`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from algos.models.policy import load_policy
from algos.models.sharding import full_state_dict
from algos.training.checkpoint import (
    SHARDED_DIR,
    Checkpoint,
    CheckpointError,
    checkpoint_name,
    load_sharded,
    rng_state,
    save_checkpoint,
    save_sharded,
    set_rng_state,
)
from algos.training.config import RunConfig
from algos.training.context import Algorithm
from algos.training.evaluation import evaluation_settings, kl_to_reference, run_evaluation
from algos.training.run_control import (
    EVALUATIONS,
    NonFiniteUpdatesError,
    StopRequests,
    TrainingInterrupted,
    combine_ranks,
    nonfinite_streak,
    read_metrics,
)
from algos.training.setup import BuiltRun, build_run


def train(run: RunConfig, algo_name: str, algo_config: Any, build: Callable[..., Algorithm]) -> dict[str, Any]:
    """Run an algorithm up to ``run.iterations`` iterations (the total; a resumed run continues
    from its checkpoint); returns a summary.

    Writes ``config.json``; ``metrics.jsonl`` (one JSON object per line: iteration 0 holds the
    evaluation before training, then one row per iteration with the algorithm's metrics, the
    evaluations when due, and running totals ``total/optimizer_steps`` and ``total/tokens`` — all
    sampled tokens, Monte-Carlo rollouts included); ``evaluations.jsonl`` (one line per evaluation:
    ``iteration``, the test ``problem_ids``, and per problem the number of ``correct`` of ``samples``
    greedy responses and of ``sampled_correct`` of ``sampled_samples`` sampled ones, so that two
    evaluations on the same problems compare paired); crash-safe checkpoints under ``checkpoints/``
    (`algos.training.checkpoint`) every ``save_every`` iterations, on SIGTERM/SIGINT and at the end;
    the final model in Hugging Face format under ``final/`` (plus anything the algorithm saves through
    an optional ``save(path)``, e.g. PPO's critic); ``summary.json`` last. Mirrors metrics to wandb.

    Raises:
        FileExistsError / PermissionError: see `prepare_out` (before any model is loaded).
        CheckpointError: a checkpoint could not be written or read (the previous one is intact).
        NonFiniteUpdatesError: ``max_nonfinite_updates`` optimiser steps in a row were skipped for
            a NaN/inf loss or gradient.
        RuntimeError: the grading canary failed (`langenv.canary.check_canary`).
        TrainingInterrupted: SIGTERM/SIGINT; a checkpoint was written first.
    """
    r = build_run(run, algo_name, algo_config, build)
    state = _restore(r)
    _loop(r, state)
    return _finish(r, state)


# ------------------------------------------------------------------------------------------------
# 2. restore (1, building, is `algos.training.setup.build_run`)


def _restore(r: BuiltRun) -> dict[str, Any]:
    """The state carried across iterations (what a checkpoint holds besides the models and
    optimisers): fresh, or loaded from ``r.resume`` with the policy, the algorithm's state, the
    metrics file and the RNG states put back."""
    state: dict[str, Any] = {"iteration": 0, "totals": {"total/optimizer_steps": 0.0, "total/tokens": 0.0},
                             "elapsed": 0.0, "nonfinite_streak": 0, "before": None, "last_eval": None,
                             "wandb_id": None, "reference_fingerprint": r.reference_fingerprint}
    if r.resume is None:
        return state
    saved = r.resume.trainer_state()
    if saved["reference_fingerprint"] != state["reference_fingerprint"]:
        raise CheckpointError(f"--resume {r.out}: the reference model loaded from {r.run.model!r} differs from the one "
                              f"the run started with (weights fingerprint mismatch); resume with the same --model")
    if r.sharded:  # models and optimisers from the sharded state; algorithm.pt holds the rest
        load_sharded(r.resume.sharded_dir, r.algorithm.trainables())
    elif r.resume.sharded_dir.exists():
        raise CheckpointError(f"--resume {r.out}: {r.resume.path.name} was written with --sharding fsdp; resume with "
                              f"--sharding fsdp (and the same number of processes)")
    else:
        r.policy.load_state_dict(load_policy(str(r.resume.policy_dir), dtype=r.policy.dtype,
                                             device=r.run.device)[0].state_dict())
    if hasattr(r.algorithm, "load_state_dict"):
        r.algorithm.load_state_dict(r.resume.algorithm_state())
    r.sampler.update_weights(r.policy)
    state.update({k: saved[k] for k in state if k != "reference_fingerprint"})
    if r.main:
        for name in ("metrics.jsonl", EVALUATIONS):  # rows after the checkpoint are written again
            rows = read_metrics(r.out / name, state["iteration"])
            (r.out / name).write_text("".join(line + "\n" for line in rows))
    set_rng_state(saved["rng"], {"ctx": r.ctx.generator})
    print(f"[langenv] resuming {r.out} from {r.resume.path.name} (iteration {state['iteration']} of {r.run.iterations})")
    return state


# ------------------------------------------------------------------------------------------------
# 3. loop


def _evaluate(r: BuiltRun, iteration: int) -> dict[str, float]:
    """Greedy (or ``eval_temperature``) accuracy on the test problems, and with ``eval_sampled``
    the accuracy of samples at the training temperature (or ``eval_sampled_temperature``) and the KL
    to the reference on those samples at that temperature. Rank 0 evaluates; the other ranks return ``{}`` at once, except in a sharded
    run, where they join the KL's forward passes (collectives) on rank 0's samples."""
    run, cfg = r.run, r.algo_config.sampling
    if not (r.main or r.sharded):
        return {}
    t = time.perf_counter()
    settings = evaluation_settings(run, cfg)
    res: dict[str, float] = {}
    record: dict[str, Any] = {}
    episodes = None
    if r.main:
        res, episodes, record = run_evaluation(r.eval_env, r.sampler, r.eval_problems, iteration,
                                               lambda purpose: r.ctx.seed_for(iteration, purpose), **settings)
    if run.eval_sampled:
        if r.sharded:
            episodes = r.dist.broadcast_object(episodes)
        kl = kl_to_reference(r.policy, r.reference, episodes, settings["sampled_temperature"], r.ctx.pad_token_id)
        if r.main:
            res["eval/kl"] = kl
    if not r.main:
        return {}
    with open(r.out / EVALUATIONS, "a") as f:
        f.write(json.dumps(record) + "\n")
    res["time/eval"] = time.perf_counter() - t
    return res


def _checkpoint(r: BuiltRun, state: dict[str, Any], done: int) -> Checkpoint | None:
    """Rank 0 writes the checkpoint (`save_checkpoint`); in a sharded run every rank first writes
    its shards into a staging directory (`save_sharded`), which rank 0 moves into the checkpoint as
    ``sharded/`` before renaming it into place. Returns the checkpoint on rank 0, None elsewhere."""
    staging = policy_state = None
    if r.sharded:
        staging = r.out / "checkpoints" / f".sharded-{checkpoint_name(done)}.tmp"
        if r.main:
            for stale in staging.parent.glob(".sharded-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir(parents=True)
        r.dist.barrier()
        save_sharded(staging, r.algorithm.trainables())
        policy_state = None if _policy_copy_saves(r) else full_state_dict(r.policy)
        r.dist.barrier()
    ckpt = None
    if r.main:
        trainer_state = {**state, "rng": rng_state({"ctx": r.ctx.generator})}
        if r.sharded:
            # PPO's critic is in sharded/; its Hugging Face export is written to final/ only
            save_extra = lambda path: os.replace(staging, path / SHARDED_DIR)
        else:
            save_extra = getattr(r.algorithm, "save", None)
        ckpt = save_checkpoint(
            r.out / "checkpoints", done, keep=r.run.keep_checkpoints,
            save_policy=lambda path: _save_policy(r, path, policy_state),
            algorithm_state=r.algorithm.state_dict() if hasattr(r.algorithm, "state_dict") else {},
            trainer_state=trainer_state,
            save_extra=save_extra,
        )
    if r.sharded:
        r.dist.barrier()
    return ckpt


def _loop(r: BuiltRun, state: dict[str, Any]) -> None:
    """Iterations ``state["iteration"]`` .. min(--iterations, + --stop-after): each selects its
    prompts, runs the algorithm on this process's shard, combines the ranks' metrics, evaluates when
    due, logs a row, and checkpoints when due or asked to stop."""
    run, dist = r.run, r.dist
    wandb_run = _init_wandb(run, r.out, r.config_dump, r.algo_name, state["wandb_id"]) if r.main else None
    state["wandb_id"] = getattr(wandb_run, "id", None)
    r.wandb_run = wandb_run
    r.start = start = time.perf_counter() - state["elapsed"]
    totals = state["totals"]
    if state["before"] is None:
        state["before"] = state["last_eval"] = _evaluate(r, 0)
    if r.main:
        print(f"[langenv] {r.algo_name} on {run.task}: accuracy before training {state['before']['eval/accuracy']:.3f} "
              f"({len(r.eval_problems)} test problems x {run.eval_samples})")
    stop_at = min(run.iterations, state["iteration"] + run.stop_after) if run.stop_after else run.iterations
    with open(r.out / "metrics.jsonl" if r.main else os.devnull, "a") as metrics_file, StopRequests() as stop:
        def log(metrics: dict[str, Any]) -> None:
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            if wandb_run is not None:
                wandb_run.log(metrics, step=metrics["iteration"])

        if r.resume is None:
            log({"iteration": 0, **state["before"], **totals, "time/elapsed": time.perf_counter() - start})
        for it in tqdm(range(state["iteration"], stop_at), desc=f"{r.algo_name} iterations", unit="it",
                       initial=state["iteration"], total=run.iterations):
            problems, prompt_metrics = r.prompts.select(r.train_problems, r.algo_config.sampling.prompts_per_iteration, it)
            metrics = {**r.algorithm.iteration(dist.shard(problems), it), **prompt_metrics}
            if r.diagnostics is not None:
                metrics.update(r.diagnostics.pop_metrics())
            metrics = combine_ranks(dist, metrics)
            totals["total/optimizer_steps"] += metrics.get("update/optimizer_steps", 0.0)
            totals["total/tokens"] += sum(v for k, v in metrics.items() if k.startswith("tokens/"))
            done = it + 1
            if ((run.eval_every and done % run.eval_every == 0) or done == run.iterations) and (r.main or r.sharded):
                state["last_eval"] = _evaluate(r, done)  # {} off rank 0
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
                    f"finite update; see {r.out / 'metrics.jsonl'} (update/nonfinite_minibatches)")
            if stop.signum is not None or (run.save_every and done % run.save_every == 0) or done == stop_at:
                ckpt = _checkpoint(r, state, done)
            if stop.signum is not None:
                _interrupted(r, stop.signum, done, ckpt)


def _interrupted(r: BuiltRun, signum: int, done: int, ckpt: Checkpoint | None) -> None:
    """SIGTERM/SIGINT after iteration ``done``: say how to resume, close wandb, exit 128 + signum."""
    if r.main:
        print(f"[langenv] stopped by {signal.Signals(signum).name} after iteration {done}; checkpoint {ckpt.path}; "
              f"continue with --resume {r.out}", file=sys.stderr, flush=True)
        if r.wandb_run is not None:
            r.wandb_run.finish(exit_code=128 + signum)
    raise TrainingInterrupted(128 + signum)


# ------------------------------------------------------------------------------------------------
# 4. finish


def _finish(r: BuiltRun, state: dict[str, Any]) -> dict[str, Any]:
    """Save ``final/`` and ``summary.json`` (rank 0, when all iterations are done) and return the
    summary; a run stopped by --stop-after returns ``finished: False``."""
    run = r.run
    if r.sharded and state["iteration"] >= run.iterations:  # gathers are collectives: every rank takes part
        policy_state = None if _policy_copy_saves(r) else full_state_dict(r.policy)
        if r.main:
            _save_policy(r, r.out / "final", policy_state)
        if hasattr(r.algorithm, "save"):
            r.algorithm.save(r.out / "final")  # collective for a sharded critic; rank 0 writes
        r.dist.barrier()
    if not r.main:
        return {"out": str(r.out), "algorithm": r.algo_name, "iterations": state["iteration"], "rank": r.dist.rank}
    if state["iteration"] < run.iterations:
        if r.wandb_run is not None:
            r.wandb_run.finish()
        print(f"[langenv] stopped after iteration {state['iteration']} of {run.iterations} (--stop-after); "
              f"checkpoint in {r.out / 'checkpoints'}; continue with --resume {r.out}")
        return {"out": str(r.out), "algorithm": r.algo_name, "iterations": state["iteration"], "finished": False}
    if not r.sharded:
        _save(r.policy, r.tokenizer, r.out / "final")
        if hasattr(r.algorithm, "save"):
            r.algorithm.save(r.out / "final")
    if r.wandb_run is not None:
        r.wandb_run.finish()
    before, last_eval = state["before"], state["last_eval"]
    summary = {
        "out": str(r.out), "algorithm": r.algo_name, "task": run.task, "seed": run.seed,
        "iterations": state["iteration"], "wall_time_s": time.perf_counter() - r.start,
        "accuracy_before": before["eval/accuracy"], "accuracy_after": last_eval["eval/accuracy"],
        "accuracy_after_stderr": last_eval["eval/accuracy_stderr"], **state["totals"],
    }
    for key in ("eval/accuracy_sampled", "eval/accuracy_sampled_stderr", "eval/kl"):
        if key in last_eval:
            summary[key.replace("eval/", "after_")] = last_eval[key]
    (r.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[langenv] accuracy before {summary['accuracy_before']:.3f} -> after {summary['accuracy_after']:.3f} "
          f"(± {last_eval['eval/accuracy_stderr']:.3f}); {state['iteration']} iterations in {summary['wall_time_s']:.0f} s")
    print(f"[langenv] outputs: {r.out}/ (config.json, metrics.jsonl, summary.json, final/ model in Hugging Face "
          f"format, checkpoints/)")
    return summary


def _policy_copy_saves(r: BuiltRun) -> bool:
    """Whether the sampler's unsharded copy can be written as the policy: it exists and holds the
    policy's dtype (with ``--fsdp-bf16`` it is bf16 while the master weights are fp32)."""
    return r.full_policy is not None and r.full_policy.dtype == r.policy.dtype


def _save_policy(r: BuiltRun, path: Path, state_dict: dict | None) -> None:
    """Write the policy in Hugging Face format (rank 0): the model itself, or in a sharded run the
    sampler's unsharded copy (equal to the policy after every update, `_policy_copy_saves`) or else
    the gathered ``state_dict``."""
    if not r.sharded:
        _save(r.policy, r.tokenizer, path)
    elif _policy_copy_saves(r):
        _save(r.full_policy, r.tokenizer, path)
    else:
        _save(r.policy, r.tokenizer, path, state_dict=state_dict)


def _save(model, tokenizer, path: Path, state_dict: dict | None = None) -> None:
    """Save in Hugging Face format through a temporary directory renamed into place (``state_dict``:
    the full weights to write instead of the model's own, e.g. those of a sharded model)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _init_wandb(run: RunConfig, out: Path, config: dict, algo_name: str, run_id: str | None = None):
    """The wandb run (None when disabled); a resumed run continues the wandb run ``run_id``."""
    if run.wandb == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project="langenv", name=out.name, dir=str(out), mode=run.wandb, config=config,
                      group=f"{algo_name}-{run.task}", id=run_id, resume="allow" if run_id else None)
