"""Random small models through `onnxobq quantize`: no tracebacks, only one-line refusals, and
outputs that pass onnx's checker, run in onnxruntime, stay finite and agree between fake and qdq.

Each seed is one model and one set of settings (tests/fuzzmodels.py), judged by
tests/fuzzcheck.py; ``python scripts/fuzz.py --seed S --count 1`` runs the same case, and
``--count 2000`` many more.
"""
import pytest

from fuzzcheck import check_case

SEEDS = range(60)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_model_quantizes_cleanly(tmp_path, seed):
    result = check_case(seed, 0, str(tmp_path), subprocess=seed % 20 == 0)   # 3 runs as `python -m onnxobq`
    assert not result.problems, "\n".join(result.line(p) for p in result.problems)
