"""Unique segment names per test, and a check that no test leaves a
segment behind in /dev/shm."""

import os

import pytest

from dfastllm.ipc import new_base_name, remove_stale_segments

PREFIX = "dfastllm-test"


def leftovers(base: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(base)]


@pytest.fixture(scope="session", autouse=True)
def _clean_crashed_test_runs():
    remove_stale_segments(PREFIX)


@pytest.fixture
def base_name():
    base = new_base_name(PREFIX)
    yield base
    left = leftovers(base)
    for name in left:
        os.unlink(os.path.join("/dev/shm", name))
    assert not left, f"test leaked shared-memory segments: {left}"
