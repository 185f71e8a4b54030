"""How dfastllm.ops loads its extension: a clear ImportError (never a silent
fallback) when dfastllm._C is missing, no HTTP-side dependencies pulled in,
and a CUDA build wherever a GPU is present."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from dfastllm.ops import BUILT_WITH_CUDA


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def _import_ops_after(setup: str) -> subprocess.CompletedProcess:
    """Import dfastllm.ops in a fresh interpreter after `setup`; prints IMPORT-ERROR: <message> or IMPORTED."""
    return _python(setup + textwrap.dedent(
        """
        try:
            import dfastllm.ops
        except ImportError as exc:
            print("IMPORT-ERROR:", exc)
        else:
            print("IMPORTED")
        """))


def test_missing_extension_is_an_import_error_naming_the_rebuild():
    result = _import_ops_after(textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "dfastllm._C":
                    raise ImportError("simulated missing build")
        sys.meta_path.insert(0, Block())
        """))
    assert "IMPORT-ERROR:" in result.stdout, result.stdout + result.stderr
    assert "pip install -e . --no-build-isolation" in result.stdout
    assert "pip install ." in result.stdout


def test_ops_import_needs_no_http_side_packages():
    # The GPU check machine has torch but not the server's dependencies.
    result = _python(
        """
        import sys
        import dfastllm, dfastllm.ops
        heavy = {"falcon", "granian", "orjson", "pydantic", "transformers", "tokenizers"}
        print(sorted(heavy & {m.split(".")[0] for m in sys.modules}))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_gpu_machines_get_the_cuda_kernels():
    if torch.cuda.is_available() and os.environ.get("DFASTLLM_CPU_ONLY") != "1":
        assert BUILT_WITH_CUDA, "a GPU is present but dfastllm._C was built without CUDA"
    assert isinstance(BUILT_WITH_CUDA, bool)


def test_confidence_tables_agree():
    from dfastllm import _C
    from dfastllm.sampling_params import Remasking

    assert dict(_C.confidence_modes) == {mode.name.lower(): int(mode) for mode in Remasking}


def test_a_drifted_confidence_table_fails_the_import():
    result = _import_ops_after(textwrap.dedent(
        """
        from dfastllm import _C
        _C.confidence_modes = {**_C.confidence_modes, "margin": 3, "entropy": 2}
        """))
    assert "IMPORT-ERROR:" in result.stdout, result.stdout + result.stderr
    assert "Remasking" in result.stdout and "rebuild" in result.stdout
