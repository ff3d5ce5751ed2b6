"""CIFAR-10-C: the 19 common corruptions of Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations" (ICLR 2019), with the official CIFAR parameters of ``make_cifar_c.py``
(repository ``hendrycks/robustness``) for severities 1-5, on 32 x 32 x 3 uint8 images.

``corrupt(image, name, severity, seed=None)`` corrupts one image; ``corrupt_many(images, names, severities, seed)``
a test set, each image with its own generator (``SeedSequence(seed, spawn_key=(i,))``). The output is stored as
the official script stores CIFAR-10-C: ``np.uint8`` of the float output (truncation, not rounding).

What equals the official code and what does not (details in each family's module and in docs/corruptions.md):

* **Identical** (no random numbers; equal to the official outputs byte for byte on the reference cases of
  tests/data/cifar_c_reference.pt): gaussian_blur, defocus_blur, zoom_blur, contrast, brightness, saturate,
  jpeg_compression, pixelate.
* **The official recipe with numpy's Generator** (the official code draws from the legacy global ``np.random``,
  so values differ, statistics agree): gaussian_noise, shot_noise, impulse_noise, speckle_noise, glass_blur, fog,
  spatter, elastic_transform, snow, motion_blur, frost.
* **motion_blur and snow** call ImageMagick's motion blur through Wand in the official code; here it is a numpy
  re-implementation of ImageMagick's algorithm (:func:`.blur.imagemagick_motion_blur`), value for value equal to
  ImageMagick 6.9.11 Q16 for the same angle, so no system library is needed.
* **frost** blends crops of the official frost photographs, which finereg does not ship: set
  ``FINEREG_FROST_DIR`` to a folder holding ``frost1.png``, ``frost2.png``, ``frost3.png``, ``frost4.jpg``,
  ``frost5.jpg``; without it ``frost`` raises a :class:`~finereg._checks.FineregError` (no substitute is
  synthesized: a made-up frost would not be CIFAR-10-C). :func:`available_corruptions` lists what runs now.

The corruptions need SciPy, scikit-image, OpenCV and Pillow (``pip install 'finereg[train]'``), imported when a
corruption first runs; ``import finereg.corruptions`` needs numpy only.
"""

from .apply import (
    BENCHMARK_CORRUPTIONS,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
    available_corruptions,
    corrupt,
    corrupt_many,
    image_seed,
)

__all__ = [
    "CORRUPTIONS",
    "BENCHMARK_CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "SEVERITIES",
    "corrupt",
    "corrupt_many",
    "image_seed",
    "available_corruptions",
]
