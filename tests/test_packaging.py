"""What `pip install` gets: the declared dependencies are exactly what the
code imports, and the source distribution carries everything a build from
source needs (the C++/CUDA sources, the CMake project, the embedded model)."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"dfastllm", "server", "serve_process", "engine_harness", "http_harness", "asgi_driver",
        "model_reference", "tiny_tasks", "train_tiny", "_parity", "helpers", "op_count"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalise(re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0))


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _imported_modules(*folders: str) -> set[str]:
    """Dotted names of the absolute imports anywhere in these folders'
    modules (function-level imports too: a lazy import is still a dependency)."""
    names = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    # `from namespace import part`: the part says whose it is.
                    names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names
            if n.split(".")[0] not in sys.stdlib_module_names and n.split(".")[0] not in OURS
            and n != "__future__"}


def _distributions_of(modules: set[str]) -> dict[str, str]:
    """module -> the distribution it comes from. A top-level name that one
    distribution provides is that distribution's; a namespace package split
    between several (opentelemetry) is told apart by the file of the module's
    first regular package, found without importing it."""
    providers = importlib.metadata.packages_distributions()
    found = {}
    for module in sorted(modules):
        parts = module.split(".")
        candidates = sorted(set(providers.get(parts[0], [])))
        assert candidates, f"{module} is imported but no installed distribution provides it"
        if len(candidates) == 1:
            found[module] = _normalise(candidates[0])
            continue
        spec = next(s for depth in range(2, len(parts) + 1)
                    if (s := importlib.util.find_spec(".".join(parts[:depth]))) is not None
                    and s.origin not in (None, "namespace"))
        origin = Path(spec.origin).resolve()
        found[module] = next(_normalise(name) for name in candidates
                             if any(Path(importlib.metadata.distribution(name).locate_file(f)).resolve() == origin
                                    for f in importlib.metadata.distribution(name).files or ()))
    return found


def test_runtime_dependencies_are_exactly_what_the_package_imports():
    declared = {_requirement_name(r) for r in _pyproject()["project"]["dependencies"]}
    imported = _distributions_of(_imported_modules("dfastllm", "server"))
    assert set(imported.values()) == declared, (
        f"imported but undeclared: {sorted(set(imported.values()) - declared)}; "
        f"declared but never imported: {sorted(declared - set(imported.values()))}")


def test_the_test_extra_covers_what_only_the_tests_import():
    project = _pyproject()["project"]
    runtime = {_requirement_name(r) for r in project["dependencies"]}
    test_extra = {_requirement_name(r) for r in project["optional-dependencies"]["test"]}
    needed = set(_distributions_of(_imported_modules("tests")).values())
    assert needed <= runtime | test_extra, f"imported by tests, declared nowhere: {sorted(needed - runtime - test_extra)}"
    # Only the tests import these: they must not weigh on every install.
    assert not (test_extra & runtime), sorted(test_extra & runtime)


@pytest.fixture(scope="module")
def sdist_names(tmp_path_factory) -> set[str]:
    out = tmp_path_factory.mktemp("sdist")
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check",
                    "-o", str(out), str(ROOT)], check=True, capture_output=True, timeout=120)
    (archive,) = out.glob("dfastllm-*.tar.gz")
    with tarfile.open(archive) as tar:
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


def test_the_sdist_carries_the_source_build_and_the_embedded_model(sdist_names):
    tracked = subprocess.run(["git", "ls-files", "csrc", "dfastllm/assets"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert tracked, "git ls-files found no sources"
    for needed in ["CMakeLists.txt", "setup.py", "pyproject.toml", "README.md", *tracked]:
        assert needed in sdist_names, f"the sdist lacks {needed}"
    # Built artefacts of this checkout never travel: the sdist builds them anew.
    stray = [n for n in sdist_names if n.endswith(".so") or n.startswith("build/")]
    assert not stray, stray
