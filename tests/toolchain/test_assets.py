"""What the project ships: every file listed with its checksum, none over 5 MB, no test image in calibration."""
from __future__ import annotations

import hashlib

from toolchain.defaults import ASSETS, DEFAULT_CALIB_IMAGES, DEFAULT_DATA

MAX_BYTES = 5_000_000


def test_every_shipped_file_matches_its_checksum_and_is_small() -> None:
    listed = dict(reversed(line.split("  ", 1)) for line in (ASSETS / "SHA256SUMS").read_text().splitlines())
    files = {p.relative_to(ASSETS).as_posix(): p for p in ASSETS.rglob("*")
             if p.is_file() and p.name not in ("SHA256SUMS", "README.md")}
    assert set(listed) == set(files)
    for name, path in files.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == listed[name], name
        assert path.stat().st_size <= MAX_BYTES, name


def test_calibration_images_are_not_evaluation_images() -> None:
    def digests(folder):
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.png")}

    calibration = digests(DEFAULT_CALIB_IMAGES)
    assert len(calibration) == 28
    assert not calibration & digests(DEFAULT_DATA)
