"""Where the trainer and the evaluator keep JAX's persistent compilation cache."""

import jax
import pytest

from repeat_scaling import compilation_cache


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in (compilation_cache.ENV, "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    old = jax.config.jax_compilation_cache_dir
    yield tmp_path
    jax.config.update("jax_compilation_cache_dir", old)


def test_default_place_then_variables_then_flag(clean_env, monkeypatch):
    tmp = clean_env
    assert compilation_cache.directory() == str(tmp / "xdg" / "repeat_scaling" / "jax")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp / "jax"))
    assert compilation_cache.directory() == str(tmp / "jax")
    monkeypatch.setenv(compilation_cache.ENV, str(tmp / "ours"))
    assert compilation_cache.directory() == str(tmp / "ours")
    assert compilation_cache.directory(str(tmp / "flag")) == str(tmp / "flag")
    monkeypatch.setenv(compilation_cache.ENV, "off")
    assert compilation_cache.directory() is None
    assert compilation_cache.directory(str(tmp / "flag")) == str(tmp / "flag")


def test_configure_points_jax_at_it_or_turns_it_off(clean_env):
    tmp = clean_env
    assert compilation_cache.configure(str(tmp / "c")) == str(tmp / "c")
    assert jax.config.jax_compilation_cache_dir == str(tmp / "c")
    assert compilation_cache.configure("off") is None
    assert jax.config.jax_compilation_cache_dir is None
