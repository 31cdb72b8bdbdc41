"""Train a reasoning policy with one algorithm.

    python experiments/run.py algo:vineppo                       # offline tiny model on GSM8K, CPU
    python experiments/run.py algo:vineppo --task math --model path/or/hub-id --device cuda
    python experiments/run.py preset:vineppo-rho1b-gsm8k         # the paper's settings (GPU)
    python experiments/run.py algo:vineppo --help                # every flag
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Union

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tyro  # noqa: E402

from algos.trainer import train  # noqa: E402
from algos.vineppo import VinePPO  # noqa: E402
from experiments.presets import VinePPOCommand, paper_vineppo  # noqa: E402

ALGORITHMS = {VinePPOCommand: ("vineppo", VinePPO)}

Command = Union[
    Annotated[VinePPOCommand, tyro.conf.subcommand("algo:vineppo", default=VinePPOCommand(),
                                                   description="VinePPO, CPU defaults for the offline tiny model")],
    Annotated[VinePPOCommand, tyro.conf.subcommand("preset:vineppo-rho1b-gsm8k", default=paper_vineppo("rho1b", "gsm8k"),
                                                   description="VinePPO, paper settings, RhoMath-1.1B SFT on GSM8K")],
    Annotated[VinePPOCommand, tyro.conf.subcommand("preset:vineppo-rho1b-math", default=paper_vineppo("rho1b", "math"),
                                                   description="VinePPO, paper settings, RhoMath-1.1B SFT on MATH")],
    Annotated[VinePPOCommand, tyro.conf.subcommand("preset:vineppo-deepseek7b-gsm8k", default=paper_vineppo("deepseek7b", "gsm8k"),
                                                   description="VinePPO, paper settings, DeepSeekMath-7B SFT on GSM8K")],
    Annotated[VinePPOCommand, tyro.conf.subcommand("preset:vineppo-deepseek7b-math", default=paper_vineppo("deepseek7b", "math"),
                                                   description="VinePPO, paper settings, DeepSeekMath-7B SFT on MATH")],
]


def main(argv: list[str] | None = None) -> dict:
    command = tyro.cli(Command, args=argv, config=(tyro.conf.OmitArgPrefixes,))
    name, algorithm = ALGORITHMS[type(command)]
    return train(command.run, name, command.algo, algorithm)


if __name__ == "__main__":
    main()
