"""Backfill ``evaluations.jsonl`` (per-problem results) for runs made before the loop wrote it.

    python experiments/backfill_evaluations.py RUN_DIR [RUN_DIR ...]
    python experiments/backfill_evaluations.py RUN_DIR --iterations 0 50

For each evaluation logged in ``metrics.jsonl`` that has no record yet and whose model is still on
disk (iteration 0: the run's starting model; a checkpoint ``checkpoints/iter-NNNNNN/policy``; the
last iteration: ``final/``), the evaluation is made again exactly as the training loop made it: the
same code (`algos.training.evaluation.run_evaluation`), problems, sampler, sampler seeds
(`algos.training.context.derived_seed`) and thread count. A record is written only if the
accuracies it gives equal the logged ones exactly (greedy and sampled); otherwise the iteration is
reported as not reproduced and nothing is written for it, so a backfilled record always belongs to
the numbers in ``metrics.jsonl``. The KL to the reference is not recomputed (the record does not
hold it). Records are merged by iteration and the file is replaced atomically.

Exit status: 0 when every requested evaluation was backfilled or already had a record, 1 when one
could not be reproduced or its model is gone, 2 on bad input (a named file is missing or malformed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc})") from exc
    return rows


def model_dir(run_dir: Path, iteration: int, last: int) -> Path | None:
    """Where the policy evaluated at ``iteration`` is stored (None: iteration 0, the starting model)."""
    if iteration == 0:
        return None
    ckpt = run_dir / "checkpoints" / f"iter-{iteration:06d}" / "policy"
    if ckpt.is_dir():
        return ckpt
    if iteration == last and (run_dir / "final").is_dir():
        return run_dir / "final"
    raise FileNotFoundError(f"{run_dir}: no model for iteration {iteration} (neither {ckpt} nor final/ of the "
                            f"last iteration {last})")


def backfill(run_dir: Path, iterations: list[int] | None = None) -> dict[int, str]:
    """Backfill the records of ``run_dir``; returns {iteration: "written" | "present" | why not}.

    Raises:
        FileNotFoundError / ValueError: ``config.json`` or ``metrics.jsonl`` missing or malformed.
    """
    import torch

    from algos.config import SamplingConfig
    from algos.models.policy import load_policy
    from algos.models.warm_start import load_model
    from algos.samplers import make_sampler
    from algos.training.config import RunConfig
    from algos.training.context import derived_seed
    from algos.training.evaluation import evaluation_settings, run_evaluation, eval_environment
    from algos.training.run_control import EVALUATIONS
    from langenv.tasks.base import make_task

    for name in ("config.json", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} not found: not a run directory")
    config = json.loads((run_dir / "config.json").read_text())
    try:
        run = RunConfig.from_dump(config["run"], source=f"{run_dir / 'config.json'}: run")
        sampling = SamplingConfig(**config["algo"]["sampling"])
    except KeyError as exc:
        raise ValueError(f"{run_dir / 'config.json'}: no {exc} field") from exc
    except TypeError as exc:
        raise ValueError(f"{run_dir / 'config.json'}: {exc}") from exc
    if run.sharding != "none":
        raise ValueError(f"{run_dir}: a sharded run; its evaluations are not backfilled here")
    logged = {r["iteration"]: r for r in _read_jsonl(run_dir / "metrics.jsonl") if "eval/accuracy" in r}
    path = run_dir / EVALUATIONS
    records = {r["iteration"]: r for r in _read_jsonl(path)} if path.is_file() else {}
    wanted = sorted(logged) if iterations is None else iterations
    status: dict[int, str] = {}
    todo = []
    for it in wanted:
        if it not in logged:
            status[it] = f"no evaluation logged at iteration {it}"
        elif it in records:
            status[it] = "present"
        else:
            todo.append(it)
    if not todo:
        return status

    task = make_task(run.task)
    threads = run.torch_threads()  # the loop's thread count: the sampler's arithmetic must match it exactly
    if threads:
        torch.set_num_threads(threads)
    policy, tokenizer = load_model(run.model, task, run.cache_dir, run.device, gguf_file=run.gguf_file,
                                   chat_template=run.chat_template)
    start_state = {k: v.clone() for k, v in policy.state_dict().items()}
    context = getattr(policy.config, "max_position_embeddings", None)
    env, problems = eval_environment(task, tokenizer, run, sampling.max_new_tokens, context)
    sampler = make_sampler(run.sampler, policy, tokenizer, max_batch_size=run.sampler_batch_size,
                           max_context=context, workdir=run_dir / "vllm")
    settings = evaluation_settings(run, sampling)
    last = max(logged)
    for it in todo:
        try:
            where = model_dir(run_dir, it, last)
        except FileNotFoundError as exc:
            status[it] = str(exc)
            continue
        state = start_state if where is None else load_policy(str(where), dtype=policy.dtype)[0].state_dict()
        policy.load_state_dict(state)
        sampler.update_weights(policy)
        t = time.perf_counter()
        metrics, _, record = run_evaluation(env, sampler, problems, it,
                                            lambda purpose: derived_seed(run.seed, it, purpose), **settings)
        keys = [k for k in ("eval/accuracy", "eval/accuracy_sampled") if k in logged[it]]
        differ = [f"{k} {metrics.get(k)} != logged {logged[it][k]}" for k in keys if metrics.get(k) != logged[it][k]]
        if differ:
            status[it] = "not reproduced: " + "; ".join(differ)
        else:
            records[it] = record
            status[it] = "written"
        print(f"[backfill] {run_dir.name} iteration {it}: {status[it]} ({time.perf_counter() - t:.0f} s)", flush=True)
    if any(s == "written" for s in status.values()):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(records[k]) + "\n" for k in sorted(records)))
        os.replace(tmp, path)
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (with config.json and metrics.jsonl)")
    p.add_argument("--iterations", nargs="+", type=int, help="only these evaluations (default: every logged one)")
    args = p.parse_args(argv)
    code = 0
    for run_dir in args.runs:
        try:
            status = backfill(run_dir, args.iterations)
        except (FileNotFoundError, ValueError) as exc:
            print(f"[backfill] error: {exc}", file=sys.stderr)
            return 2
        for it, s in sorted(status.items()):
            print(f"[backfill] {run_dir}: iteration {it}: {s}")
            if s not in ("written", "present"):
                code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
