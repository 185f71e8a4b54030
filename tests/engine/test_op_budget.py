"""Issue 16's op budget, held: a transformer layer of a full step and of a
cached step dispatches at most 10 compute ops (aten ops that launch work,
plus one per call into dfastllm._C), counted by benchmarks/op_count.py on
a real engine over tiny LLaDA and Dream (grouped heads) models."""

import pathlib
import sys

import pytest

from dfastllm.models import load_model
from dfastllm.testing import write_tiny_dream, write_tiny_llada

sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "benchmarks"))
from op_count import LAYER_BUDGET, count_layer_ops  # noqa: E402


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_layer_stays_within_the_op_budget(family, tmp_path):
    path = (write_tiny_llada(tmp_path, n_kv_heads=4) if family == "llada"
            else write_tiny_dream(tmp_path, n_heads=4, n_kv_heads=2))
    loaded = load_model(path)
    counts = {(kv_cache, kind): sum(ops.values())
              for kv_cache in ("dual", "none") for kind, ops in count_layer_ops(loaded, kv_cache=kv_cache).items()}
    assert set(counts) == {("dual", "full"), ("dual", "cached"), ("none", "full")}
    assert all(0 < n <= LAYER_BUDGET for n in counts.values()), counts
