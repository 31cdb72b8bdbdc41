"""The cached warm start of the offline ``tiny`` model, and each task's tiny setup.

`warm_start` builds the tokenizer and the tiny model (`algos.models.tiny`), runs
`algos.models.sft.train_sft`, and saves both in Hugging Face format under ``cache_dir/<name>-<hash>``;
a later call with the same inputs reuses it. `tiny_setup` says how each task's tiny model is built
and fine-tuned; `load_model` is what the trainer calls: the cached warm start for ``--model tiny``,
else a hub id or local directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import transformers

from algos.models.policy import load_policy
from algos.models.sft import SFTConfig, cpu_has_fast_bf16, train_sft
from algos.models.shipped import SHIPPED_DIR, SHIPPED_MANIFEST, find_shipped
from algos.models.tiny import (
    DEFAULT_VOCAB_SIZE,
    build_char_tokenizer,
    build_tiny_model,
    build_tokenizer,
    count_parameters,
)
from langenv.tasks.base import Task

logger = logging.getLogger(__name__)

#: Name of the file `warm_start` writes last into a finished cache directory.
WARM_START_MARKER = "warm_start.json"
#: Per-step SFT metrics saved next to the warm-started model (one JSON object per line).
WARM_START_METRICS = "sft_metrics.jsonl"
#: Tokenizer kinds of `warm_start`: byte-level BPE (`algos.models.tiny.build_tokenizer`) or one token per
#: character (`algos.models.tiny.build_char_tokenizer`).
TOKENIZER_KINDS = ("bpe", "char")
#: Bumped when the cached artefact's format or the warm-start procedure changes (invalidates caches).
_WARM_START_FORMAT = 1


#: Model overrides of the tiny GSM8K warm start (`algos.models.tiny.tiny_config` arguments):
#: hidden 256, 4 layers, 4 heads, MLP 1024, vocab 2048 -> 4.7M parameters.
TINY_GSM8K_MODEL: dict[str, Any] = {"hidden_size": 256, "num_layers": 4, "num_heads": 4}

#: The tiny model's GSM8K warm start, measured on the project's 2-core CPU (AVX512-BF16, torch 2.13)
#: with the 7,473 GSM8K train pairs: 400 steps of 32 (1.7 epochs; 0.7-0.8 s/step with bf16
#: autocast) -> 4.5-5.5 min wall including the tokenizer (325 s measured); response loss
#: 7.6 -> ~2.5 nats/token (held-out 2.55); greedy answers end in "#### N" ~half the time.
#: At this budget lr 2e-3 beat 1e-3 and 3e-3 (held-out loss 2.55 / 2.65 / 3.13); 350 steps
#: (265 s) gave held-out 2.72 and 41% "#### N", 450 steps (310-330 s) 2.45 and 64%.
TINY_GSM8K_SFT = SFTConfig(
    learning_rate=2e-3,
    batch_size=32,
    max_steps=400,
    warmup_ratio=0.05,
    weight_decay=0.0,
    grad_clip=1.0,
    max_length=1024,
    seed=0,
    bf16_autocast=cpu_has_fast_bf16(),
)

#: Model overrides of the tiny arithmetic warm start: hidden 256, 4 layers, 4 heads, MLP 1024, a
#: character vocabulary of ~50 tokens -> ~4.2M parameters.
TINY_ARITHMETIC_MODEL: dict[str, Any] = {"hidden_size": 256, "num_layers": 4, "num_heads": 4}

#: The tiny model's warm start on the synthetic ``arithmetic`` task (defaults: 2-4 operations,
#: operands 1-9, 20,000 train problems), character tokenizer (54 tokens, 4.21M parameters): 800 steps
#: of 64 (2.6 epochs). Measured on the project's 2-core CPU (AVX512-BF16, torch 2.13, bf16 autocast):
#: 781 s wall (~1 s/step; more when the CPU is shared); response loss 4.03 -> 0.105 (last 50 steps),
#: validation 0.109; greedy accuracy on the first 1000 test problems 33% (2 ops 50%, 3 ops 31%,
#: 4 ops 18%; 92% of the first errors are arithmetic slips, the rest misread operations), sampled
#: (T 0.6, top-p 0.9) 28%, a third of 4-sample groups mixed: room to learn and signal for RL.
#: lr 2e-3 failed here (loss stuck at 0.63, 8% greedy: the model never learned to copy numbers).
TINY_ARITHMETIC_SFT = SFTConfig(
    learning_rate=1e-3,
    batch_size=64,
    max_steps=800,
    warmup_ratio=0.05,
    weight_decay=0.0,
    grad_clip=1.0,
    max_length=256,
    seed=0,
    bf16_autocast=cpu_has_fast_bf16(),
)


@dataclass(frozen=True)
class TinySetup:
    """How the offline ``tiny`` model is built and warm-started for one task (see `tiny_setup`).

    Attributes:
        tokenizer: tokenizer kind for `warm_start` (one of `TOKENIZER_KINDS`).
        vocab_size: BPE vocabulary size; None for ``"char"`` (the vocabulary is the alphabet).
        model_overrides: `algos.models.tiny.tiny_config` arguments.
        sft_config: SFT hyper-parameters of the warm start.
    """

    tokenizer: str
    vocab_size: int | None
    model_overrides: dict[str, Any]
    sft_config: SFTConfig


def tiny_setup(task_name: str) -> TinySetup:
    """The tiny-model setup of a task: the character-level arithmetic setup
    (`TINY_ARITHMETIC_MODEL`, `TINY_ARITHMETIC_SFT`) for ``"arithmetic"`` and for every
    reasoning-gym task ``"rg:<dataset>"`` (procedural, short answers, a small alphabet; not tuned
    per dataset: the hyper-parameters are the arithmetic ones), the GSM8K one
    (byte-level BPE of `DEFAULT_VOCAB_SIZE`, `TINY_GSM8K_MODEL`, `TINY_GSM8K_SFT`) for any other
    task. Use it as::

        setup = tiny_setup(task.name)
        warm_start(name, examples, texts, cache_dir, setup.model_overrides, setup.sft_config,
                   progress=progress, vocab_size=setup.vocab_size, tokenizer=setup.tokenizer)
    """
    if task_name == "arithmetic" or task_name.startswith("rg:"):
        return TinySetup("char", None, dict(TINY_ARITHMETIC_MODEL), TINY_ARITHMETIC_SFT)
    return TinySetup("bpe", DEFAULT_VOCAB_SIZE, dict(TINY_GSM8K_MODEL), TINY_GSM8K_SFT)




def _fingerprint(items: Iterable[Any]) -> str:
    """sha256 of a sequence of strings / string tuples, length-prefixed so boundaries count."""
    h = hashlib.sha256()
    for item in items:
        parts = item if isinstance(item, (tuple, list)) else (item,)
        h.update(b"%d:" % len(parts))
        for part in parts:
            data = str(part).encode("utf-8", "surrogatepass")
            h.update(b"%d:" % len(data))
            h.update(data)
    return h.hexdigest()


def warm_start_key(
    name: str,
    examples: Sequence[tuple[str, str]],
    tokenizer_texts: Sequence[str],
    model_overrides: dict[str, Any],
    sft_config: SFTConfig,
    vocab_size: int | None = DEFAULT_VOCAB_SIZE,
    tokenizer: str = "bpe",
) -> dict[str, Any]:
    """Everything the warm-started model depends on, as a JSON-serialisable dict (hashed into the
    cache directory name).

    For ``tokenizer="bpe"`` the dict is the one of the original format (no ``tokenizer`` field), so
    existing BPE caches stay valid. For ``"char"`` it adds ``"tokenizer": "char"`` and records
    ``vocab_size`` as None: the vocabulary is the corpus alphabet, whatever ``vocab_size`` says."""
    try:
        overrides = json.loads(json.dumps(model_overrides, sort_keys=True))
    except TypeError as e:
        raise ValueError(
            f"model_overrides: expected JSON-serialisable values, got {model_overrides!r}"
        ) from e
    key: dict[str, Any] = {
        "format": _WARM_START_FORMAT,
        "name": name,
        "vocab_size": vocab_size if tokenizer == "bpe" else None,
        "model_overrides": overrides,
        "sft_config": asdict(sft_config),
        "examples": _fingerprint(examples),
        "n_examples": len(examples),
        "tokenizer_texts": _fingerprint(tokenizer_texts),
    }
    if tokenizer != "bpe":
        key["tokenizer"] = tokenizer
    return key


def warm_start(
    name: str,
    examples: Sequence[tuple[str, str]],
    tokenizer_texts: Iterable[str],
    cache_dir: Path | str,
    model_overrides: dict[str, Any] | None = None,
    sft_config: SFTConfig | None = None,
    progress: bool = True,
    *,
    vocab_size: int | None = DEFAULT_VOCAB_SIZE,
    tokenizer: str = "bpe",
    shipped_dir: Path | None = SHIPPED_DIR,
    rebuild: bool = False,
) -> Path:
    """Build (or reuse) a tokenizer + tiny model warm-started by SFT, saved in Hugging Face format.

    Where it comes from, in order: the cache (``cache_dir/<name>-<hash>`` with its marker); else the
    warm start shipped in the package under ``shipped_dir/<name>`` when its recipe is the requested
    one (`algos.models.shipped.find_shipped`, every file checked against its sha256), copied into
    the cache in a second; else it is trained from scratch as below. ``rebuild=True`` skips both the
    cache and the shipped copy, trains, and replaces the cache entry.

    On a cache miss: build the tokenizer from ``tokenizer_texts`` (`algos.models.tiny.build_tokenizer`, or
    `algos.models.tiny.build_char_tokenizer` for ``tokenizer="char"``),
    seed torch with ``sft_config.seed``, build the model (`algos.models.tiny.build_tiny_model` with
    ``model_overrides``), run `train_sft`, and save model, tokenizer, ``sft_metrics.jsonl`` and
    finally the marker ``warm_start.json`` into a temporary sibling directory that is then renamed
    to ``cache_dir/<name>-<hash>`` (atomic: a killed run leaves only a ``.tmp-*`` directory, never a
    half-written one that would be reused). On a hit (the directory and its marker exist) nothing is
    trained. The hash covers ``name``, the tokenizer kind, ``vocab_size`` (BPE only),
    ``model_overrides``, ``sft_config`` and fingerprints of ``examples`` and ``tokenizer_texts``
    (see `warm_start_key`).

    Args:
        name: cache name, ``[A-Za-z0-9._-]+`` (e.g. ``"tiny-gsm8k"``).
        examples: SFT ``(prompt, response)`` pairs (see `train_sft`).
        tokenizer_texts: the tokenizer's training corpus.
        cache_dir: parent directory of the cached models (created if missing).
        model_overrides: `algos.models.tiny.tiny_config` arguments (JSON-serialisable); ``None``: defaults.
        sft_config: SFT hyper-parameters; ``None``: `TINY_GSM8K_SFT`.
        progress: show the SFT progress bar.
        vocab_size: BPE vocabulary size of the tokenizer; ``None`` means `DEFAULT_VOCAB_SIZE`.
            Ignored for ``tokenizer="char"``.
        tokenizer: tokenizer kind, ``"bpe"`` (byte-level BPE, the default) or ``"char"`` (one token
            per character of the corpus alphabet).
        shipped_dir: folder of shipped warm starts (`algos.models.shipped.SHIPPED_DIR`); None: never
            use a shipped one.
        rebuild: train from scratch even when the cache or the package holds this warm start.

    Returns:
        The model directory, loadable by ``AutoModelForCausalLM.from_pretrained(path)`` and
        ``AutoTokenizer.from_pretrained(path)``.

    Raises:
        ValueError: on a bad ``name``, ``tokenizer`` kind, non-serialisable ``model_overrides``, or
            bad examples.
        algos.models.shipped.ShippedWarmStartError: the matching shipped warm start fails its checksums.
    """
    if tokenizer not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer: expected one of {', '.join(map(repr, TOKENIZER_KINDS))}, got {tokenizer!r}")
    if tokenizer == "bpe" and vocab_size is None:
        vocab_size = DEFAULT_VOCAB_SIZE
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"name: expected letters, digits, '.', '_' or '-' (not leading), got {name!r}")
    model_overrides = dict(model_overrides or {})
    sft_config = sft_config if sft_config is not None else TINY_GSM8K_SFT
    examples = list(examples)
    texts = list(tokenizer_texts)
    key = warm_start_key(name, examples, texts, model_overrides, sft_config, vocab_size, tokenizer)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    final = cache_dir / f"{name}-{digest}"
    if not rebuild and (final / WARM_START_MARKER).is_file():
        logger.info("warm start: reusing %s", final)
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    shipped = None if rebuild or shipped_dir is None else find_shipped(name, key, shipped_dir)
    if shipped is not None:
        tmp = cache_dir / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(shipped, tmp, ignore=shutil.ignore_patterns(SHIPPED_MANIFEST, WARM_START_MARKER))
            marker = json.loads((shipped / WARM_START_MARKER).read_text(encoding="utf-8"))
            marker.update(key=key, hash=digest, source=f"shipped: {shipped}")
            _write_marker(tmp / WARM_START_MARKER, marker)
            _install(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("warm start: installed the shipped %s into %s", shipped, final)
        return final

    tmp = cache_dir / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    logger.info("warm start: training %s (model %s, %d examples)",
                final, model_overrides, len(examples))
    t0 = time.perf_counter()
    try:
        tok = build_char_tokenizer(texts) if tokenizer == "char" else build_tokenizer(texts, vocab_size)
        torch.manual_seed(sft_config.seed)
        model = build_tiny_model(tok, **model_overrides)
        metrics = train_sft(model, tok, examples, sft_config, progress=progress)
        tmp.mkdir()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(tmp / WARM_START_METRICS, "w", encoding="utf-8") as f:
            for m in metrics:
                f.write(json.dumps(m) + "\n")
        marker = {
            "key": key,
            "hash": digest,
            "parameters": count_parameters(model),
            "vocab_size": len(tok),
            "steps": len(metrics),
            "final_loss": metrics[-1]["loss"],
            "seconds": time.perf_counter() - t0,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "source": "trained",
        }
        _write_marker(tmp / WARM_START_MARKER, marker)
        _install(tmp, final, replace=rebuild)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("warm start: saved %s in %.0f s", final, time.perf_counter() - t0)
    return final


def _write_marker(path: Path, marker: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _install(tmp: Path, final: Path, replace: bool = False) -> None:
    """Rename the finished ``tmp`` to ``final``. An existing ``final`` without a marker (a half-written
    directory) is moved away first, and so is a finished one when ``replace``; a finished one that a
    concurrent process installed meanwhile is kept and ``tmp`` discarded."""
    if final.exists() and (replace or not (final / WARM_START_MARKER).is_file()):
        stale = final.parent / f".stale-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / WARM_START_MARKER).is_file():  # not a concurrent finished run
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: use theirs


def load_model(model: str, task: Task, cache_dir: Path, device: str = "cpu", rebuild_warm_start: bool = False,
               gguf_file: str | None = None, chat_template: bool = True):
    """The policy and tokenizer of ``--model``: the offline warm start of ``task`` for ``"tiny"``
    (float32; cached, shipped or trained: `warm_start_tiny`), a GGUF file or named offline model
    converted once into ``cache_dir`` (`algos.models.pretrained.resolve_pretrained`), else a hub id
    or local directory (`algos.models.policy.load_policy`). ``chat_template=False`` clears the
    tokenizer's chat template, so prompts are encoded as raw text (`langenv.env.encode_prompt`)."""
    if model == "tiny":
        path = warm_start_tiny(task, cache_dir, rebuild=rebuild_warm_start)
        policy, tokenizer = load_policy(str(path), dtype=torch.float32, device=device)
    else:
        from algos.models.pretrained import resolve_pretrained

        policy, tokenizer = load_policy(resolve_pretrained(model, cache_dir, gguf_file), device=device)
    if not chat_template:
        tokenizer.chat_template = None
    return policy, tokenizer


def warm_start_tiny(task: Task, cache_dir: Path, progress: bool = True, rebuild: bool = False,
                    shipped_dir: Path | None = SHIPPED_DIR) -> Path:
    """The offline default model for a task: a tokenizer trained on the task's train text and a
    small Llama fine-tuned on its reference solutions (`algos.models.warm_start.warm_start` with the task's
    `algos.models.warm_start.tiny_setup`), built once per (task, model config, SFT config, seed) and cached under
    ``cache_dir``, so every run and algorithm starts from the same checkpoint. The package ships the
    ``gsm8k`` and ``arithmetic`` ones (`algos.models.shipped`; ``shipped_dir=None`` ignores shipped ones);
    ``rebuild=True`` trains from scratch and replaces the cache entry."""
    name, examples, texts, setup = _tiny_inputs(task)
    return warm_start(name, examples, texts, cache_dir, setup.model_overrides, setup.sft_config,
                      progress=progress, vocab_size=setup.vocab_size, tokenizer=setup.tokenizer,
                      shipped_dir=shipped_dir, rebuild=rebuild)


def tiny_warm_start_key(task: Task) -> dict[str, Any]:
    """The recipe key (`warm_start_key`) of ``task``'s tiny warm start, without training anything:
    what a shipped warm start must match to be used (`algos.models.shipped.find_shipped`)."""
    name, examples, texts, setup = _tiny_inputs(task)
    return warm_start_key(name, examples, texts, setup.model_overrides, setup.sft_config,
                          vocab_size=setup.vocab_size, tokenizer=setup.tokenizer)


def _tiny_inputs(task: Task) -> tuple[str, list[tuple[str, str]], list[str], TinySetup]:
    """Name, SFT examples, tokenizer texts and setup of ``task``'s tiny warm start."""
    setup = tiny_setup(task.name)
    examples = [(task.prompt(p), task.target(p)) for p in task.load("train")]
    texts = [t for pair in examples for t in pair]
    name = "tiny-" + re.sub(r"[^A-Za-z0-9._-]", "-", task.name)  # "rg:countdown" -> "tiny-rg-countdown"
    return name, examples, texts, setup
