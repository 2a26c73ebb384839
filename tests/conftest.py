import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def _gpu_available() -> bool:
    from onnxobq.backend import cupy_or_none
    return cupy_or_none() is not None


def pytest_collection_modifyitems(config, items):
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def flags():
    """Messages spelled with the command line's flags, as ``onnxobq`` (cli.main) spells them, for
    tests that call the library directly and check a message the command line shows."""
    from onnxobq.cli import FLAGS
    from onnxobq.errors import spelled_as
    with spelled_as(FLAGS):
        yield
