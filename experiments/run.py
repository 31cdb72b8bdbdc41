"""Train a reasoning policy with one algorithm.

    python experiments/run.py algo:vineppo                       # offline tiny model on GSM8K, CPU
    python experiments/run.py algo:grpo --task arithmetic        # any algorithm, any registered task
    python experiments/run.py algo:ppo --task math --model path/or/hub-id --device cuda
    python experiments/run.py preset:vineppo-rho1b-gsm8k         # the paper's settings (GPU)
    python experiments/run.py algo:vineppo --help                # every flag

Algorithms: vineppo, ppo, grpo, rloo, dpo-plus, restem, and sft (the supervised control).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Union

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tyro  # noqa: E402

from algos.trainer import train  # noqa: E402
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
    command = tyro.cli(Command, args=argv, config=(tyro.conf.OmitArgPrefixes,))
    entry = type(command).entry
    return train(command.run, entry.name, command.algo, entry.build)


if __name__ == "__main__":
    main()
