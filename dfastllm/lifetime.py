"""Child processes that end with their parent.

Every process of a server run is somebody's child: the engine and Granian
the supervisor's, the HTTP workers Granian's. A child that outlives its
parent keeps what it holds: an orphaned HTTP worker keeps the listening
port and answers probes for a server that is gone, and the next start
cannot bind. Linux's parent-death signal ends it instead.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Have the kernel send `signum` to this process when its parent dies;
    at once if the parent died before this call (this process was then
    already handed to another)."""
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)
