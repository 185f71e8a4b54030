"""Compute ops per transformer layer per engine step, counted on the CPU.

A TorchDispatchMode sees every aten op the layers dispatch; views (a
transpose, a reshape that copies nothing) and allocations (`empty`) launch
no kernel and are not counted. Each call into our extension (dfastllm._C) is
one op. Counting runs a real EngineCore (kv_cache dual, then none) over a
tiny model of each family and attributes to "full" (a row over its whole canvas) or
"cached" steps by the engine's own statistics; only ops inside the
transformer blocks count (forward hooks), divided by the layer calls.

    python benchmarks/engine.py --count-ops     # prints the table per family
"""

from __future__ import annotations

import collections
import contextlib
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dfastllm import SamplingParams
from dfastllm.engine import EngineCore
from dfastllm.models import load_model
from dfastllm.ops import _extension
from dfastllm.testing import write_tiny_dream, write_tiny_llada

ALLOCATIONS = {"empty", "new_empty", "empty_like", "empty_strided"}
LAYER_BUDGET = 10  # issue #16: compute ops per layer per step


def _name(func) -> str:
    return func.overloadpacket.__name__


class OpCounter(TorchDispatchMode):
    """Counts compute ops while `active` (set by hooks around each block)."""

    def __init__(self):
        super().__init__()
        self.active = False
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.active and not func.is_view and _name(func) not in ALLOCATIONS and (
                func._schema.is_mutable or not _aliases(out, args)):
            self.counts[_name(func)] += 1
        return out


def _aliases(out, args) -> bool:
    """A reshape/contiguous that returned its input's storage copied nothing
    (an in-place op returns its input too, but counts: the caller checks)."""
    if not isinstance(out, torch.Tensor) or out.device.type == "meta":
        return False
    ptr = out.untyped_storage().data_ptr()
    return any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == ptr for a in args)


@contextlib.contextmanager
def _count_extension_calls(counter: OpCounter):
    """Each call into dfastllm._C counts as one op (under its own name)."""
    module = _extension._C
    originals = {name: getattr(module, name) for name in ("add_rms_norm", "rope_write_kv", "silu_mul",
                                                          "sample_tokens", "commit_tokens")}

    def counted(name, fn):
        def call(*args, **kwargs):
            if counter.active:
                counter.counts[f"_C.{name}"] += 1
            return fn(*args, **kwargs)
        return call
    for name, fn in originals.items():
        setattr(module, name, counted(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def count_layer_ops(loaded, *, kv_cache: str = "dual", prompt_len: int = 24, max_tokens: int = 32,
                    block_length: int = 16, batch_size: int = 2) -> dict[str, collections.Counter]:
    """-> {"full": ops per layer per full step, "cached": ... per cached step}."""
    core = EngineCore(loaded, kv_cache=kv_cache, max_batch_size=batch_size)
    params = SamplingParams(max_tokens=max_tokens, block_length=block_length, temperature=0.0, ignore_eos=True)
    for i in range(batch_size):
        core.add_request(f"count-{i}", [40 + (j % 50) for j in range(prompt_len)], params)
    counter = OpCounter()
    totals = {"full": collections.Counter(), "cached": collections.Counter()}
    layer_calls = {"full": 0, "cached": 0}
    calls = [0]

    def enter(module, args):
        counter.active = True
        calls[0] += 1

    def leave(module, args, output):
        counter.active = False
    hooks = [h for block in loaded.model.layers
             for h in (block.register_forward_pre_hook(enter), block.register_forward_hook(leave))]
    try:
        with _count_extension_calls(counter), counter:
            while core.has_unfinished():
                counter.counts.clear()
                calls[0] = 0
                core.step()
                kind = "full" if core.stats.last_step_full_rows else "cached"
                totals[kind] += counter.counts
                layer_calls[kind] += calls[0]
    finally:
        for h in hooks:
            h.remove()
    return {kind: collections.Counter({op: n / layer_calls[kind] for op, n in totals[kind].items()})
            for kind in totals if layer_calls[kind]}


def report() -> bool:
    """Prints the per-layer op table for LLaDA and Dream; -> all within the budget."""
    ok = True
    with tempfile.TemporaryDirectory() as d:
        models = {"llada": write_tiny_llada(f"{d}/llada", n_heads=4, n_kv_heads=4),
                  "dream (GQA)": write_tiny_dream(f"{d}/dream", n_heads=4, n_kv_heads=2)}
        for family, path in models.items():
            loaded = load_model(path, device="cpu")
            for kv_cache in ("dual", "none"):
                for kind, ops in count_layer_ops(loaded, kv_cache=kv_cache).items():
                    total = sum(ops.values())
                    ok &= total <= LAYER_BUDGET
                    table = ", ".join(f"{op} {n:g}" for op, n in ops.most_common())
                    print(f"{family:12} kv={kv_cache:<5} {kind:6} step: {total:g} compute ops per layer "
                          f"(budget {LAYER_BUDGET}): {table}")
    return ok
