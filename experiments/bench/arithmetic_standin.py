"""A stand-in for the arithmetic warm start, for timing benchmarks on a machine without it.

    python experiments/bench/arithmetic_standin.py --steps 60 --out /tmp/spbench/models
    python experiments/bench/trl_step.py --model /tmp/spbench/models/tiny-arithmetic-sft60-<hash>

The arithmetic warm start's own recipe (`algos.models.warm_start.tiny_setup("arithmetic")`: character tokenizer
of 54 tokens, hidden 256, 4 layers, 4 heads, 4.21M parameters) with only ``--steps`` SFT steps (fp32), so it is
built in minutes instead of the full recipe's 800 steps. Same shapes and prompts, hence the same compute per
token; a less trained model samples other lengths in ``natural`` mode (``forced64`` is unaffected). Prints the
model directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

import torch


def main(argv: list[str] | None = None) -> Path:
    from algos.models.warm_start import _tiny_inputs, warm_start
    from langenv.tasks import make_task

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="SFT steps (the full recipe: 800)")
    p.add_argument("--out", type=Path, default=Path("/tmp/spbench/models"), help="parent directory of the model")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    name, examples, texts, setup = _tiny_inputs(make_task("arithmetic"))
    sft = dataclasses.replace(setup.sft_config, max_steps=args.steps, bf16_autocast=False)
    path = warm_start(f"{name}-sft{args.steps}", examples, texts, args.out, setup.model_overrides, sft, progress=False,
                      vocab_size=setup.vocab_size, tokenizer=setup.tokenizer, shipped_dir=None)
    print(path)
    return path


if __name__ == "__main__":
    main()
