"""The packaged GSM8K / MATH splits and `langenv.data.load_split`."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

import langenv.data as data
from langenv.data import DATASETS, SPLITS, load_split

COUNTS = {
    ("gsm8k", "train"): 7100,
    ("gsm8k", "train_full"): 7473,
    ("gsm8k", "validation"): 373,
    ("gsm8k", "test"): 1319,
    ("math", "train"): 11500,
    ("math", "train_full"): 12000,
    ("math", "validation"): 500,
    ("math", "test"): 500,
}

# sha256 of the uncompressed files (shared/data/SOURCES.md, langenv/data/SOURCES.md).
SHA256 = {
    "gsm8k/train": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    "gsm8k/test": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    "gsm8k/vineppo_validation": "5a16720383759d5ae435c17c1feafb21c53d89f0b91fdefb8ab4dd1a5d7adb88",
    "math/train": "7e0bf4f83c6b220ae3835e77aa101ff13f780abc470b5208a9d253a75c23cb74",
    "math/test": "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
    "math/vineppo_validation": "ff542dbd3e979d54859cbdddda32f12871c7949ec162e9dc9556c0cf844a133c",
}

KEY = {"gsm8k": ("question", "answer"), "math": ("unique_id",)}


def _keys(ds, dataset):
    return Counter(zip(*(ds[c] for c in KEY[dataset])))


def _write_jsonl(path: Path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- packaged data


def test_names():
    assert DATASETS == ("gsm8k", "math")
    assert SPLITS == ("train", "train_full", "validation", "test")
    assert set(COUNTS) == {(d, s) for d in DATASETS for s in SPLITS}


@pytest.mark.parametrize(("dataset", "split"), sorted(COUNTS))
def test_split_counts(dataset, split):
    ds = load_split(dataset, split)
    assert len(ds) == COUNTS[dataset, split]
    required = {"gsm8k": {"question", "answer"}, "math": {"problem", "solution", "answer", "subject", "level", "unique_id"}}
    assert required[dataset] <= set(ds.column_names)


@pytest.mark.parametrize("dataset", DATASETS)
def test_train_is_train_full_minus_validation(dataset):
    train, val, full = (_keys(load_split(dataset, s), dataset) for s in ("train", "validation", "train_full"))
    assert not (set(train) & set(val))
    assert train + val == full


@pytest.mark.parametrize("name", sorted(SHA256))
def test_packaged_files_match_sources(name):
    path = data.DATA_DIR / f"{name}.jsonl.gz"
    raw = path.read_bytes()
    assert raw[4:8] == b"\0\0\0\0", "gzip header mtime must be 0 (deterministic)"
    assert not raw[3] & 0x08, "gzip header must not store a file name"
    assert hashlib.sha256(gzip.decompress(raw)).hexdigest() == SHA256[name]
    assert SHA256[name] in (data.DATA_DIR / "SOURCES.md").read_text()


def test_license_files_shipped():
    for name, holder in (
        ("LICENSE-GSM8K", "2021 OpenAI"),
        ("LICENSE-MATH", "2021 Dan Hendrycks"),
        ("LICENSE-VinePPO", "2024 McGill-NLP"),
    ):
        text = (data.DATA_DIR / name).read_text()
        assert "MIT License" in text and f"Copyright (c) {holder}" in text
    assert "Copyright (c) 2023 OpenAI" in (data.DATA_DIR / "LICENSE-MATH").read_text()


def test_repeated_loads_are_independent_copies():
    a = load_split("gsm8k", "validation")
    b = load_split("gsm8k", "validation")
    assert a is not b and a[0] == b[0]
    a.set_format("numpy")  # in place on `a` only
    assert isinstance(load_split("gsm8k", "validation")[0]["question"], str)


def test_packaged_file_path():
    assert data.packaged_file("math", "train") == data.DATA_DIR / "math" / "train.jsonl.gz"
    assert data.packaged_file("gsm8k", "validation").name == "vineppo_validation.jsonl.gz"


# ---------------------------------------------------------------------------- local sources


def test_local_jsonl_file(tmp_path):
    path = _write_jsonl(tmp_path / "mine.jsonl", [{"question": "q1", "answer": "a\n#### 1"}, {"question": "q2", "answer": "b\n#### 2"}])
    ds = load_split("gsm8k", "test", source=str(path))
    assert ds["question"] == ["q1", "q2"]


def test_local_jsonl_gz_and_directory(tmp_path):
    rows = [{"problem": "p", "solution": "so $\\boxed{3}$.", "answer": "3", "unique_id": "u1"}]
    with gzip.open(tmp_path / "test.jsonl.gz", "wt") as f:
        f.write(json.dumps(rows[0]) + "\n")
    ds = load_split("math", "test", source=str(tmp_path))
    assert ds[0]["answer"] == "3"
    with pytest.raises(FileNotFoundError, match=r"validation\.jsonl"):
        load_split("math", "validation", source=str(tmp_path))


def test_local_parquet_and_json_array(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"question": ["q"], "answer": ["x\n#### 4"]}).to_parquet(str(tmp_path / "train.parquet"))
    assert load_split("gsm8k", "train", source=str(tmp_path))[0]["question"] == "q"
    (tmp_path / "arr.json").write_text(json.dumps([{"question": "q", "answer": "y\n#### 5"}]))
    assert load_split("gsm8k", "test", source=str(tmp_path / "arr.json"))[0]["answer"] == "y\n#### 5"


def test_column_aliases_and_derived_math_answer(tmp_path):
    # gsm8k copies with problem/solution columns
    path = _write_jsonl(tmp_path / "g.jsonl", [{"problem": "q", "solution": "s\n#### 7"}])
    assert load_split("gsm8k", "test", source=str(path))[0] == {"question": "q", "answer": "s\n#### 7"}
    # hendrycks_math style: no answer, no unique_id, `type` for the subject
    path = _write_jsonl(
        tmp_path / "m.jsonl",
        [{"problem": "p", "level": "Level 2", "type": "Algebra", "solution": "So $x = \\boxed{\\frac{1}{2}}$ or \\boxed{\\{1,2\\}}."}],
    )
    row = load_split("math", "test", source=str(path))[0]
    assert row["answer"] == "\\{1,2\\}" and row["subject"] == "Algebra"


def test_reload_after_file_changes(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "q1", "answer": "a"}])
    assert load_split("gsm8k", "test", source=str(path))["question"] == ["q1"]
    _write_jsonl(path, [{"question": "q1", "answer": "a"}, {"question": "q2", "answer": "b"}])
    assert load_split("gsm8k", "test", source=str(path))["question"] == ["q1", "q2"]


def test_hub_source_is_routed_to_load_dataset(monkeypatch):
    """The hub branch cannot reach the network here: check the call and the VinePPO carving."""
    import datasets

    full, test = load_split("gsm8k", "train_full"), load_split("gsm8k", "test")
    load_split("gsm8k", "validation")  # cached before load_dataset is replaced
    real_load_dataset = datasets.load_dataset
    calls = []

    def fake_load_dataset(name, config=None, split=None, **kw):
        if name in ("json", "parquet"):
            return real_load_dataset(name, config, split=split, **kw)
        calls.append((name, config, split))
        return full if split == "train" else test

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data, "_cache", {k: v for k, v in data._cache.items() if "hub" not in k})
    assert len(load_split("gsm8k", "train", source="openai/gsm8k")) == 7100
    assert len(load_split("gsm8k", "validation", source="openai/gsm8k")) == 373
    assert len(load_split("gsm8k", "test", source="openai/gsm8k:main")) == 1319
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]


# ---------------------------------------------------------------------------- errors


def test_unknown_dataset_or_split():
    with pytest.raises(ValueError, match=r"unknown dataset 'svamp'.*gsm8k, math"):
        load_split("svamp", "test")
    with pytest.raises(ValueError, match=r"unknown split 'dev'.*train, train_full, validation, test"):
        load_split("gsm8k", "dev")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_split("gsm8k", "test", source=str(missing))


def test_malformed_json_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}], ['{"question": "q2" "answer": "b"}'])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2: malformed JSON"):
        load_split("gsm8k", "test", source=str(path))
    path = _write_jsonl(tmp_path / "list.jsonl", [{"question": "q", "answer": "a"}], ["[1, 2]"])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2: expected a JSON object"):
        load_split("gsm8k", "test", source=str(path))


def test_missing_required_field(tmp_path):
    path = _write_jsonl(tmp_path / "nofield.jsonl", [{"question": "q"}])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: missing required field 'answer'"):
        load_split("gsm8k", "test", source=str(path))
    path = _write_jsonl(tmp_path / "onerow.jsonl", [{"question": "q", "answer": "a"}, {}, {"question": "q3"}])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:\d: missing required field '(question|answer)'"):
        load_split("gsm8k", "test", source=str(path))
    path = _write_jsonl(tmp_path / "nobox.jsonl", [{"problem": "p", "solution": "no box here"}])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:1: missing required field 'answer'.*boxed"):
        load_split("math", "test", source=str(path))


def test_empty_dataset(tmp_path):
    for name, content in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("arr.json", "[]")):
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match="empty dataset"):
            load_split("gsm8k", "test", source=str(tmp_path / name))
