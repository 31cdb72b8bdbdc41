"""The GSM8K and MATH splits shipped with langenv, read through Hugging Face `datasets`.

The data files live next to this module (``gsm8k/*.jsonl.gz``, ``math/*.jsonl.gz``); their
origins, licenses and checksums are in ``SOURCES.md`` in this folder. Loading is offline by
default. ``load_split(..., source=...)`` reads the same splits from a local file or folder, or
from the Hugging Face Hub.

Splits (VinePPO's, McGill-NLP/VinePPO ``download_and_prepare_dataset.sh`` and its data release):

===========  ===============================================  =====  =====
split        meaning                                          gsm8k  math
===========  ===============================================  =====  =====
train_full   the whole original train file                    7473   12000
validation   VinePPO's validation subset of train_full        373    500
train        VinePPO's train split: train_full - validation   7100   11500
test         the test file (GSM8K test; MATH-500)             1319   500
===========  ===============================================  =====  =====

Columns: gsm8k has ``question`` and ``answer`` (the worked solution ending in ``#### X``);
math has ``problem``, ``solution``, ``answer`` (the bare final answer), ``subject``, ``level``
and ``unique_id``.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `datasets` is imported lazily: importing it costs about a second.
    import datasets

__all__ = ["DATASETS", "SPLITS", "DATA_DIR", "load_split", "packaged_file"]

#: Datasets shipped with the package.
DATASETS = ("gsm8k", "math")
#: Split names accepted by `load_split`.
SPLITS = ("train", "train_full", "validation", "test")

#: Folder holding the packaged ``<dataset>/<file>.jsonl.gz`` files.
DATA_DIR = Path(__file__).resolve().parent

# Packaged file stem of each split; "train" is derived (train_full minus validation).
_PACKAGED_STEM = {"train_full": "train", "validation": "vineppo_validation", "test": "test"}

# Columns every row must have, after renaming.
_REQUIRED = {"gsm8k": ("question", "answer"), "math": ("problem", "solution", "answer")}

# Columns that identify a row when carving VinePPO's train split out of train_full
# (gsm8k has no id: rows are matched on their full content).
_ROW_KEY = {"gsm8k": ("question", "answer"), "math": ("unique_id",)}

# Other names for our columns found in common copies of the datasets: ours <- first one present.
_ALIASES = {
    "gsm8k": {"question": ("problem", "query", "input"), "answer": ("solution", "output")},
    "math": {
        "problem": ("question", "query", "input"),
        "solution": ("gold_solution", "output"),
        "subject": ("type",),
    },
}

# Hub configs for ids that need one.
_HUB_DEFAULT_CONFIG = {"openai/gsm8k": "main", "gsm8k": "main"}

# File names tried, in order, for a split inside a source directory.
_DIR_SUFFIXES = (".jsonl.gz", ".jsonl", ".json", ".parquet")
_LOCAL_SUFFIXES = (".jsonl.gz", ".jsonl", ".json.gz", ".json", ".parquet")

_cache: dict[tuple, Any] = {}
_cache_lock = threading.Lock()


def packaged_file(dataset: str, split: str) -> Path:
    """Path of the packaged ``.jsonl.gz`` file behind ``split`` ("train" -> the train_full file).

    Raises:
        ValueError: for an unknown dataset or split.
    """
    _check_names(dataset, split)
    stem = _PACKAGED_STEM["train_full" if split == "train" else split]
    return DATA_DIR / dataset / f"{stem}.jsonl.gz"


def load_split(dataset: str, split: str, source: str | None = None) -> "datasets.Dataset":
    """Load one split of GSM8K or MATH as a `datasets.Dataset`.

    Args:
        dataset: "gsm8k" or "math" (see `DATASETS`).
        split: "train", "train_full", "validation" or "test" (see `SPLITS` and the module docstring).
        source: where to read from.
            - None (default): the files shipped in the package, offline.
            - A local file (``.jsonl``, ``.jsonl.gz``, ``.json``, ``.json.gz``, ``.parquet``): that
              file is the split, as is (``split`` is only checked for validity).
            - A local directory: the file ``<split>.jsonl.gz``, ``<split>.jsonl``, ``<split>.json``
              or ``<split>.parquet`` in it (first found), as is.
            - Anything else is a Hugging Face Hub dataset id, optionally ``"id:config"``
              (``"openai/gsm8k"`` uses config "main" by default; ``"HuggingFaceH4/MATH-500"`` has
              only "test"). Split mapping: test -> hub "test"; train_full -> hub "train";
              train / validation -> hub "train" minus / restricted to the rows of the packaged
              VinePPO validation subset, matched by content (gsm8k: question and answer; math:
              unique_id). Needs network access.
            Common column names are renamed to ours (gsm8k: problem -> question, solution ->
            answer; math: question -> problem, type -> subject, ...). A math source without an
            ``answer`` column gets it from the last ``\\boxed{...}`` of each solution.

    Returns:
        The split, with at least the columns listed in the module docstring. Results are cached
        per process (keyed on the arguments and the source file's size and mtime) and `datasets`
        caches its Arrow conversion on disk, so repeated loads are fast; each call returns its own
        copy of the cached Dataset.

    Raises:
        ValueError: unknown dataset or split (the message lists valid names); a ``.gz`` file that
            is not gzip, or bytes that are not UTF-8; a malformed JSON line or one that is not an
            object (``file:line``); a missing, null or (question / problem) empty required field, or
            one of the wrong type, e.g. a list as ``question`` (names the field and the file and
            line); a repeated MATH ``unique_id``; an empty dataset; a math solution without ``\\boxed{}`` when ``answer``
            must be derived. Nothing is handed to `datasets` (so nothing is cached on disk) before
            a JSON file passes the line-by-line checks.
        FileNotFoundError: ``source`` looks like a path but does not exist, or a directory source
            has no file for ``split``; a packaged file is missing (broken install).
    """
    _check_names(dataset, split)
    if source is None:
        key: tuple = (dataset, split, None)
        loader = lambda: _load_packaged(dataset, split)  # noqa: E731
    else:
        source = str(source)
        local = _resolve_local(source, split)
        if local is not None:
            st = local.stat()
            key = (dataset, split, "local", str(local), st.st_mtime_ns, st.st_size)
            loader = lambda: _load_local(dataset, local)  # noqa: E731
        else:
            key = (dataset, split, "hub", source)
            loader = lambda: _load_hub(dataset, split, source)  # noqa: E731
    with _cache_lock:
        cached = _cache.get(key)
    if cached is None:
        cached = loader()
        with _cache_lock:
            _cache[key] = cached
    # Copies share the (memory-mapped) Arrow data, so this is cheap; it keeps in-place calls such
    # as `set_format` on one result from leaking into later ones.
    return copy.deepcopy(cached)


# --------------------------------------------------------------------------------------------
# validation helpers


def _check_names(dataset: str, split: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _looks_like_path(source: str) -> bool:
    """Whether a non-existent ``source`` was meant as a local path rather than a hub id."""
    return source.startswith(("/", ".", "~")) or "\\" in source or source.endswith(_LOCAL_SUFFIXES)


def _resolve_local(source: str, split: str) -> Path | None:
    """The local file to read for ``source``, or None when ``source`` is a hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        for suffix in _DIR_SUFFIXES:
            candidate = path / f"{split}{suffix}"
            if candidate.is_file():
                return candidate.resolve()
        names = ", ".join(f"{split}{s}" for s in _DIR_SUFFIXES)
        raise FileNotFoundError(f"no file for split {split!r} in directory {path}: tried {names}")
    if path.is_file():
        return path.resolve()
    if _looks_like_path(source):
        raise FileNotFoundError(f"data file not found: {path}")
    return None


def _read_text(path: Path) -> str:
    """The file's text, gunzipped when its name ends in ``.gz``.

    Raises:
        ValueError: a ``.gz`` file that is not gzip data or is cut short; bytes that are not UTF-8
            (``file:line``).
    """
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise ValueError(f"{path}: not a valid gzip file ({e}); expected gzip-compressed JSON Lines "
                             "(or drop the .gz suffix for a plain file)") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                         "expected a UTF-8 JSON / JSON Lines file") from None


def _text_fields(dataset: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names (ours and their aliases) whose values must be strings, and those that may also be numbers."""
    strings = set(_REQUIRED[dataset])
    for ours in _REQUIRED[dataset]:
        strings.update(_ALIASES[dataset].get(ours, ()))
    numbers = ("answer",) if dataset == "math" else ()  # a bare math answer such as 5 is fine as a number
    return tuple(sorted(strings - set(numbers))), numbers


def _check_row(row: dict, dataset: str, where: str) -> None:
    strings, numbers = _text_fields(dataset)
    for name, value in row.items():
        if value is None:
            continue  # reported as missing later, with the other missing-field cases
        if name in strings and not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r}: expected a string, got {type(value).__name__} {value!r:.80}")
        if name in numbers and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise ValueError(
                f"{where}: field {name!r}: expected a string or a number, got {type(value).__name__} {value!r:.80}"
            )


def _scan_json(path: Path, dataset: str) -> list[int] | None:
    """Check a JSON / JSON Lines file line by line before `datasets` reads it.

    Returns the 1-based line number of each row of a JSON Lines file (blank lines are skipped by
    `datasets` too), so later errors about row ``i`` can name ``file:line``; None for a JSON array.

    Raises:
        ValueError: a file that is not (gzip-compressed) UTF-8 text; a line that is not valid JSON
            or not a JSON object (``file:line``); a field of ours (or an alias of one) whose value
            has the wrong type, e.g. a number or a list as ``question`` (``file:line``); a file with
            no rows.
    """
    text = _read_text(path)
    stripped = text.lstrip()
    if not stripped:
        raise ValueError(f"{path}: empty dataset (the file has no rows)")
    if stripped.startswith("["):  # one JSON array of objects
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not rows:
            raise ValueError(f"{path}: empty dataset (the JSON array is empty)")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"{path}: row {i} is a JSON {type(row).__name__}, expected an object")
            _check_row(row, dataset, f"{path} (row {i})")
        return None  # no line numbers for a JSON array: errors name the row index
    lines: list[int] = []
    # split on "\n" only: str.splitlines also breaks at U+2028 and friends, which JSON allows inside strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON line: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        _check_row(row, dataset, f"{path}:{lineno}")
        lines.append(lineno)
    return lines


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed x``) in ``text``, stripped.

    This is the rule PRM800K used for MATH's ``answer`` field (it reproduces OpenAI's answers on
    all 1000 reference rows, see SOURCES.md). Returns None when there is none or braces don't close.
    """
    starts = list(re.finditer(r"\\(?:boxed|fbox)\b", text))
    if not starts:
        return None
    i = k = starts[-1].end()
    while k < len(text) and text[k].isspace():
        k += 1
    if k >= len(text):
        return None
    if text[k] != "{":
        if k == i:  # "\boxedx": not a box
            return None
        end = k  # "\boxed 5": the answer runs to the next space or "$"
        while end < len(text) and not text[end].isspace() and text[end] != "$":
            end += 1
        return text[k:end].strip() or None
    i = k
    depth = 0
    j = i
    while j < len(text):
        c = text[j]
        if c == "\\":  # skip the escaped character (\{, \}, \\)
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
        j += 1
    return None


def _normalise(ds: "datasets.Dataset", dataset: str, where: str, lines: list[int] | None):
    """Rename columns to ours, derive a missing math ``answer``, check required fields.

    ``where`` names the source in messages; ``lines`` maps row index -> file line (JSON sources).
    """
    import datasets

    def locate(i: int) -> str:
        if lines is not None and i < len(lines):
            return f"{where}:{lines[i]}"
        return f"{where} (row {i})"

    if len(ds) == 0:
        raise ValueError(f"{where}: empty dataset (0 rows)")
    cols = set(ds.column_names)
    renames = {}
    for ours, others in _ALIASES[dataset].items():
        if ours in cols:
            continue
        for other in others:
            if other in cols and other not in renames:
                renames[other] = ours
                break
    if renames:
        ds = ds.rename_columns(renames)
    cols = set(ds.column_names)

    if dataset == "math" and "answer" not in cols and "solution" in cols:
        solutions = ds["solution"]
        answers = []
        for i, sol in enumerate(solutions):
            ans = _last_boxed(sol) if isinstance(sol, str) else None
            if ans is None:
                raise ValueError(
                    f"{locate(i)}: missing required field 'answer', and it cannot be derived: "
                    "the solution has no \\boxed{...}"
                )
            answers.append(ans)
        ds = ds.add_column("answer", answers)
        cols.add("answer")

    for field in _REQUIRED[dataset]:
        if field not in cols:
            raise ValueError(
                f"{where}: missing required field {field!r} (columns: {', '.join(sorted(cols))})"
            )
        column = ds.data.column(field)
        if column.null_count:
            first = next(i for i, v in enumerate(column.to_pylist()) if v is None)
            raise ValueError(f"{locate(first)}: missing required field {field!r} (null or absent)")
        if ds.features[field] != datasets.Value("string"):
            ds = ds.cast_column(field, datasets.Value("string"))

    prompt_field = "question" if dataset == "gsm8k" else "problem"
    for i, text in enumerate(ds[prompt_field]):
        if not text.strip():
            raise ValueError(f"{locate(i)}: missing required field {prompt_field!r} (empty string)")
    if "unique_id" in ds.column_names:
        first_row: dict[str, int] = {}
        for i, uid in enumerate(ds["unique_id"]):
            if uid is None:
                continue
            key = str(uid)
            if key in first_row:
                raise ValueError(
                    f"{locate(i)}: field 'unique_id': {uid!r} already used by {locate(first_row[key])}; "
                    "expected unique ids (problems are identified by them)"
                )
            first_row[key] = i
    return ds


# --------------------------------------------------------------------------------------------
# loaders


def _read_with_datasets(path: Path) -> "datasets.Dataset":
    import datasets

    builder = "parquet" if path.name.endswith(".parquet") else "json"
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parser errors in several exception types
        raise ValueError(f"{path}: could not be read by datasets ({type(e).__name__}: {e})") from e


def _load_local(dataset: str, path: Path) -> "datasets.Dataset":
    lines = None if path.name.endswith(".parquet") else _scan_json(path, dataset)
    ds = _read_with_datasets(path)
    return _normalise(ds, dataset, str(path), lines)


def _row_keys(ds: "datasets.Dataset", dataset: str, where: str) -> list[tuple]:
    names = _ROW_KEY[dataset]
    missing = [n for n in names if n not in ds.column_names]
    if missing:
        raise ValueError(
            f"{where}: cannot match rows to VinePPO's validation subset without field(s) "
            f"{', '.join(map(repr, missing))}; use split 'train_full' instead"
        )
    return list(zip(*(ds[n] for n in names)))


def _carve(full: "datasets.Dataset", val: "datasets.Dataset", dataset: str, keep: bool, where: str):
    """Rows of ``full`` that are (keep=True) or are not (keep=False) in ``val``, as multisets."""
    wanted = Counter(_row_keys(val, dataset, "packaged validation split"))
    picked = []
    for i, k in enumerate(_row_keys(full, dataset, where)):
        hit = wanted[k] > 0
        if hit:
            wanted[k] -= 1
        if hit == keep:
            picked.append(i)
    return full.select(picked), sum(wanted.values())


def _load_packaged(dataset: str, split: str) -> "datasets.Dataset":
    if split != "train":
        path = packaged_file(dataset, split)
        if not path.is_file():
            raise FileNotFoundError(f"packaged data file missing: {path} (reinstall langenv)")
        ds = _read_with_datasets(path)
        return _normalise(ds, dataset, str(path), None)
    full = _load_packaged(dataset, "train_full")
    val = _load_packaged(dataset, "validation")
    train, unmatched = _carve(full, val, dataset, keep=False, where="packaged train_full split")
    if unmatched or len(train) != len(full) - len(val):
        raise RuntimeError(
            f"packaged {dataset} data is inconsistent: {unmatched} validation rows not found in "
            f"train_full ({len(full)} rows, validation {len(val)}, train {len(train)})"
        )
    return train


def _load_hub(dataset: str, split: str, source: str) -> "datasets.Dataset":
    import datasets

    name, _, config = source.partition(":")
    config = config or _HUB_DEFAULT_CONFIG.get(name)
    hub_split = "test" if split == "test" else "train"
    ds = datasets.load_dataset(name, config, split=hub_split)
    ds = _normalise(ds, dataset, f"hub dataset {source!r} split {hub_split!r}", None)
    if split in ("train", "validation"):
        val = _load_packaged(dataset, "validation")
        ds, _ = _carve(ds, val, dataset, keep=split == "validation", where=f"hub dataset {source!r}")
        if len(ds) == 0:
            raise ValueError(f"hub dataset {source!r}: empty dataset for split {split!r}")
    return ds
