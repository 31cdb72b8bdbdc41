"""Warm starts shipped inside the package, so a fresh install trains from its first minute.

Training the tiny model's warm start takes 5-13 minutes of a 2-core CPU (`algos.models.warm_start`).
The default job's (``tiny-gsm8k``) and ``--task arithmetic``'s (``tiny-arithmetic``) are
therefore built once by ``python experiments/ship_warm_starts.py`` and committed under
``algos/models/warm_starts/<name>/``:
the Hugging Face files of the cached warm start plus ``shipped.json``, which records

- ``key``: the warm start's full recipe (`algos.models.warm_start.warm_start_key`: tokenizer, model
  shape, SFT hyper-parameters, fingerprints of the examples and tokenizer texts);
- ``files``: the sha256 of every shipped file;
- how, where and with what it was built (torch / transformers versions, seconds).

`find_shipped` returns the shipped directory whose recipe equals the requested one, after checking
every file's sha256; when the recipe changes (new data, new hyper-parameters, a new format) nothing
matches and the warm start is trained from scratch as before. The comparison ignores
``sft_config.bf16_autocast``, which `algos.models.sft.cpu_has_fast_bf16` sets per machine: it only
chooses the matmul precision of training on this CPU, so a model trained with it is the same recipe.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

#: The package folder holding the shipped warm starts, one sub-folder per warm-start name.
SHIPPED_DIR = Path(__file__).resolve().parent / "warm_starts"
#: The manifest of a shipped warm start (recipe key, file checksums, provenance).
SHIPPED_MANIFEST = "shipped.json"


class ShippedWarmStartError(RuntimeError):
    """A shipped warm start's files do not match their recorded checksums (a damaged install)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def portable_key(key: dict[str, Any]) -> dict[str, Any]:
    """``key`` without the machine-dependent ``sft_config.bf16_autocast`` (see the module docstring)."""
    out = copy.deepcopy(key)
    out.get("sft_config", {}).pop("bf16_autocast", None)
    return out


def verify_shipped(directory: Path) -> dict[str, Any]:
    """Check every file listed in ``directory/shipped.json`` against its sha256.

    Returns:
        The manifest (a dict with ``key``, ``files`` and provenance fields).

    Raises:
        ShippedWarmStartError: the manifest is unreadable, or a listed file is missing or differs
            from its recorded sha256 (the message names the file; reinstall the package or pass
            ``--rebuild-warm-start``).
    """
    manifest_path = directory / SHIPPED_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = dict(manifest["files"])
        manifest["key"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShippedWarmStartError(f"{manifest_path}: unreadable shipped warm-start manifest ({e})") from e
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise ShippedWarmStartError(f"{path}: listed in {manifest_path} but missing; reinstall langenv or "
                                        f"pass --rebuild-warm-start to train the warm start from scratch")
        actual = _sha256(path)
        if actual != digest:
            raise ShippedWarmStartError(f"{path}: sha256 {actual[:16]}… differs from {digest[:16]}… recorded in "
                                        f"{manifest_path} (a damaged install); reinstall langenv or pass "
                                        f"--rebuild-warm-start to train the warm start from scratch")
    return manifest


def find_shipped(name: str, key: dict[str, Any], shipped_dir: Path | None = None) -> Path | None:
    """The shipped warm start named ``name`` if its recipe equals ``key`` (up to `portable_key`), else None.

    Args:
        name: warm-start name (``"tiny-arithmetic"``); looked up as ``shipped_dir/name``.
        key: the requested recipe (`algos.models.warm_start.warm_start_key`).
        shipped_dir: folder of shipped warm starts; default `SHIPPED_DIR`.

    Raises:
        ShippedWarmStartError: the recipe matches but a file fails its checksum (`verify_shipped`).
    """
    directory = (shipped_dir or SHIPPED_DIR) / name
    manifest_path = directory / SHIPPED_MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        shipped_key = json.loads(manifest_path.read_text(encoding="utf-8"))["key"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShippedWarmStartError(f"{manifest_path}: unreadable shipped warm-start manifest ({e})") from e
    if portable_key(shipped_key) != portable_key(key):
        return None
    verify_shipped(directory)
    return directory


def ship(cache_path: Path, shipped_dir: Path | None = None, marker: str = "warm_start.json") -> Path:
    """Copy a finished cached warm start (a directory holding ``marker``) into ``shipped_dir/<name>/``
    and write its manifest; the name is the marker's ``key["name"]``. An existing shipped copy of that
    name is replaced.

    Returns:
        The shipped directory.

    Raises:
        FileNotFoundError: ``cache_path`` has no ``marker`` (not a finished warm start).
    """
    cache_path = Path(cache_path)
    marker_path = cache_path / marker
    if not marker_path.is_file():
        raise FileNotFoundError(f"{marker_path}: not a finished warm start (no marker file)")
    built = json.loads(marker_path.read_text(encoding="utf-8"))
    target = (shipped_dir or SHIPPED_DIR) / built["key"]["name"]
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    files = {}
    for path in sorted(cache_path.iterdir()):
        if path.is_file():
            shutil.copy2(path, target / path.name)
            files[path.name] = _sha256(target / path.name)
    manifest = {
        "key": built["key"],
        "files": files,
        "built": {k: built.get(k) for k in ("hash", "parameters", "vocab_size", "steps", "final_loss", "seconds",
                                             "versions")},
    }
    (target / SHIPPED_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return target
