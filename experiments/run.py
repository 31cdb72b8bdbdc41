"""Train a reasoning policy with one algorithm.

    python experiments/run.py algo:vineppo                       # offline tiny model on GSM8K, CPU
    python experiments/run.py algo:grpo --task arithmetic        # any algorithm, any registered task
    python experiments/run.py algo:ppo --task math --model path/or/hub-id --device cuda
    python experiments/run.py preset:vineppo-rho1b-gsm8k         # the paper's settings (GPU)
    python experiments/run.py algo:vineppo --help                # every flag

Algorithms: vineppo, ppo, grpo, rloo, dpo-plus, restem, and sft (the supervised control).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Annotated, Union

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tyro  # noqa: E402

from algos.training.config import RunConfig
from algos.training.loop import train  # noqa: E402
from experiments.presets import ALGORITHMS, COMMANDS, paper_vineppo  # noqa: E402

_PAPER = [("rho1b", "gsm8k", "RhoMath-1.1B SFT on GSM8K"), ("rho1b", "math", "RhoMath-1.1B SFT on MATH"),
          ("deepseek7b", "gsm8k", "DeepSeekMath-7B SFT on GSM8K"), ("deepseek7b", "math", "DeepSeekMath-7B SFT on MATH")]

_SUBCOMMANDS = [
    Annotated[COMMANDS[name], tyro.conf.subcommand(f"algo:{name}", default=COMMANDS[name](),
                                                   description=f"{entry.description} (CPU defaults for the offline tiny model)")]
    for name, entry in ALGORITHMS.items()
] + [
    Annotated[COMMANDS["vineppo"], tyro.conf.subcommand(f"preset:vineppo-{model}-{task}", default=paper_vineppo(model, task),
                                                        description=f"VinePPO, paper settings, {what}")]
    for model, task, what in _PAPER
]
Command = Union[tuple(_SUBCOMMANDS)]  # type: ignore[valid-type]


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _resume_dir(argv) is not None:
        command = _resume_command(argv, _resume_dir(argv))
    else:
        command = tyro.cli(Command, args=argv, config=(tyro.conf.OmitArgPrefixes,))
    entry = type(command).entry
    return train(command.run, entry.name, command.algo, entry.build)


def _resume_dir(argv: list[str]) -> Path | None:
    for i, arg in enumerate(argv):
        if arg == "--resume" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--resume="):
            return Path(arg.split("=", 1)[1])
    return None


def _resume_command(argv: list[str], run_dir: Path):
    """``--resume DIR``: the run's own settings (its config.json) are the defaults, so
    ``python experiments/run.py --resume DIR`` continues it as it was; flags given again override
    (e.g. ``--iterations`` to extend it). The subcommand may be left out."""
    config = run_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--resume: {run_dir} is not a run directory (no {config.name})")
    saved = json.loads(config.read_text())
    name = saved.get("algorithm")
    if name not in ALGORITHMS:
        raise ValueError(f"{config}: field 'algorithm' is {name!r}; expected one of {sorted(ALGORITHMS)}")
    if argv and not argv[0].startswith("-"):
        if argv[0] != f"algo:{name}":
            raise ValueError(f"--resume {run_dir}: the run is algo:{name}, not {argv[0]}")
        argv = argv[1:]
    entry = ALGORITHMS[name]
    # one-off flags of the earlier invocation do not carry over: it was a fresh start, it stopped early
    saved_run = {**saved["run"], "overwrite": False, "stop_after": None, "resume": None}
    default = COMMANDS[name](run=_from_json(RunConfig, saved_run, f"{config}: run"),
                             algo=_from_json(entry.config, saved["algo"], f"{config}: algo"))
    return tyro.cli(COMMANDS[name], args=argv, default=default, config=(tyro.conf.OmitArgPrefixes,))


def _from_json(cls, data: dict, where: str):
    """Rebuild a config dataclass from its config.json form (nested configs rebuilt the same way,
    lists back to tuples, strings back to paths)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {cls.__name__}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if isinstance(value, dict) and dataclasses.is_dataclass(hint):
            value = _from_json(hint, value, f"{where}.{name}")
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, str) and "Path" in str(hint):
            value = Path(value)
        values[name] = value
    return cls(**values)

if __name__ == "__main__":
    main()
