"""Triton's cache (compiled kernels, launcher libraries it imports unchecked) is a folder only the user can write.

`gmbench.backends.triton_cache`: the default is a 0700 folder inside gmbench's private kernel
folder; a TRITON_CACHE_DIR or TRITON_HOME that others could change is refused with one warning
line and the private default is used; with no private folder at all the fused backend says why
it cannot run. The last test compiles a kernel in a fresh process and looks where Triton wrote.
"""

import logging
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from gmbench import backends
from gmbench.backends import fused, native, triton_cache
from gmbench.errors import GmbenchError, PluginError

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs POSIX permissions (Linux)")

VARIABLES = (triton_cache.CACHE_DIR_ENV, triton_cache.HOME_ENV, native.KERNEL_DIR_ENV, "HOME", "XDG_CACHE_HOME")


@pytest.fixture
def isolated(tmp_path):
    """HOME and the cache variables in tmp_path; the environment and Triton's knobs restored afterwards."""
    saved = {name: os.environ.get(name) for name in VARIABLES}
    knobs = getattr(sys.modules.get("triton"), "knobs", None)
    saved_knobs = dict(knobs.cache.__dict__) if knobs is not None else None
    home = tmp_path / "home"
    (home / ".cache").mkdir(parents=True)
    for name in VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    triton_cache.prepare_cache.cache_clear()
    yield tmp_path
    triton_cache.prepare_cache.cache_clear()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if knobs is not None:
        knobs.cache.__dict__.clear()
        knobs.cache.__dict__.update(saved_knobs)


def cache_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "gmbench.backends" and r.levelno >= logging.WARNING]


def world_writable_folder(path):
    path.mkdir(parents=True)
    os.chmod(path, 0o777)
    return path


def assert_private_folder_of_the_user(path):
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.geteuid()


def test_default_cache_is_a_0700_folder_of_the_user_beside_the_native_kernels(isolated, caplog):
    with caplog.at_level(logging.WARNING, logger="gmbench.backends"):
        assert triton_cache.configure_cache() is None
    folder = native.kernel_dir() / "triton"
    assert os.environ[triton_cache.CACHE_DIR_ENV] == str(folder)
    assert_private_folder_of_the_user(folder)
    assert_private_folder_of_the_user(folder.parent)  # created 0700 too, not by a parents=True mkdir
    assert not cache_warnings(caplog)


def test_default_is_also_what_triton_reads(isolated):
    triton = pytest.importorskip("triton")
    if not hasattr(triton, "knobs"):
        pytest.skip("triton < 3.4 has no knobs; it reads TRITON_CACHE_DIR from the environment")
    # A value set in Python wins over the environment in Triton: it is replaced too.
    triton.knobs.cache.dir = str(world_writable_folder(isolated / "set-in-python"))
    os.environ.pop(triton_cache.CACHE_DIR_ENV)
    assert triton_cache.configure_cache() is None
    assert triton.knobs.cache.dir == str(native.kernel_dir() / "triton")


def test_world_writable_triton_cache_dir_is_refused_with_one_warning_line(isolated, caplog):
    shared = world_writable_folder(isolated / "shared" / "triton")
    os.environ[triton_cache.CACHE_DIR_ENV] = str(shared)
    with caplog.at_level(logging.WARNING, logger="gmbench.backends"):
        assert triton_cache.prepare_cache() is None
        assert triton_cache.prepare_cache() is None  # decided once per process: still one warning
    (message,) = cache_warnings(caplog)
    assert "\n" not in message
    assert f"TRITON_CACHE_DIR={shared}" in message and "writable by group or others (mode 0777)" in message
    assert native.KERNEL_DIR_ENV not in message  # the advice names the variable that chose the folder
    default = native.kernel_dir() / "triton"
    assert message.endswith(f"compiling into {default} instead")
    assert os.environ[triton_cache.CACHE_DIR_ENV] == str(default)
    assert_private_folder_of_the_user(default)


@pytest.mark.parametrize("damage", ["symlink", "parent writable by others", "not a folder"])
def test_other_unsafe_triton_cache_dirs_are_refused(isolated, caplog, damage):
    private = isolated / "private"
    private.mkdir(mode=0o700)
    if damage == "symlink":
        requested = isolated / "link"
        requested.symlink_to(private)
    elif damage == "parent writable by others":
        requested = world_writable_folder(isolated / "open") / "cache"
    else:
        requested = isolated / "file"
        requested.write_text("not a folder")
    os.environ[triton_cache.CACHE_DIR_ENV] = str(requested)
    with caplog.at_level(logging.WARNING, logger="gmbench.backends"):
        assert triton_cache.configure_cache() is None
    (message,) = cache_warnings(caplog)
    assert str(requested) in message
    assert os.environ[triton_cache.CACHE_DIR_ENV] == str(native.kernel_dir() / "triton")


def test_private_triton_cache_dir_is_used_as_is_and_created_0700_if_missing(isolated, caplog):
    requested = isolated / "mine" / "triton-cache"
    os.environ[triton_cache.CACHE_DIR_ENV] = str(requested)
    with caplog.at_level(logging.WARNING, logger="gmbench.backends"):
        assert triton_cache.configure_cache() is None
    assert os.environ[triton_cache.CACHE_DIR_ENV] == str(requested)
    assert_private_folder_of_the_user(requested)
    assert not (native.kernel_dir() / "triton").exists()
    assert not cache_warnings(caplog)


def test_triton_home_is_checked_where_triton_puts_its_cache(isolated, caplog):
    home = isolated / "triton-home"
    world_writable_folder(home / ".triton" / "cache")
    os.environ[triton_cache.HOME_ENV] = str(home)
    with caplog.at_level(logging.WARNING, logger="gmbench.backends"):
        assert triton_cache.configure_cache() is None
    (message,) = cache_warnings(caplog)
    assert f"TRITON_HOME={home / '.triton' / 'cache'}" in message and "or set TRITON_HOME" in message
    assert os.environ[triton_cache.CACHE_DIR_ENV] == str(native.kernel_dir() / "triton")


def test_without_any_private_folder_the_fused_backend_says_why(isolated, monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed (pip install 'gmbench[fused]')")
    os.environ[native.KERNEL_DIR_ENV] = str(world_writable_folder(isolated / "kernels"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the CUDA check, to the cache
    with pytest.raises(PluginError) as raised:
        backends.check("fused")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("backend 'fused' cannot run here: no private folder for Triton's compiled kernels")
    assert f"run `chmod 700 {isolated / 'kernels'}`" in message
    assert triton_cache.CACHE_DIR_ENV not in os.environ  # Triton is not pointed at the unsafe folder
    with pytest.raises(GmbenchError, match="no private folder for Triton"):
        fused._kernels()  # a backend built before the folder went bad still compiles nothing


def test_interpreter_needs_no_cache_folder(isolated, monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed (pip install 'gmbench[fused]')")
    os.environ[native.KERNEL_DIR_ENV] = str(world_writable_folder(isolated / "kernels"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused.FusedBackend.unavailable_reason() is None
    assert triton_cache.CACHE_DIR_ENV not in os.environ


COMPILE_AFTER_PREPARE = textwrap.dedent(
    r"""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from gmbench.backends import triton_cache, triton_kernels as k  # triton is imported now

    assert triton_cache.prepare_cache() is None
    P, I, C = "*fp32", "i32", "constexpr"
    signature = {"DATA": P, "KERNELS": P, "OUT": P, "F_i": I, "N_i": I, "N_k": I, "F_o": I, "K": I, "BLOCK": C, "KP": C}
    source = ASTSource(k.convolve_kernel, signature, constexprs={"BLOCK": 64, "KP": 16})
    triton.compile(source, target=GPUTarget("cuda", 80, 32))
    """
)


def test_triton_writes_its_cache_only_into_the_private_folder(isolated):
    # A fresh process without TRITON_INTERPRET compiles a kernel for sm_80 (no GPU needed):
    # Triton caches it where the checked export points, never in the refused shared folder.
    pytest.importorskip("triton", reason="triton is not installed (pip install 'gmbench[fused]')")
    shared = world_writable_folder(isolated / "shared-triton-cache")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env[triton_cache.CACHE_DIR_ENV] = str(shared)
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_AFTER_PREPARE], capture_output=True, text=True, env=env, timeout=600
    )
    missing_backend = "No module named 'triton.backends.nvidia'" in result.stderr
    missing_ptxas = "ptxas" in result.stderr and "not found" in result.stderr
    if result.returncode != 0 and (missing_backend or missing_ptxas):
        pytest.skip("Triton's CUDA backend or its ptxas is not installed here")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Triton cache: not using TRITON_CACHE_DIR" in result.stderr
    assert list(shared.iterdir()) == []
    private = native.kernel_dir() / "triton"
    assert_private_folder_of_the_user(private)
    assert any(path.suffix == ".cubin" for path in private.rglob("*"))
