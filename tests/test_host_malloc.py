"""host_malloc: big blocks come from the heap (no per-allocation mmap) once configured."""

import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# Allocates a 256 MB block with libc malloc from a new thread (XLA's workers allocate
# from their own threads) and reports how many mmapped blocks glibc added for it.
PROBE = textwrap.dedent(
    """
    import ctypes, json, sys, threading
    from repeat_scaling import host_malloc

    applied = host_malloc.configure()

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    libc.mallinfo2.restype = MallInfo2
    out = {}

    def work():
        before = libc.mallinfo2().hblks
        p = libc.malloc(256 << 20)
        ctypes.memset(p, 1, 256 << 20)
        out["hblks"] = libc.mallinfo2().hblks - before
        libc.free(p)
        out["heap_kept"] = libc.mallinfo2().arena >= 256 << 20  # not trimmed
        q = libc.malloc(256 << 20)  # served again from the kept heap
        out["reused"] = p == q
        libc.free(q)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    print(json.dumps({"applied": applied, **out}))
    """
)


def _probe(env_value: str | None) -> dict:
    import json
    import os

    env = dict(os.environ)
    env.pop("REPEAT_SCALING_MALLOC", None)
    if env_value is not None:
        env["REPEAT_SCALING_MALLOC"] = env_value
    r = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_configured_big_blocks_stay_in_the_heap():
    got = _probe(None)
    assert got["applied"] is True
    assert got["hblks"] == 0  # not an mmap of its own
    assert got["heap_kept"] is True  # freeing it did not give the pages back
    assert got["reused"] is True  # freed and handed out again without a new mapping


def test_opt_out_leaves_glibc_defaults():
    got = _probe("default")
    assert got["applied"] is False
    assert got["hblks"] == 1  # glibc's default: a 256 MB block is its own mmap
