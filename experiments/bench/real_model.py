"""SmolLM2-135M-Instruct (or any ``--model``) on this machine: load/convert time, sampling throughput of the
prefix-sharing and HF samplers, and greedy accuracy on GSM8K and arithmetic, prompts through the chat
template. Writes one JSON object to ``--out`` (and stdout); BENCHMARKS.md "Real model: SmolLM2-135M".

    flock /tmp/langenv-cpu.lock python experiments/bench/real_model.py --problems 50 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from algos.models.warm_start import load_model  # noqa: E402
from algos.rollout import collect_episodes  # noqa: E402
from algos.samplers import SamplingParams, make_sampler  # noqa: E402
from langenv import LanguageEnv, grading  # noqa: E402
from langenv.tasks.base import make_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--problems", type=int, default=50, help="greedy accuracy on the first N test problems per task")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--throughput-prompts", type=int, default=4)
    ap.add_argument("--throughput-samples", type=int, default=4)
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("LANGENV_CACHE", Path.home() / ".cache" / "langenv")))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result: dict = {"model": args.model, "threads": torch.get_num_threads()}

    start = time.perf_counter()
    policy, tok = load_model(args.model, make_task("gsm8k"), args.cache_dir)
    result["load_s"] = round(time.perf_counter() - start, 1)
    marker = next(args.cache_dir.glob("gguf-*/converted.json"), None)
    if marker is not None:
        result["convert_s_first_time"] = json.loads(marker.read_text()).get("convert_seconds")

    for task_name in ("arithmetic", "gsm8k"):
        env = LanguageEnv(task_name, tok, split="test", max_new_tokens=args.max_new_tokens,
                          max_context=policy.config.max_position_embeddings)
        problems = list(env.problems[: args.problems])
        # throughput: T 0.6 / top-p 0.9, n samples per prompt, both samplers, the same prompts and seed
        params = SamplingParams(0.6, 0.9, args.max_new_tokens, env.task.stop_strings, args.throughput_samples)
        for kind in ("fast", "hf"):
            sampler = make_sampler(kind, policy, tok, max_batch_size=64,
                                   max_context=policy.config.max_position_embeddings, workdir=Path("/tmp"))
            t0 = time.perf_counter()
            episodes = collect_episodes(env, sampler, problems[: args.throughput_prompts], params, seed=0)
            seconds = time.perf_counter() - t0
            tokens = sum(len(e.response_ids) for e in episodes)
            result[f"{task_name}/{kind}_tokens_per_s"] = round(tokens / seconds, 1)
            result[f"{task_name}/{kind}_tokens"] = tokens
        sampler = make_sampler("fast", policy, tok, max_batch_size=64,
                               max_context=policy.config.max_position_embeddings, workdir=Path("/tmp"))
        t0 = time.perf_counter()
        episodes = collect_episodes(env, sampler, problems, SamplingParams(0.0, 1.0, args.max_new_tokens,
                                                                            env.task.stop_strings, 1), seed=0)
        result[f"{task_name}/greedy_accuracy"] = sum(e.reward for e in episodes) / len(episodes)
        # diagnostic: the lenient GSM8K rules (last number / "answer is" / boxed) instead of the task's
        # strict "#### N" rule; an instruct model asked zero-shot rarely writes "####"
        lenient = [grading.grade(e.text, p.answer, "gsm8k").status == "correct" for e, p in zip(episodes, problems)]
        result[f"{task_name}/greedy_accuracy_lenient"] = sum(lenient) / len(lenient)
        result[f"{task_name}/greedy_has_hashes"] = sum("####" in e.text for e in episodes) / len(episodes)
        result[f"{task_name}/greedy_truncated"] = sum(e.state.truncated for e in episodes) / len(episodes)
        result[f"{task_name}/greedy_s"] = round(time.perf_counter() - t0, 1)
        result[f"{task_name}/problems"] = len(problems)
        result[f"{task_name}/example"] = episodes[0].text[:400]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
