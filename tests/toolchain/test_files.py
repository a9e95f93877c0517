"""File hashes and the one check of a file against a recorded hash (artifact, checkpoint, ONNX, plan)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from toolchain.files import check_sha256, sha256_file, sha256_mismatch


class RecordError(RuntimeError):
    """A caller's own error type (as calib.artifact.ArtifactError, engines.trt.sidecar.PlanMismatchError)."""


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * 5000)  # over one read chunk
    return path


def test_sha256_file_is_the_sha256_of_the_bytes(model_file: Path) -> None:
    assert sha256_file(model_file) == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert sha256_file(model_file, chunk=7) == sha256_file(model_file)


def test_a_matching_file_passes(model_file: Path) -> None:
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert sha256_mismatch(model_file, digest, "the checkpoint") is None
    check_sha256(model_file, digest, "the checkpoint")


def test_a_mismatch_names_the_file_and_both_digests(model_file: Path) -> None:
    recorded = "0" * 64
    actual = hashlib.sha256(model_file.read_bytes()).hexdigest()
    problem = sha256_mismatch(model_file, recorded, "checkpoint mismatch: run.json was calibrated on another one")
    assert problem.startswith("checkpoint mismatch: run.json was calibrated on another one: ")
    assert str(model_file) in problem and recorded in problem and actual in problem
    with pytest.raises(ValueError, match=f"expected SHA-256 {recorded}, but .*model.safetensors has {actual}"):
        check_sha256(model_file, recorded, "the checkpoint")
    with pytest.raises(RecordError, match="the checkpoint"):
        check_sha256(model_file, recorded, "the checkpoint", error=RecordError)
    with pytest.raises(ValueError, match="expected SHA-256 None"):  # a record without the hash matches nothing
        check_sha256(model_file, None, "the checkpoint")


def test_a_known_digest_is_compared_without_reading(tmp_path: Path) -> None:
    """``digest``: the hash computed once elsewhere (the TensorRT runner hashes the ONNX once for two checks)."""
    absent = tmp_path / "not_there.onnx"
    assert sha256_mismatch(absent, "ab" * 32, "the ONNX", digest="ab" * 32) is None
    assert sha256_mismatch("the given ONNX", "ab" * 32, "built from another ONNX", digest="cd" * 32) == (
        f"built from another ONNX: expected SHA-256 {'ab' * 32}, but the given ONNX has {'cd' * 32}")
    with pytest.raises(FileNotFoundError):
        sha256_mismatch(absent, "ab" * 32, "the ONNX")
