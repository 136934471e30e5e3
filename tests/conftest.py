"""Test configuration: 8 virtual CPU devices, set before jax is imported."""

import atexit
import importlib.util
import os
import pathlib
import shutil
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# One compilation cache for the session, removed at the end (never the user's
# ~/.cache/repeat_scaling/jax): the trainers and evaluators the tests start use it, and so
# does this process (JAX's own variable), where tests train the same shapes many times.
_JAX_CACHE = tempfile.mkdtemp(prefix="repeat_scaling_test_jax_cache_")
os.environ.setdefault("REPEAT_SCALING_COMPILATION_CACHE", _JAX_CACHE)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _JAX_CACHE)
atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)

# TensorFlow >= 2.20 wheels load their LLVM with RTLD_GLOBAL, and a triton (>= 3.7) loaded
# after that segfaults (tensorflow/tensorflow#124205). triton comes with the CUDA torch
# build (PyPI's torch, e.g. on Python 3.12, where no CPU wheel is local) and is imported by
# transformers, after test_seqio_tasks.py's collection has loaded TensorFlow: load it first.
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get("REPEAT_SCALING_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")
)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The small real corpora in ../shared/data (skips when absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test corpora not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory):
    """The built-in corpus prepared once with the byte vocabulary (tests copy it before
    changing it)."""
    from repeat_scaling.prepare import prepare_store

    out = tmp_path_factory.mktemp("store") / "builtin-byte"
    prepare_store("builtin", "byte", str(out), progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def c4_byte_store(shared_data, tmp_path_factory):
    """The shared C4 sample (allenai json.gz) prepared once with the byte vocabulary."""
    from repeat_scaling.prepare import prepare_store

    return prepare_store(
        f"json:{shared_data}/c4-en-sample/c4-*.json.gz",
        "byte",
        tmp_path_factory.mktemp("c4store"),
        progress=False,
        log=lambda *a: None,
    )
