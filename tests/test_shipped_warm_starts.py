"""The warm starts shipped as package data (`algos.models.shipped`): they match today's recipe, a fresh
cache gets them without training, damage is caught by the checksums, a changed recipe trains again,
and the build they come from is deterministic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from algos.models.sft import SFTConfig
from algos.models.shipped import (
    SHIPPED_DIR,
    SHIPPED_MANIFEST,
    ShippedWarmStartError,
    _sha256,
    find_shipped,
    portable_key,
    ship,
    verify_shipped,
)
from algos.models.warm_start import WARM_START_MARKER, tiny_warm_start_key, warm_start, warm_start_tiny
from langenv.tasks import make_task

REPO = Path(__file__).resolve().parents[1]
#: Every shipped warm start, by task: ``algos/models/warm_starts/tiny-<task>/``.
SHIPPED_TASKS = sorted(p.name.removeprefix("tiny-") for p in SHIPPED_DIR.iterdir() if (p / SHIPPED_MANIFEST).is_file())


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_default_jobs_warm_start_is_shipped():
    assert "gsm8k" in SHIPPED_TASKS


@pytest.mark.parametrize("task_name", SHIPPED_TASKS)
def test_shipped_warm_start_matches_todays_recipe(task_name):
    """The shipped files pass their checksums and were built with the recipe a run asks for today;
    when this fails, rerun `python experiments/ship_warm_starts.py` and commit the result."""
    task = make_task(task_name)
    key = tiny_warm_start_key(task)
    directory = SHIPPED_DIR / key["name"]
    manifest = verify_shipped(directory)
    assert portable_key(manifest["key"]) == portable_key(key), (
        f"{directory}: shipped for another recipe; rerun python experiments/ship_warm_starts.py --tasks {task_name}")
    assert find_shipped(key["name"], key) == directory
    assert {"config.json", "model.safetensors", "tokenizer.json", WARM_START_MARKER} <= set(manifest["files"])
    assert set(manifest["files"]) | {SHIPPED_MANIFEST} == {p.name for p in directory.iterdir()}


def test_fresh_cache_installs_the_shipped_warm_start(tmp_path):
    """A first run on a fresh machine: the default job's warm start comes from the package (byte-identical
    weights, marked as shipped) and loads with transformers; the second call reuses the cache."""
    task = make_task("gsm8k")
    path = warm_start_tiny(task, tmp_path, progress=False)
    marker = json.loads((path / WARM_START_MARKER).read_text())
    assert marker["source"].startswith("shipped: ")
    shipped = SHIPPED_DIR / "tiny-gsm8k"
    assert _sha256(path / "model.safetensors") == _sha256(shipped / "model.safetensors")
    assert not (path / SHIPPED_MANIFEST).exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dirs left behind
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    prompt = task.prompt(task.load("test")[0])
    out = model.generate(**tok([prompt], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(tok(prompt).input_ids)
    assert warm_start_tiny(task, tmp_path, progress=False) == path


def _tiny_recipe(tmp_path, steps=2):
    data = [(f"Q: {a} + {b} =", f" {a + b}") for a in range(4) for b in range(3)]
    texts = [t for pair in data for t in pair]
    cfg = SFTConfig(batch_size=4, max_steps=steps, bf16_autocast=False)
    overrides = {"hidden_size": 16, "num_layers": 1, "num_heads": 1, "intermediate_size": 32}
    return dict(name="tiny-ship", examples=data, tokenizer_texts=texts, model_overrides=overrides,
                sft_config=cfg, progress=False, tokenizer="char", vocab_size=None)


def test_ship_round_trip_damage_and_recipe_change(tmp_path, one_thread):
    recipe = _tiny_recipe(tmp_path)
    built = warm_start(cache_dir=tmp_path / "build", shipped_dir=None, **recipe)
    shipped_dir = tmp_path / "shipped"
    target = ship(built, shipped_dir)
    assert target == shipped_dir / "tiny-ship"

    # a fresh cache installs it: same weights, no training
    installed = warm_start(cache_dir=tmp_path / "fresh", shipped_dir=shipped_dir, **recipe)
    assert json.loads((installed / WARM_START_MARKER).read_text())["source"] == f"shipped: {target}"
    assert _sha256(installed / "model.safetensors") == _sha256(built / "model.safetensors")

    # a changed recipe does not match the shipped one: it is trained
    changed = dict(recipe, sft_config=SFTConfig(batch_size=4, max_steps=3, bf16_autocast=False))
    assert find_shipped("tiny-ship", tiny_key(changed), shipped_dir) is None
    other = warm_start(cache_dir=tmp_path / "changed", shipped_dir=shipped_dir, **changed)
    assert json.loads((other / WARM_START_MARKER).read_text())["source"] == "trained"

    # bf16 autocast is the machine's choice, not the recipe's: still the shipped one
    machine = dict(recipe, sft_config=SFTConfig(batch_size=4, max_steps=2, bf16_autocast=True))
    assert find_shipped("tiny-ship", tiny_key(machine), shipped_dir) == target

    # one flipped byte in the weights: a clear error naming the file, and nothing installed
    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ShippedWarmStartError, match=r"model\.safetensors: sha256 .* differs .*--rebuild-warm-start"):
        warm_start(cache_dir=tmp_path / "damaged", shipped_dir=shipped_dir, **recipe)
    assert not any((tmp_path / "damaged").glob("tiny-ship-*"))
    weights.unlink()
    with pytest.raises(ShippedWarmStartError, match=r"model\.safetensors: listed in .* but missing"):
        find_shipped("tiny-ship", tiny_key(recipe), shipped_dir)


def tiny_key(recipe):
    from algos.models.warm_start import warm_start_key

    return warm_start_key(recipe["name"], recipe["examples"], recipe["tokenizer_texts"], recipe["model_overrides"],
                          recipe["sft_config"], vocab_size=recipe["vocab_size"], tokenizer=recipe["tokenizer"])


def test_rebuild_trains_and_replaces_the_cache_entry(tmp_path, one_thread):
    recipe = _tiny_recipe(tmp_path)
    built = warm_start(cache_dir=tmp_path / "build", shipped_dir=None, **recipe)
    shipped_dir = tmp_path / "shipped"
    ship(built, shipped_dir)
    cache = tmp_path / "cache"
    installed = warm_start(cache_dir=cache, shipped_dir=shipped_dir, **recipe)
    rebuilt = warm_start(cache_dir=cache, shipped_dir=shipped_dir, rebuild=True, **recipe)
    assert rebuilt == installed
    assert json.loads((rebuilt / WARM_START_MARKER).read_text())["source"] == "trained"
    assert [p.name for p in cache.iterdir()] == [rebuilt.name]
    # the build is deterministic: trained again from scratch, the same bytes as the shipped build
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha256(rebuilt / name) == _sha256(built / name), name


def test_run_rebuild_warm_start_refuses_a_pretrained_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "run.py"), "algo:grpo", "--model", str(tmp_path),
         "--rebuild-warm-start", "--out", str(tmp_path / "run")],
        check=False, capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode != 0
    assert "RunConfig.rebuild_warm_start: only the offline --model tiny has a warm start to rebuild" in proc.stderr

