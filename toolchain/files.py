"""File helpers shared by every stage: content hashes, the check of a file against a recorded hash, and
atomic writes."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_mismatch(path: str | os.PathLike, expected: str | None, what: str, *,
                    digest: str | None = None) -> str | None:
    """Why ``path`` is not the file recorded by SHA-256 ``expected``, or None when its bytes hash to it.

    ``what`` says which file was expected and by whom (it starts the message); ``digest``: the file's
    SHA-256 when already computed (``path`` then only names the file in the message).

    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = Path(folder) / "model.onnx"
    ...     _ = path.write_bytes(b"onnx")
    ...     print(sha256_mismatch(path, sha256_file(path), "the exported ONNX"))
    ...     print(sha256_mismatch("the given ONNX", "ab12...", "built from another ONNX", digest="cd34..."))
    None
    built from another ONNX: expected SHA-256 ab12..., but the given ONNX has cd34...
    """
    actual = sha256_file(path) if digest is None else digest
    if actual == expected:
        return None
    return f"{what}: expected SHA-256 {expected}, but {path} has {actual}"


def check_sha256(path: str | os.PathLike, expected: str | None, what: str, *,
                 error: type[BaseException] = ValueError) -> None:
    """Raise ``error`` naming ``path`` and both digests unless the file's SHA-256 is ``expected``.

    ``what`` says which file was expected and by whom (:func:`sha256_mismatch`); ``error``: the caller's
    exception type (e.g. ``calib.artifact.ArtifactError``).
    """
    problem = sha256_mismatch(path, expected, what)
    if problem is not None:
        raise error(problem)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Nothing half-written is ever visible under ``path``: on an exception the temporary file is removed.

    >>> with tempfile.TemporaryDirectory() as folder:
    ...     target = Path(folder) / "out.json"
    ...     with atomic_path(target) as tmp:
    ...         _ = tmp.write_text("{}")
    ...         print("inside:", target.exists())
    ...     print("after:", target.read_text(), [p.name for p in Path(folder).iterdir()])
    inside: False
    after: {} ['out.json']
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp makes 0600 files; artifacts should get the usual permissions
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
