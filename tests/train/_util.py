"""Helpers shared by the engine tests."""

import hashlib
from pathlib import Path


def digest(folder: Path) -> dict[str, str]:
    """The md5 of each file directly in ``folder``, by name (to show that a failed command changed nothing)."""
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def png(path: Path, value: int, size: tuple[int, int] = (12, 10)) -> None:
    """A small solid-colour RGB PNG."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, val_per_class: int | None = None) -> None:
    """An ImageFolder root with train/ and val/ holding ``per_class`` (``val_per_class``) images per class."""
    for split, n in (("train", per_class), ("val", val_per_class or per_class)):
        for c, name in enumerate(classes):
            for i in range(n):
                png(root / split / name / f"{i}.png", (40 * c + 10 * i) % 256)
