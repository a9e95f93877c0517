"""The held-out split: which images go where, the crop and its bicubic LR, reuse, and refusals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from toolchain.data.heldout import make_heldout_split
from toolchain.data.imresize import imresize
from toolchain.data.io import read_image, to_uint8, write_image


def _images(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(folder / f"img{i:02d}.png")
        write_image(paths[-1], rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return paths


def test_the_last_images_by_name_are_held_out_as_centred_crops_with_bicubic_lr(tmp_path):
    paths = _images(tmp_path / "train", [(40, 50)] * 3 + [(36, 44), (60, 40)])
    calib, root = make_heldout_split(tmp_path / "train", tmp_path / "work", held_out=2, crop=32, scale=4)
    assert sorted(p.name for p in calib.iterdir()) == ["img00.png", "img01.png", "img02.png"]
    for path in paths[-2:]:
        source = to_uint8(read_image(path))
        hr = to_uint8(read_image(root / "Heldout" / "HR" / path.name))
        top, left = (source.shape[0] - 32) // 2, (source.shape[1] - 32) // 2
        np.testing.assert_array_equal(hr, source[top:top + 32, left:left + 32])
        lr = to_uint8(read_image(root / "Heldout" / "LR_bicubic" / "X4" / f"{path.stem}x4.png"))
        np.testing.assert_array_equal(lr, imresize(hr, 1 / 4))
    assert not any(p.name.startswith(".") for p in root.iterdir())  # no staging folder left


def test_a_complete_split_is_reused_and_bad_inputs_are_named(tmp_path):
    _images(tmp_path / "train", [(40, 40)] * 3)
    calib, root = make_heldout_split(tmp_path / "train", tmp_path / "work", held_out=1, crop=32)
    marker = root / "Heldout" / "HR" / "img02.png"
    stamp = marker.stat().st_mtime_ns
    assert make_heldout_split(tmp_path / "train", tmp_path / "work", held_out=1, crop=32) == (calib, root)
    assert marker.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="need more than 3"):
        make_heldout_split(tmp_path / "train", tmp_path / "w2", held_out=3, crop=32)
    with pytest.raises(ValueError, match="smaller than the held-out crop 48"):
        make_heldout_split(tmp_path / "train", tmp_path / "w3", held_out=1, crop=48)
    with pytest.raises(ValueError, match="not a multiple of the scale 4"):
        make_heldout_split(tmp_path / "train", tmp_path / "w4", held_out=1, crop=30)


def _split_in_process(train: str, work: str, barrier, results) -> None:
    barrier.wait()  # all start together
    calib, root = make_heldout_split(Path(train), Path(work), held_out=4, crop=128, scale=4)
    results.put((str(calib), str(root)))


def test_processes_making_the_same_split_at_once_all_get_it_complete(tmp_path):
    """Two ablation runs started together on an empty work folder used to share one staging folder, and
    one of them failed; now each stages its own and the first complete split wins."""
    import multiprocessing

    paths = _images(tmp_path / "train", [(192, 192)] * 10)
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_split_in_process, args=(str(tmp_path / "train"), str(tmp_path / "work"),
                                                                 barrier, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0] * 4
    splits = [results.get(timeout=5) for _ in workers]
    calib, root = Path(splits[0][0]), Path(splits[0][1])
    assert all(split == splits[0] for split in splits)
    assert sorted(p.name for p in calib.iterdir()) == [p.name for p in paths[:-4]]
    for path in paths[-4:]:
        hr = to_uint8(read_image(root / "Heldout" / "HR" / path.name))
        np.testing.assert_array_equal(hr, to_uint8(read_image(path))[32:160, 32:160])
        lr = to_uint8(read_image(root / "Heldout" / "LR_bicubic" / "X4" / f"{path.stem}x4.png"))
        np.testing.assert_array_equal(lr, imresize(hr, 1 / 4))
    assert not any(p.name.startswith(".") for p in root.iterdir())  # no staging folder left


def test_a_refused_split_leaves_no_staging_folder(tmp_path):
    _images(tmp_path / "train", [(40, 40)] * 2 + [(20, 20)])
    with pytest.raises(ValueError, match="smaller than the held-out crop"):
        make_heldout_split(tmp_path / "train", tmp_path / "work", held_out=1, crop=32)
    assert not any((tmp_path / "work" / "heldout").iterdir())


def test_the_leftover_of_an_interrupted_split_is_replaced(tmp_path):
    _images(tmp_path / "train", [(40, 40)] * 3)
    leftover = tmp_path / "work" / "heldout" / "Heldout" / "HR"
    leftover.mkdir(parents=True)
    (leftover / "stale.png").write_bytes(b"not an image")
    _, root = make_heldout_split(tmp_path / "train", tmp_path / "work", held_out=1, crop=32)
    assert sorted(p.name for p in (root / "Heldout" / "HR").iterdir()) == ["img02.png"]
    assert (root / "Heldout" / "LR_bicubic" / "X4" / "img02x4.png").is_file()
