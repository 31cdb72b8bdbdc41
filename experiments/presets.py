"""Named settings: the CPU defaults of the offline tiny model and the VinePPO paper's runs.

Paper settings come from McGill-NLP/VinePPO configs ``polIter_{rho1bSft2,deepseekSft2}_vineppo_{GSM8K,MATH}``
(see shared reference notes): 64 prompts x 8 samples, K = 9, T = 0.6, top_p 0.9, 1024 new tokens,
2 epochs of mini-batch 64, lr 1e-6, 3% warm-up, β = 1e-4, 650 (GSM8K) / 1000 (MATH) iterations,
evaluation with 16 samples at T = 0.35.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from algos.trainer import RunConfig
from algos.vineppo import VinePPOConfig


@dataclass
class VinePPOCommand:
    """Train with VinePPO (Monte-Carlo value estimates from restored prefix states)."""

    run: RunConfig = field(default_factory=RunConfig)
    algo: VinePPOConfig = field(default_factory=VinePPOConfig.cpu_tiny)


PAPER_MODELS = {
    ("rho1b", "gsm8k"): "realtreetune/rho-1b-sft-GSM8K",
    ("rho1b", "math"): "realtreetune/rho-1b-sft-MATH",
    ("deepseek7b", "gsm8k"): "realtreetune/deepseekmath-7b-sft-GSM8K",
    ("deepseek7b", "math"): "realtreetune/deepseekmath-7b-sft-MATH-v2",
}


def paper_vineppo(model: str, task: str) -> VinePPOCommand:
    """The paper's VinePPO run for a model ("rho1b", "deepseek7b") and task ("gsm8k", "math")."""
    run = replace(
        RunConfig(), task=task, model=PAPER_MODELS[(model, task)], iterations=650 if task == "gsm8k" else 1000,
        eval_every=10, eval_problems=0, eval_samples=16, eval_temperature=0.35, save_every=10, device="cuda",
        sampler_batch_size=512,
    )
    algo = VinePPOConfig(max_step_for_value_estimation=25 if task == "gsm8k" else None)
    return VinePPOCommand(run=run, algo=algo)
