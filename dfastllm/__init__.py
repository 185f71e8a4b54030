"""dfastllm: a server for masked-diffusion language models.

Importing the package stays torch-free (the HTTP workers import it); the
offline API (`LLM`) pulls in torch only when first touched.
"""

from dfastllm.sampling_params import Remasking, SamplingParams

__version__ = "0.1.0"
API_VERSIONS = ("1",)

__all__ = ["LLM", "Remasking", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from dfastllm.llm import LLM

        return LLM
    raise AttributeError(f"module 'dfastllm' has no attribute {name!r}")
