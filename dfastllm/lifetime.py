"""How the supervisor's children live and die.

Every process of a server run is somebody's child: the engine and Granian
the supervisor's, the HTTP workers Granian's. Three rules hold for them:

- A child ends with its parent. One that outlived it would keep what it
  holds: an orphaned HTTP worker keeps the listening port and answers
  probes for a server that is gone, and the next start cannot bind.
  Linux's parent-death signal ends it instead (`die_with_parent`), and a
  direct child of a supervisor that died removes the run's shared-memory
  segments as it exits (`supervisor_gone`; the supervisor, killed, could not).
- A child runs the code its supervisor runs. The supervisor starts it in
  the folder that holds its own `dfastllm` and `server` packages and names
  that folder in $DFASTLLM_PACKAGE_ROOT; `import dfastllm` in a child
  checks it (`check_package_root`), so a child that found other copies
  (a source checkout without its compiled modules, an older install) stops
  with a message naming both instead of failing in some later import.
- A child that cannot start for a reason a restart cannot cure (a bad
  checkpoint, the wrong package) says why in $DFASTLLM_FAILURE_FILE and
  exits EXIT_CANNOT_START (`cannot_start`); the supervisor then stops at
  once with that message instead of restarting it.

Torch-free, and free of dfastllm imports: `import dfastllm` runs it first.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import NoReturn

PACKAGE_ROOT_ENV = "DFASTLLM_PACKAGE_ROOT"  # the folder holding the supervisor's dfastllm/ and server/
SUPERVISOR_PID_ENV = "DFASTLLM_SUPERVISOR_PID"
FAILURE_FILE_ENV = "DFASTLLM_FAILURE_FILE"  # where a child says why it cannot start
EXIT_CANNOT_START = os.EX_CONFIG  # 78: restarting cannot help

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Have the kernel send `signum` to this process when its parent dies;
    at once if the parent died before this call (this process was then
    already handed to another)."""
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)


def supervisor_gone() -> bool:
    """In a direct child of `dfastllm serve`: whether the supervisor died
    (this process was handed to another parent). False outside a server run."""
    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    return bool(supervisor) and os.getppid() != int(supervisor)


def check_package_root(package: str, package_file: str) -> None:
    """In a child of `dfastllm serve`: `package` (imported from
    `package_file`) must come from the supervisor's folder; else
    `cannot_start`, naming both. Nothing outside a server run."""
    expected = os.environ.get(PACKAGE_ROOT_ENV)
    if not expected:
        return
    found = os.path.dirname(os.path.dirname(os.path.abspath(package_file)))
    if os.path.realpath(found) != os.path.realpath(expected):
        cannot_start(f"this process imported {package} from {os.path.join(found, package)}, but the supervisor "
                     f"runs the one in {os.path.join(expected, package)}; check PYTHONPATH and the current "
                     "folder for another copy of dfastllm")


def report_cannot_start(message: str) -> None:
    """Leave `message` where the supervisor reads why this child cannot start."""
    path = os.environ.get(FAILURE_FILE_ENV)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(message)


def cannot_start(message: str) -> NoReturn:
    """Stop this child for good: `message` to stderr and to the supervisor,
    exit EXIT_CANNOT_START (no restart follows)."""
    print(f"dfastllm: {message}", file=sys.stderr, flush=True)
    report_cannot_start(message)
    raise SystemExit(EXIT_CANNOT_START)
