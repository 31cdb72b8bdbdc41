"""Value accuracy of VinePPO's Monte-Carlo estimates vs PPO's critic vs a constant baseline
(Kazemnejad et al. 2024, arXiv 2410.01679 §6; /work/shared/reference/vineppo_reference.md §8.3).

    python experiments/analysis/value_accuracy.py                                   # SFT warm start, arithmetic
    python experiments/analysis/value_accuracy.py --policy PATH/final --value-model trained=PATH/final/value_model

What it does, for one policy on the arithmetic task (``--task``):

1. **States.** ``--samples`` trajectories per problem for the first ``--problems`` train problems
   (the overfit runs train on the first 32, so the trained critic has seen these prompts), sampled at
   ``--temperature`` / top-p 0.9. The first trajectory of each problem is split into reasoning steps
   exactly as VinePPO does (`algos.rollout.step_layout`), and every step-boundary prefix
   (``EnvState.prefix``; step position 0 is the prompt) is a state s.
2. **Ground truth** V(s): the mean reward of ``--gt-samples`` (256) continuations of s at
   ``--temperature`` (1.0) / top-p 0.9, through the prefix-sharing sampler and the env's grader
   (`algos.rollout.mc_values`). Its own sampling error sqrt(V(1−V)/N) is reported (``gt_se``).
3. **Estimators** of V(s):
   * ``mc_k{K}``: VinePPO's estimator, `mc_values` with ``n = K`` (``--ks``, default 1 3 9), a fresh seed,
     the same sampling parameters: the code path of `algos.vineppo.VinePPO.estimate_values`;
   * ``critic_init``: PPO's critic at initialisation, `algos.critic.ValueModel.from_policy` (a copy of
     the policy's backbone and a new N(0, 1/√(H+1)) head, as `algos.ppo.PPO` builds it; head drawn with
     ``--seed``); ``critic_<name>``: each ``--value-model name=DIR`` (`ValueModel.from_pretrained`).
     V(s) is the head's output at the last token of s (the alignment of `ValueModel.response_values`);
   * ``group_mean``: the mean reward of the problem's ``--samples`` trajectories (GRPO's baseline; the
     same number for every state of the problem; it includes the trajectory the states come from);
   * ``ground_truth``: the ground truth itself (a check: MAE 0, correlation 1).
   Per estimator: MAE, bias (mean of estimate − truth), Pearson correlation, overall and by step position.
4. **Ranking test** (the paper's ``valnet_action_ranking``: 5 alternative actions): for ``--rank-states``
   states drawn at random (seeded) from the states above, sample 5 continuations at ``--temperature``, cut each
   after its first reasoning step (the first `step_layout` boundary past the state in the continued
   response): 5 next states s'. A continuation that finishes within that step makes a terminal s', whose
   value is its graded reward for every estimator (V̂ of a terminal state is its reward in VinePPO;
   PPO's GAE adds r and bootstraps 0). Other s' get a ground truth from ``--rank-gt-samples``
   continuations and each estimator's value. **Top-1 agreement**: an estimator picks its argmax; the
   pick is right when its ground-truth value equals the best ground-truth value of the 5 (so tied bests
   all count). **Ties**: when the estimator's maximum is shared by several s', the score is the share of
   them that are right (the expected score of picking uniformly among its tied maxima). ``random`` is
   the same rule with every s' tied: (number of ground-truth-best s') / 5, which is ≥ 20% whenever the
   ground truth ties (identical next steps, or several with V = 1).

Writes to ``--out`` (default ``experiments/bench/results/value-accuracy/<policy-name>/``):
``summary.json`` (settings, timings, per-estimator metrics, by-position metrics, ranking, the group rewards
and every state's estimates in ``per_state``), ``table.md``,
``scatter_<estimator>.png`` (predicted vs ground truth) and ``error_by_position.png`` (MAE per step position).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from algos.critic import ValueModel  # noqa: E402
from algos.models.policy import load_policy  # noqa: E402
from algos.rollout import Episode, collect_episodes, continue_states, mc_values, step_layout  # noqa: E402
from algos.samplers.base import SamplingParams  # noqa: E402
from algos.samplers.prefix_sharing import PrefixSharingSampler  # noqa: E402
from langenv.env import LanguageEnv  # noqa: E402
from langenv.state import EnvState  # noqa: E402
from langenv.tasks import make_task  # noqa: E402

RESULTS = REPO / "experiments" / "bench" / "results" / "value-accuracy"
#: The paper's figures to set beside ours (§6; DeepSeekMath 7B for the MAE; shared/reference §8.3).
PAPER = {"critic_mae": 0.11, "mc_mae": 0.03, "ppo_ranking": "near random (20%) for most of training",
         "mc_ranking": "70-90%"}
N_ALTERNATIVES = 5


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation, or None when undefined (fewer than 2 points or a constant side)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def error_metrics(pred: Sequence[float], truth: Sequence[float]) -> dict:
    """MAE, bias (mean of pred − truth), RMSE and Pearson correlation of aligned lists (values in [0, 1])."""
    err = np.asarray(pred, dtype=float) - np.asarray(truth, dtype=float)
    return {"n": int(len(err)), "mae": float(np.abs(err).mean()), "bias": float(err.mean()),
            "rmse": float(np.sqrt((err ** 2).mean())), "corr": pearson(pred, truth)}


def top1_score(estimates: Sequence[float], truth: Sequence[float], tol: float = 1e-9) -> float:
    """Top-1 agreement with ties (see the module docstring): the share of the estimator's tied maxima
    whose ground truth is the best ground truth. Returns a number in [0, 1]."""
    est, gt = np.asarray(estimates, dtype=float), np.asarray(truth, dtype=float)
    picks = np.flatnonzero(est >= est.max() - tol)
    return float((gt[picks] >= gt.max() - tol).mean())


@torch.no_grad()
def critic_values(critic: ValueModel, states: Sequence[EnvState], batch_size: int = 64) -> list[float]:
    """V(s) of each state: the critic's output at the state's last token, (len(states),) floats.
    Rows are right-padded; the critic's positions follow the attention mask."""
    critic.eval()
    out: list[float] = []
    for i in range(0, len(states), batch_size):
        rows = [list(s.token_ids) for s in states[i:i + batch_size]]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        values = critic(ids, mask)
        lengths = torch.tensor([len(r) for r in rows]) - 1
        out += values[torch.arange(len(rows)), lengths].tolist()
    return out


def next_step_states(env, sampler, tok, task, states: Sequence[EnvState], params: SamplingParams,
                     seed: int) -> list[list[tuple[EnvState, float | None]]]:
    """For each state, ``params.n`` sampled next states: the continued response cut at its first step
    boundary past the state. Each is ``(s', None)``, or ``(final state, reward)`` when the continuation
    ended within that step (terminal s')."""
    results = continue_states(env, sampler, states, params, seed=seed)
    out = []
    for s, rs in zip(states, results):
        b, row = len(s.response_ids), []
        for r in rs:
            layout = step_layout(Episode(r.state, r.reward, r.status, r.text), tok, task.split_steps)
            later = [x for x in layout.boundaries if x > b]
            row.append((r.state.prefix(later[0]), None) if later else (r.state, float(r.reward)))
        out.append(row)
    return out


def plot(summary: dict, points: dict[str, list[float]], truth: list[float], positions: list[int], out: Path) -> list[str]:
    """Scatter of predicted vs ground truth per estimator and MAE by step position; returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    rng = np.random.default_rng(0)
    for name, pred in points.items():
        fig, ax = plt.subplots(figsize=(4.8, 4))
        jitter = rng.uniform(-0.01, 0.01, len(truth))
        dots = ax.scatter(np.asarray(truth) + jitter, pred, s=10, alpha=0.6, c=positions, cmap="viridis")
        fig.colorbar(dots, ax=ax, label="step position")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        m = summary["estimators"][name]
        corr = "n/a" if m["corr"] is None else f"{m['corr']:.2f}"
        ax.set(xlabel=f"ground truth V (MC, N={summary['settings']['gt_samples']})", ylabel=f"{name} V",
               )
        ax.set_title(f"{name}: MAE {m['mae']:.3f}, corr {corr}", fontsize=9)
        ax.set_xlim(-0.05, 1.05)
        fig.tight_layout()
        fname = f"scatter_{name}.png"
        fig.savefig(out / fname, dpi=90)
        plt.close(fig)
        files.append(fname)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in points:
        by = summary["by_position"][name]
        xs = sorted(int(k) for k in by)
        ax.plot(xs, [by[str(x)]["mae"] for x in xs], marker="o", label=name)
    ax.set(xlabel="step position (0 = prompt)", ylabel="MAE vs ground truth", title="Value error by step position")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "error_by_position.png", dpi=90)
    plt.close(fig)
    return files + ["error_by_position.png"]


def pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.0%}"


def table(summary: dict) -> str:
    """The markdown table: one row per estimator, with the ranking column and the paper's figures."""
    rank, dec = summary["ranking"]["top1"], summary["ranking"]["top1_decisive"]
    lines = ["| estimator | MAE | bias | corr | RMSE | ranking top-1 (all states) | top-1 (decisive states) |",
             "|---|---|---|---|---|---|---|"]
    for name, m in summary["estimators"].items():
        corr = "n/a" if m["corr"] is None else f"{m['corr']:.3f}"
        lines.append(f"| {name} | {m['mae']:.3f} | {m['bias']:+.3f} | {corr} | {m['rmse']:.3f} | "
                     f"{pct(rank.get(name))} | {pct(dec.get(name))} |")
    lines.append(f"| random pick | | | | | {pct(rank['random'])} | {pct(dec['random'])} |")
    lines.append(f"| *paper (DeepSeekMath 7B)* | *critic {PAPER['critic_mae']}, MC {PAPER['mc_mae']}* | | | | "
                 f"*PPO {PAPER['ppo_ranking']}; MC {PAPER['mc_ranking']}* | |")
    r = summary["ranking"]
    lines.append(f"\n{summary['states']} states (mean ground truth V {summary['gt_mean']:.3f}, its sampling error "
                 f"{summary['gt_se']:.3f}); ranking: {r['states']} states x {r['alternatives']} next steps, "
                 f"{r['decisive_states']} decisive (not every alternative ground-truth-best).")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task = make_task(args.task)
    policy_path = args.policy
    if policy_path is None:
        from algos.models.warm_start import warm_start_tiny

        policy_path = warm_start_tiny(task, args.cache_dir)
    policy, tok = load_policy(str(policy_path), dtype=torch.float32)
    context = getattr(policy.config, "max_position_embeddings", None)
    env = LanguageEnv(task, tok, split="train", max_new_tokens=args.max_new_tokens, max_context=context)
    sampler = PrefixSharingSampler(policy, tok, max_batch_size=args.batch_size, max_context=context)
    problems = env.problems[: args.problems]
    if len(problems) < args.problems:
        raise ValueError(f"--problems {args.problems}: the {args.task} train split has only {len(problems)}")

    def params(n: int) -> SamplingParams:
        return SamplingParams(args.temperature, args.top_p, args.max_new_tokens, task.stop_strings, n)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    episodes = collect_episodes(env, sampler, problems, params(args.samples), seed=args.seed)
    group_mean = {p.id: float(np.mean([e.reward for e in episodes[i * args.samples:(i + 1) * args.samples]]))
                  for i, p in enumerate(problems)}
    states, positions, problem_of = [], [], []
    seen: set = set()
    for i in range(len(problems)):
        e = episodes[i * args.samples]
        for pos, b in enumerate(step_layout(e, tok, task.split_steps).boundaries):
            s = e.state.prefix(b)
            if s.token_ids in seen:
                continue
            seen.add(s.token_ids)
            states.append(s)
            positions.append(pos)
            problem_of.append(e.state.problem.id)
    timings["trajectories_s"] = time.perf_counter() - t0
    print(f"{len(episodes)} trajectories (mean reward {np.mean([e.reward for e in episodes]):.3f}), "
          f"{len(states)} step-boundary states, positions 0-{max(positions)}", flush=True)

    t0 = time.perf_counter()
    gt_of, gt_tokens = mc_values(env, sampler, states, params(args.gt_samples), seed=args.seed + 1)
    truth = [gt_of[s.token_ids] for s in states]
    timings["ground_truth_s"] = time.perf_counter() - t0
    print(f"ground truth: {args.gt_samples} continuations x {len(states)} states, {gt_tokens} tokens, "
          f"{timings['ground_truth_s']:.0f} s ({gt_tokens / max(timings['ground_truth_s'], 1e-9):.0f} tokens/s)", flush=True)

    estimates: dict[str, list[float]] = {"ground_truth": list(truth)}
    mc_tokens = 0
    t0 = time.perf_counter()
    for k in args.ks:
        v, tokens = mc_values(env, sampler, states, params(k), seed=args.seed + 100 + k)
        estimates[f"mc_k{k}"] = [v[s.token_ids] for s in states]
        mc_tokens += tokens
    timings["mc_k_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    critics = {"critic_init": ValueModel.from_policy(policy, generator=torch.Generator().manual_seed(args.seed))}
    for spec in args.value_model:
        name, _, path = spec.rpartition("=")
        critics[f"critic_{name or 'trained'}"] = ValueModel.from_pretrained(path, dtype=torch.float32)
    for name, critic in critics.items():
        estimates[name] = critic_values(critic, states)
    estimates["group_mean"] = [group_mean[p] for p in problem_of]
    timings["critics_s"] = time.perf_counter() - t0

    metrics = {name: error_metrics(pred, truth) for name, pred in estimates.items()}
    by_position: dict[str, dict[str, dict]] = {}
    for name, pred in estimates.items():
        by_position[name] = {}
        for pos in sorted(set(positions)):
            idx = [i for i, p in enumerate(positions) if p == pos]
            by_position[name][str(pos)] = error_metrics([pred[i] for i in idx], [truth[i] for i in idx])
    t = np.asarray(truth)
    gt_se = float(np.sqrt(t * (1 - t) / args.gt_samples).mean())

    # ---- ranking test
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    live = list(range(len(states)))
    chosen = sorted(rng.choice(live, size=min(args.rank_states, len(live)), replace=False).tolist())
    roots = [states[i] for i in chosen]
    alternatives = next_step_states(env, sampler, tok, task, roots, params(N_ALTERNATIVES), seed=args.seed + 2)
    pending: dict[tuple[int, ...], EnvState] = {}
    for row in alternatives:
        for s, r in row:
            if r is None:
                pending.setdefault(s.token_ids, s)
    nexts = list(pending.values())
    rank_gt, _ = mc_values(env, sampler, nexts, params(args.rank_gt_samples), seed=args.seed + 3)
    rank_est: dict[str, dict] = {}
    for k in args.ks:
        rank_est[f"mc_k{k}"], _ = mc_values(env, sampler, nexts, params(k), seed=args.seed + 200 + k)
    for name, critic in critics.items():
        rank_est[name] = dict(zip([s.token_ids for s in nexts], critic_values(critic, nexts)))
    rank_est["ground_truth"] = rank_gt
    scores: dict[str, list[float]] = {name: [] for name in [*rank_est, "group_mean", "random"]}
    decisive: list[bool] = []  # some alternative is strictly worse than the best (else every pick is right)
    n_terminal = n_distinct = 0
    for row, i in zip(alternatives, chosen):
        gt_row = [r if r is not None else rank_gt[s.token_ids] for s, r in row]
        n_terminal += sum(r is not None for _, r in row)
        n_distinct += len({s.token_ids for s, _ in row})
        for name, est in rank_est.items():
            scores[name].append(top1_score([r if r is not None else est[s.token_ids] for s, r in row], gt_row))
        scores["group_mean"].append(top1_score([group_mean[problem_of[i]]] * len(row), gt_row))
        scores["random"].append(top1_score([0.0] * len(row), gt_row))
        decisive.append(scores["random"][-1] < 1.0)
    timings["ranking_s"] = time.perf_counter() - t0
    ranking = {"states": len(chosen), "alternatives": N_ALTERNATIVES, "gt_samples": args.rank_gt_samples,
               "next_states_scored": len(nexts), "terminal_alternatives": n_terminal,
               "distinct_alternatives_per_state": n_distinct / max(len(chosen), 1),
               "top1": {name: float(np.mean(v)) for name, v in scores.items()},
               "decisive_states": int(sum(decisive)),
               "top1_decisive": {name: (float(np.mean([x for x, d in zip(v, decisive) if d])) if any(decisive)
                                        else None) for name, v in scores.items()},
               "ties": "a pick is right if its ground truth equals the best of the 5; an estimator's tied maxima "
                       "score the share of them that are right; random = (ground-truth-best count) / 5"}
    timings["total_s"] = time.perf_counter() - t_start

    summary = {
        "settings": {"task": args.task, "policy": str(policy_path), "value_models": list(args.value_model),
                     "problems": args.problems, "samples": args.samples, "gt_samples": args.gt_samples,
                     "ks": list(args.ks), "temperature": args.temperature, "top_p": args.top_p,
                     "max_new_tokens": args.max_new_tokens, "rank_states": args.rank_states,
                     "rank_gt_samples": args.rank_gt_samples, "seed": args.seed, "threads": args.threads},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        "states": len(states), "trajectory_reward": float(np.mean([e.reward for e in episodes])),
        "gt_mean": float(t.mean()), "gt_se": gt_se, "gt_tokens": int(gt_tokens), "mc_tokens": int(mc_tokens),
        "positions": {str(p): positions.count(p) for p in sorted(set(positions))},
        "estimators": metrics, "by_position": by_position, "ranking": ranking, "timings": timings, "paper": PAPER,
        "group_rewards": {p.id: [e.reward for e in episodes[i * args.samples:(i + 1) * args.samples]]
                          for i, p in enumerate(problems)},
        "per_state": [{"problem": problem_of[i], "position": positions[i], "prefix_tokens": len(s.token_ids),
                       **{name: est[i] for name, est in estimates.items()}} for i, s in enumerate(states)],
    }
    out = Path(args.out) if args.out else RESULTS / Path(str(policy_path).rstrip("/")).name
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table(summary))
    if not args.no_plots:
        summary["plots"] = plot(summary, {k: v for k, v in estimates.items() if k != "ground_truth"}, truth,
                                positions, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary))
    print(f"ground-truth sampling error (mean sqrt(V(1-V)/N)): {gt_se:.3f}; mean V {t.mean():.3f}")
    print(f"time: {timings['total_s']:.0f} s ({', '.join(f'{k} {v:.0f}' for k, v in timings.items())}); "
          f"outputs in {out}")
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--policy", type=Path, default=None, help="model dir (default: the task's cached tiny warm start)")
    ap.add_argument("--value-model", nargs="*", default=[], metavar="[NAME=]DIR",
                    help="trained critics (ValueModel.save_pretrained dirs, e.g. a PPO run's final/value_model)")
    ap.add_argument("--problems", type=int, default=24, help="the first N train problems")
    ap.add_argument("--samples", type=int, default=4, help="trajectories per problem (the group of group_mean); "
                                                           "states come from the first")
    ap.add_argument("--gt-samples", type=int, default=256)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 3, 9])
    ap.add_argument("--rank-states", type=int, default=30)
    ap.add_argument("--rank-gt-samples", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128, help="sampler rows decoded together")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("LANGENV_CACHE", Path.home() / ".cache" / "langenv")))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    for name in ("problems", "samples", "gt_samples", "rank_states", "rank_gt_samples", "max_new_tokens", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if min(args.ks) < 1:
        ap.error(f"--ks: expected values >= 1, got {args.ks}")
    for spec in args.value_model:
        path = Path(spec.rpartition("=")[2])
        if not (path / "value_head.safetensors").is_file():
            ap.error(f"--value-model {spec}: {path} has no value_head.safetensors (expected a run's final/value_model)")
    return args


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
