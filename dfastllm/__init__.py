"""dfastllm: a server for masked-diffusion language models.

Importing the package stays torch-free (the HTTP workers import it); the
offline API (`LLM`) pulls in torch only when first touched.

`import dfastllm` checks its compiled modules (dfastllm._C: the kernels,
dfastllm._ipc: the shared-memory rings) first, so that a missing or broken
build is one ImportError naming the module, the reason and the command that
rebuilds it, not a failure deep inside a later import: `_ipc` is loaded (every
process of a server needs it), `_C` is looked for (loading it is left to the
processes that run kernels; `load_extension`). In a child of `dfastllm
serve` it first checks that this is the supervisor's copy of the package
(see `dfastllm.lifetime`).
"""

import importlib
import importlib.machinery
import importlib.util
import os

from dfastllm.lifetime import check_package_root

check_package_root("dfastllm", __file__)

__version__ = "0.1.0"
API_VERSIONS = ("1",)

__all__ = ["LLM", "ExtensionError", "Remasking", "SamplingParams", "__version__", "load_extension"]


class ExtensionError(ImportError):
    """A compiled module of dfastllm cannot be loaded; the message says
    which, why, and how to rebuild it."""


def load_extension(name: str):
    """The compiled module `dfastllm.<name>` ("_C" or "_ipc"), or ExtensionError."""
    _check_built(name)
    try:
        return importlib.import_module(f"dfastllm.{name}")
    except ImportError as error:
        raise ExtensionError(_explain(name, f"{type(error).__name__}: {error}")) from error


def _check_built(name: str) -> None:
    """ExtensionError unless a build of `dfastllm.<name>` for this Python lies
    beside this file (it is not loaded). One found elsewhere (an editable
    install's finder maps the name to another checkout) is not this package's."""
    try:
        spec = importlib.util.find_spec(f"dfastllm.{name}")
    except ImportError as error:
        raise ExtensionError(_explain(name, f"{type(error).__name__}: {error}")) from error
    here = os.path.dirname(os.path.realpath(__file__))
    if spec is None or os.path.dirname(os.path.realpath(spec.origin)) != here:
        raise ExtensionError(_explain(name, "it is not built for this Python" + _other_builds(name)))


def _other_builds(name: str) -> str:
    """Which builds of `name` lie beside this file, if any (another Python's, say)."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    found = sorted(f for f in os.listdir(package_dir) if f.startswith(name + ".") and not f.endswith(".py"))
    wanted = importlib.machinery.EXTENSION_SUFFIXES[0]
    return (f" (found {', '.join(found)}; this Python loads {name}{wanted})" if found
            else f" ({package_dir} has no {name}{wanted})")


def _explain(name: str, why: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "setup.py")):  # a source checkout, used in place
        rebuild = (f"`pip install -e . --no-build-isolation` in {root} (to use the checkout in place) or "
                   "`pip install .` there (to install it)")
    else:
        rebuild = "`pip install .` from dfastllm's source folder (or reinstall the wheel) with this Python"
    return (f"dfastllm's compiled module dfastllm.{name} cannot be loaded: {why}. Rebuild it with {rebuild}; "
            "DFASTLLM_CPU_ONLY=1 skips the CUDA kernels")


load_extension("_ipc")
_check_built("_C")

from dfastllm.sampling_params import Remasking, SamplingParams  # noqa: E402 (after the checks)


def __getattr__(name: str):
    if name == "LLM":
        from dfastllm.llm import LLM

        return LLM
    raise AttributeError(f"module 'dfastllm' has no attribute {name!r}")
