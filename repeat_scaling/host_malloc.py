"""Keep XLA:CPU's per-step host buffers in the heap instead of fresh mmaps every step.

XLA:CPU allocates each execution's temporary buffer (1.7 GB for ``configs/bench.py:
t5_peer``) and its outputs with ``malloc`` from its worker threads. With glibc's
defaults those threads use their own arenas, where any block above 32 MB is a fresh
``mmap``: it is unmapped when the step ends and every page of the next step's buffer
faults in again (the kernel zeroes it first). Measured on the 2-core CPU: a fifth of all
CPU cycles in the kernel, the t5_peer step 2.95 s; with the settings below 2.40 s.

:func:`configure` sets, through ``mallopt``, before jax starts its thread pools:

* ``M_ARENA_MAX = 1``: every thread allocates from the main (brk) heap;
* ``M_MMAP_MAX = 0``: no allocation is served by its own ``mmap``;
* ``M_TRIM_THRESHOLD = -1``: the heap is never trimmed, so freed memory is kept for the
  next step instead of being returned to the kernel and faulted in again.

The cost is a resident size that stays at its peak, which a training or evaluation
process reaches anyway. Only glibc Linux is touched; ``REPEAT_SCALING_MALLOC=default``
in the environment leaves the allocator alone. Call it first thing in an entry point:
threads that already allocated keep their arenas.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV = "REPEAT_SCALING_MALLOC"

# glibc <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))

_configured: bool | None = None


def configure() -> bool:
    """Apply :data:`SETTINGS` once per process; returns whether they are in effect."""
    global _configured
    if _configured is not None:
        return _configured
    _configured = False
    if os.environ.get(ENV, "").strip().lower() in ("default", "0", "off", "false"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _configured = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    return _configured
