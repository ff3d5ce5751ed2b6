"""finereg.corruptions' public API: the names, argument checks, corrupt_many's per-image seeds, frost's folder,
lazy imports and the docs page's example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import finereg.corruptions as fc
from finereg._checks import FineregError, FineregTypeError, MissingDependencyError, UnknownNameError
from finereg.corruptions import corrupt, corrupt_many, image_seed

pytest.importorskip("cv2")
pytest.importorskip("skimage")

DOCS = Path(__file__).resolve().parents[2] / "docs" / "corruptions.md"


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)


def test_the_official_names():
    assert len(fc.BENCHMARK_CORRUPTIONS) == 15 and len(fc.EXTRA_CORRUPTIONS) == 4
    assert fc.CORRUPTIONS == fc.BENCHMARK_CORRUPTIONS + fc.EXTRA_CORRUPTIONS
    assert fc.EXTRA_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert fc.BENCHMARK_CORRUPTIONS[:3] == ("gaussian_noise", "shot_noise", "impulse_noise")
    assert isinstance(fc.CORRUPTIONS, tuple) and len(set(fc.CORRUPTIONS)) == 19


def test_argument_checks(images):
    image = images[0]
    with pytest.raises(UnknownNameError, match="gaussian_noise.*the corruptions are: gaussian_noise, shot_noise"):
        corrupt(image, "gausian_noise", 1)
    for bad in (0, 6, 2.5, True):
        with pytest.raises(FineregError, match="severity"):
            corrupt(image, "contrast", bad)
    assert np.array_equal(corrupt(image, "contrast", 2.0), corrupt(image, "contrast", 2))
    with pytest.raises(FineregTypeError, match="uint8"):
        corrupt(image.astype(np.float32), "contrast", 1)
    with pytest.raises(FineregTypeError, match="numpy uint8 array"):
        corrupt(image.tolist(), "contrast", 1)
    with pytest.raises(FineregError, match="32 x 32 x 3.*got shape \\(28, 28, 3\\)"):
        corrupt(image[:28, :28], "contrast", 1)
    with pytest.raises(FineregError, match="shape"):
        corrupt(image[..., 0], "contrast", 1)
    for seed in (-1, 1.5, "0", True):
        with pytest.raises(FineregTypeError, match="seed"):
            corrupt(image, "gaussian_noise", 1, seed=seed)
    with pytest.raises(FineregError, match="N x 32 x 32 x 3"):
        corrupt_many(image, "contrast", 1, seed=0)
    with pytest.raises(FineregError, match="one entry per image \\(6\\), got 2"):
        corrupt_many(images, ["contrast", "fog"], 1, seed=0)
    with pytest.raises(FineregError, match="severities\\[1\\]"):
        corrupt_many(images, "contrast", [1, 7, 1, 1, 1, 1], seed=0)
    with pytest.raises(UnknownNameError):
        corrupt_many(images, ["contrast"] * 5 + ["nope"], 1, seed=0)
    with pytest.raises(FineregTypeError, match="seed"):
        corrupt_many(images, "contrast", 1, seed=None)


def test_corrupt_many_seeds_each_image_on_its_own(images):
    names = ["gaussian_noise", "glass_blur", "snow", "contrast", "elastic_transform", "spatter"]
    severities = np.array([5, 4, 3, 2, 1, 5])
    out = corrupt_many(images, names, severities, seed=123)
    assert out.dtype == np.uint8 and out.shape == images.shape
    for i in range(6):
        np.testing.assert_array_equal(out[i], corrupt(images[i], names[i], int(severities[i]), seed=image_seed(123, i)))
    # image i does not depend on the others: a prefix gives the same first images
    np.testing.assert_array_equal(corrupt_many(images[:2], names[:2], severities[:2], seed=123), out[:2])
    np.testing.assert_array_equal(corrupt_many(images, names, severities, seed=123), out)
    assert not np.array_equal(corrupt_many(images, names, severities, seed=124)[0], out[0])
    children = np.random.SeedSequence(123).spawn(6)
    for i in range(6):
        np.testing.assert_array_equal(image_seed(123, i).generate_state(4), children[i].generate_state(4))


def test_corrupt_many_broadcasts_one_name_and_severity(images):
    one = corrupt_many(images, "shot_noise", 2, seed=5)
    np.testing.assert_array_equal(one, corrupt_many(images, ["shot_noise"] * 6, [2] * 6, seed=5))
    assert corrupt_many(images[:0], "shot_noise", 2, seed=5).shape == (0, 32, 32, 3)


def test_unseeded_calls_draw_fresh_noise(images):
    assert not np.array_equal(corrupt(images[0], "gaussian_noise", 3), corrupt(images[0], "gaussian_noise", 3))


def test_frost_without_photographs(images, monkeypatch, tmp_path):
    monkeypatch.delenv("FINEREG_FROST_DIR", raising=False)
    with pytest.raises(FineregError, match="FINEREG_FROST_DIR.*frost1.png"):
        corrupt(images[0], "frost", 1, seed=0)
    with pytest.raises(FineregError, match="FINEREG_FROST_DIR"):
        corrupt_many(images, ["contrast"] * 5 + ["frost"], 1, seed=0)
    assert "frost" not in fc.available_corruptions() and len(fc.available_corruptions()) == 18
    monkeypatch.setenv("FINEREG_FROST_DIR", str(tmp_path))
    with pytest.raises(FineregError, match="lacks the frost photographs frost1.png"):
        corrupt(images[0], "frost", 1, seed=0)


def test_frost_with_photographs(images, monkeypatch, tmp_path):
    import cv2

    from finereg.corruptions.weather import FROST, FROST_FILES

    rng = np.random.default_rng(1)
    for k, name in enumerate(FROST_FILES):
        cv2.imwrite(str(tmp_path / name), np.full((200 + 10 * k, 240, 3), 40 * k, dtype=np.uint8))
    monkeypatch.setenv("FINEREG_FROST_DIR", str(tmp_path))
    assert fc.available_corruptions() == fc.CORRUPTIONS
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    for severity in range(1, 6):
        a, b = FROST[severity - 1]
        out = corrupt(image, "frost", severity, seed=severity)
        np.testing.assert_array_equal(out, corrupt(image, "frost", severity, seed=severity))
        # each photograph is one flat grey 40·k (k < 5: frost6 is never drawn): the blend with one of them
        blends = [np.uint8(np.clip(a * image + b * 40 * k, 0, 255)) for k in range(5)]
        assert any(np.array_equal(out, blend) for blend in blends)
    seen = {int(corrupt(np.zeros_like(image), "frost", 1, seed=s)[0, 0, 0]) for s in range(40)}
    assert seen == {int(0.2 * 40 * k) for k in range(5)}


def test_import_is_light():
    code = (
        "import sys; import finereg.corruptions; "
        "heavy = {'cv2', 'skimage', 'scipy', 'PIL'} & {m.split('.')[0] for m in sys.modules}; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_library_names_the_install(images, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    with pytest.raises(MissingDependencyError, match="pip install .*opencv-python-headless"):
        corrupt(images[0], "defocus_blur", 1)


def test_docs_page_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert blocks
    for i, code in enumerate(blocks):
        exec(compile(code, f"corruptions.md[{i}]", "exec"), {"__name__": f"doc_{i}"})
