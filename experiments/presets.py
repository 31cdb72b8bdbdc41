"""The algorithm registry of the command line, with named settings: the CPU defaults of the
offline tiny model and the VinePPO paper's runs.

Paper settings come from McGill-NLP/VinePPO configs ``polIter_{rho1bSft2,deepseekSft2}_vineppo_{GSM8K,MATH}``
(see shared reference notes): 64 prompts x 8 samples, K = 9, T = 0.6, top_p 0.9, 1024 new tokens,
2 epochs of mini-batch 64, lr 1e-6, 3% warm-up, β = 1e-4, 650 (GSM8K) / 1000 (MATH) iterations,
evaluation with 16 samples at T = 0.35.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from algos.config import with_fields
from algos.dpo_plus import DPOPlus, DPOPlusConfig
from algos.grpo import GRPO, GRPOConfig
from algos.ppo import PPO, PPOConfig
from algos.reinforce import REINFORCE, REINFORCEConfig
from algos.restem import RestEM, RestEMConfig
from algos.rloo import RLOO, RLOOConfig
from algos.sft_control import SFTControl, SFTControlConfig
from algos.training.config import RunConfig
from algos.vineppo import VinePPO, VinePPOConfig


@dataclass(frozen=True)
class AlgorithmEntry:
    """One algorithm of the command line: its name (``algo:<name>``), config and class, and
    optionally its own CLI defaults (``defaults()``, a ``config`` instance; else
    ``config.cpu_tiny()``), so an entry can reuse another algorithm's Config with other settings."""

    name: str
    config: type
    build: Callable[..., Any]
    description: str
    defaults: Callable[[], Any] | None = None


def vc_ppo_cpu_tiny() -> PPOConfig:
    """VC-PPO (Yuan et al. 2025, arXiv 2503.01491) on the CPU tiny setting: PPO's `PPOConfig.cpu_tiny`
    with decoupled GAE (λ_actor 0.95, λ_critic 1.0, §4.2) and value pretraining (§4.1) for at most
    32 critic steps (8 rounds of 8 x 4 samples at 4 steps each: about the sampling and critic cost of
    8 PPO iterations, paid once per policy since the result is cached), stopping early on a plateau
    of the held-out loss or at explained variance 0.9. The learning rate, 1e-4 (10x the critic's, so a
    freshly drawn head can move in 32 steps), is a choice not yet tuned on the tiny model; the paper's
    own pretraining budget was not recovered (shared/reference/algorithms.md §11.7)."""
    return with_fields(PPOConfig.cpu_tiny(), lam=0.95, lam_critic=1.0, value_pretrain_steps=32,
                       value_pretrain_learning_rate=1e-4)


#: Every algorithm, in the order the CLI and compare.py list them.
ALGORITHMS: dict[str, AlgorithmEntry] = {e.name: e for e in (
    AlgorithmEntry("vineppo", VinePPOConfig, VinePPO, "VinePPO: PPO with Monte-Carlo values from restored prefix states"),
    AlgorithmEntry("ppo", PPOConfig, PPO, "PPO with a value network initialised from the policy, GAE"),
    AlgorithmEntry("vc-ppo", PPOConfig, PPO, "VC-PPO: PPO with value pretraining and decoupled GAE (λ_actor 0.95, "
                   "λ_critic 1)", defaults=vc_ppo_cpu_tiny),
    AlgorithmEntry("grpo", GRPOConfig, GRPO, "GRPO: group-normalised advantages, k3 KL in the loss (also DAPO / Dr. GRPO losses)"),
    AlgorithmEntry("rloo", RLOOConfig, RLOO, "RLOO: REINFORCE with a leave-one-out baseline"),
    AlgorithmEntry("dpo-plus", DPOPlusConfig, DPOPlus, "DPO-Positive on correct/incorrect pairs sampled from the SFT policy"),
    AlgorithmEntry("restem", RestEMConfig, RestEM, "ReST-EM: fine-tune the base model on its own correct samples"),
    AlgorithmEntry("sft", SFTControlConfig, SFTControl, "Control: spend the budget on more SFT on reference solutions"),
    AlgorithmEntry("reinforce", REINFORCEConfig, REINFORCE, "REINFORCE with a moving-average baseline (the example of adding an algorithm)"),
)}


def _command(entry: AlgorithmEntry) -> type:
    """A tyro-friendly dataclass ``(run: RunConfig, algo: <Config>)`` for one algorithm."""
    name = entry.config.__name__.removesuffix("Config") if entry.defaults is None else \
        entry.name.title().replace("-", "")
    cls = dataclasses.make_dataclass(
        f"{name}Command",
        [("run", RunConfig, field(default_factory=RunConfig)),
         ("algo", entry.config, field(default_factory=entry.defaults or entry.config.cpu_tiny))],
    )
    cls.__doc__ = entry.description
    cls.entry = entry
    return cls


#: One command dataclass per algorithm, keyed by name.
COMMANDS: dict[str, type] = {name: _command(e) for name, e in ALGORITHMS.items()}
VinePPOCommand = COMMANDS["vineppo"]

PAPER_MODELS = {
    ("rho1b", "gsm8k"): "realtreetune/rho-1b-sft-GSM8K",
    ("rho1b", "math"): "realtreetune/rho-1b-sft-MATH",
    ("deepseek7b", "gsm8k"): "realtreetune/deepseekmath-7b-sft-GSM8K",
    ("deepseek7b", "math"): "realtreetune/deepseekmath-7b-sft-MATH-v2",
}


def paper_vineppo(model: str, task: str):
    """The paper's VinePPO run for a model ("rho1b", "deepseek7b") and task ("gsm8k", "math").

    Raises:
        ValueError: an unknown model or task; the message lists the valid pairs.
    """
    if (model, task) not in PAPER_MODELS:
        valid = ", ".join(f"({m!r}, {t!r})" for m, t in PAPER_MODELS)
        raise ValueError(f"paper_vineppo: unknown (model, task) {(model, task)!r}; valid: {valid}")
    run = replace(
        RunConfig(), task=task, model=PAPER_MODELS[(model, task)], iterations=650 if task == "gsm8k" else 1000,
        eval_every=10, eval_problems=0, eval_samples=16, eval_temperature=0.35, save_every=10, device="cuda",
        sampler_batch_size=512,
    )
    algo = VinePPOConfig(max_step_for_value_estimation=25 if task == "gsm8k" else None)
    return VinePPOCommand(run=run, algo=algo)
