"""SR data: image files, MATLAB bicubic, the benchmark test sets and random training patches.

- :mod:`.io`: ``read_image`` / ``write_image`` / ``to_uint8`` (float32 RGB in [0, 1]);
- :mod:`.imresize`: MATLAB-compatible bicubic ``imresize`` and the ``bicubic_degrade`` HR -> LR;
- :mod:`.benchmark`: ``benchmark_pairs`` / ``load_pair`` over ``<Set>/HR`` and ``<Set>/LR_bicubic/X<s>``;
- :mod:`.patches`: seeded ``PatchDataset`` / ``sample_patches``, ``list_images``, ``split_train_val``.
"""
from .benchmark import Pair, available_scales, available_sets, benchmark_pairs, load_pair
from .imresize import bicubic_degrade, imresize, mod_crop
from .io import ImageError, read_image, to_uint8, write_image
from .patches import PatchDataset, list_images, sample_patches, split_train_val

__all__ = [
    "ImageError", "Pair", "PatchDataset", "available_scales", "available_sets", "benchmark_pairs",
    "bicubic_degrade", "imresize", "list_images", "load_pair", "mod_crop", "read_image",
    "sample_patches", "split_train_val", "to_uint8", "write_image",
]
