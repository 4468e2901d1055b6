"""Compiled kernels are built and loaded only from a private folder, and only as the bytes that were built.

`gmbench.backends.native`: planted, truncated, linked or unrecorded libraries are never
loaded (rebuilt once, with one warning line); a kernel folder other users could write is
refused (one warning line, PyTorch fallback). The mechanics are checked on a tiny C++
source; the end-to-end cases run the real CPU kernel in fresh processes.
"""

import ctypes
import grp
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gmbench.backends import cpu_kernel, native
from gmbench.backends.private_folder import _is_private_group

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="needs Linux (memfd, /proc/self/fd, POSIX permissions)"),
    pytest.mark.skipif(
        not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")),
        reason="needs g++ (or $CXX) to build the C++ kernels",
    ),
]

ANSWER_SOURCE = 'extern "C" int gmbench_test_answer() { return 42; }\n'
ANSWER_SYMBOLS = {"gmbench_test_answer": ([], ctypes.c_int)}
QUICK_FLAGS = ["-O0", "-shared", "-fPIC"]
PLANT_SOURCE = textwrap.dedent(
    """
    #include <stdio.h>
    // Runs inside dlopen, before any symbol is looked up: loading this file is enough to execute it.
    __attribute__((constructor)) static void plant(void) {
        FILE* f = fopen(MARKER, "w");
        if (f) { fputs("planted code ran\\n", f); fclose(f); }
    }
    extern "C" int gmbench_test_answer() { return 666; }
    """
)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """HOME, XDG_CACHE_HOME and the (shareable) data cache in tmp_path; the real caches stay untouched."""
    home = tmp_path / "home"
    (home / ".cache").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("GMBENCH_CACHE", str(tmp_path / "shared-cache"))
    monkeypatch.delenv(native.KERNEL_DIR_ENV, raising=False)
    monkeypatch.delenv("GMBENCH_DISABLE_CPU_KERNEL", raising=False)
    return tmp_path


@pytest.fixture
def answer_source(tmp_path):
    source = tmp_path / "answer.cpp"
    source.write_text(ANSWER_SOURCE)
    return source


def compile_planted(path, marker):
    """A real shared library whose constructor creates ``marker``."""
    source = path.with_suffix(".plant.cpp")
    source.write_text(PLANT_SOURCE)
    compiler = native.find_compiler()
    subprocess.run([compiler, "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source), "-o", str(path)], check=True)
    source.unlink()


def build_answer(source):
    return native.build_library(source, ANSWER_SYMBOLS, QUICK_FLAGS, "test library")


def only_library(folder):
    (library,) = folder.glob("*.so")
    return library


def kernel_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "gmbench.backends" and r.levelno >= logging.WARNING]


def test_library_is_built_in_a_private_folder_outside_the_data_cache(isolated, answer_source):
    assert build_answer(answer_source).gmbench_test_answer() == 42
    folder = native.kernel_dir()
    assert folder == isolated / "home" / ".cache" / f"gmbench-kernels-{os.geteuid()}"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    library = only_library(folder)
    record = json.loads((folder / native.MANIFEST).read_text())["libraries"][library.name]
    assert record["sha256"] == hashlib.sha256(library.read_bytes()).hexdigest()
    assert record["size"] == library.stat().st_size
    assert not (isolated / "shared-cache").exists()


def test_second_load_reuses_the_verified_library_without_compiling(isolated, answer_source, monkeypatch):
    build_answer(answer_source)
    monkeypatch.setattr(native, "_compile", lambda *args: pytest.fail("recompiled a valid library"))
    assert build_answer(answer_source).gmbench_test_answer() == 42


@pytest.mark.parametrize("damage", ["replaced", "truncated", "symlink", "unrecorded"])
def test_rejected_library_is_rebuilt_never_loaded(isolated, answer_source, caplog, damage):
    folder = native.kernel_dir()
    native.ensure_private_folder(folder)
    marker = isolated / "marker"
    planted = isolated / "planted.so"
    compile_planted(planted, marker)
    if damage == "unrecorded":  # planted under the expected name before anything was built
        name = native.library_name(answer_source, answer_source.read_bytes(), QUICK_FLAGS, native.find_compiler())
        shutil.copy(planted, folder / name)
    else:
        build_answer(answer_source)
        library = only_library(folder)
        if damage == "replaced":
            shutil.copy(planted, library)
        elif damage == "truncated":
            os.truncate(library, library.stat().st_size // 2)
        else:
            library.unlink()
            library.symlink_to(planted)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gmbench.backends"):
        assert build_answer(answer_source).gmbench_test_answer() == 42
    assert not marker.exists(), "the planted library's code ran"
    (message,) = kernel_warnings(caplog)
    expected = {"replaced": "replaced", "truncated": "truncated", "symlink": "symbolic link", "unrecorded": "not recorded"}
    assert expected[damage] in message and "rebuilt it" in message
    assert not only_library(folder).is_symlink()


def test_forged_manifest_in_a_world_writable_folder_is_refused(isolated, answer_source, caplog):
    # Someone who can write the folder can also rewrite the manifest: the folder check must stop it.
    build_answer(answer_source)
    folder = native.kernel_dir()
    library = only_library(folder)
    marker = isolated / "marker"
    compile_planted(library, marker)
    data = library.read_bytes()
    manifest = json.loads((folder / native.MANIFEST).read_text())
    manifest["libraries"][library.name].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (folder / native.MANIFEST).write_text(json.dumps(manifest))
    folder.chmod(0o777)
    kernel = native.NativeLibrary(answer_source, ANSWER_SYMBOLS, QUICK_FLAGS, description="test kernel", fallback="Python")
    with caplog.at_level(logging.WARNING, logger="gmbench.backends"):
        assert kernel.load() is None
        assert kernel.load() is None  # decided once per process: still one warning
    assert not marker.exists()
    (message,) = kernel_warnings(caplog)
    assert message.startswith("test kernel not loaded, using Python: ")
    assert "writable by group or others (mode 0777)" in message and f"chmod 700 {folder}" in message
    assert "writable by group or others" in kernel.unavailable_reason()


def test_kernel_folder_of_another_user_is_refused(isolated, answer_source, monkeypatch):
    folder = isolated / "kernels"
    monkeypatch.setenv(native.KERNEL_DIR_ENV, str(folder))
    build_answer(answer_source)
    uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    with pytest.raises(native.UnsafeLibraryError, match=f"belongs to uid {uid}, not to you"):
        build_answer(answer_source)


def test_symlinked_kernel_folder_is_refused(isolated, answer_source, monkeypatch):
    real = isolated / "real-kernels"
    real.mkdir(mode=0o700)
    link = isolated / "kernels"
    link.symlink_to(real)
    monkeypatch.setenv(native.KERNEL_DIR_ENV, str(link))
    with pytest.raises(native.UnsafeLibraryError, match="is a symbolic link"):
        build_answer(answer_source)
    assert not list(real.iterdir())


def test_parent_writable_by_others_is_refused_unless_sticky(isolated, answer_source):
    cache = isolated / "home" / ".cache"
    cache.chmod(0o777)
    with pytest.raises(native.UnsafeLibraryError, match=r"a parent of the kernel folder .* \(mode 0777\) and not sticky"):
        build_answer(answer_source)
    cache.chmod(0o1777)  # like /tmp: others cannot rename or remove our folder
    assert build_answer(answer_source).gmbench_test_answer() == 42


def _other_group():
    mine = os.getegid()
    for group in grp.getgrall():
        if group.gr_gid != mine:
            return group.gr_gid
    return None


def test_group_writable_folder_is_refused_unless_the_group_is_private(isolated, answer_source, monkeypatch):
    folder = isolated / "kernels"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv(native.KERNEL_DIR_ENV, str(folder))
    other = _other_group()
    try:
        os.chown(folder, -1, other)
    except (PermissionError, TypeError):
        pytest.skip("needs a second group the current user may give the folder to")
    folder.chmod(0o770)
    with pytest.raises(native.UnsafeLibraryError, match=r"writable by group or others \(mode 0770\)"):
        build_answer(answer_source)
    os.chown(folder, -1, os.getegid())
    if not _is_private_group(os.getegid(), os.geteuid()):
        pytest.skip("the current user's primary group has other members")
    assert build_answer(answer_source).gmbench_test_answer() == 42  # user private group: only we are in it


def test_loads_from_a_private_copy_when_memfd_is_unavailable(isolated, answer_source, monkeypatch):
    def no_memfd(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", no_memfd)
    assert build_answer(answer_source).gmbench_test_answer() == 42
    assert sorted(p.name for p in native.kernel_dir().iterdir() if p.suffix == ".so") == [
        only_library(native.kernel_dir()).name
    ], "the temporary copy was not removed"


def test_compile_error_is_reported_without_a_warning(isolated, tmp_path, caplog):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    kernel = native.NativeLibrary(broken, {}, QUICK_FLAGS, description="test kernel", fallback="Python")
    with caplog.at_level(logging.WARNING, logger="gmbench.backends"):
        assert kernel.load() is None
    assert kernel.unavailable_reason().startswith("cannot build the test kernel: ")
    assert not kernel_warnings(caplog)


def test_own_header_is_pasted_in_and_a_changed_header_rebuilds(isolated, tmp_path):
    (tmp_path / "answer.h").write_text("#include <cstdint>\nstatic int answer() { return 42; }\n")
    source = tmp_path / "uses_header.cpp"
    source.write_text('#include "answer.h"\n#include "answer.h"\nextern "C" int gmbench_test_answer() { return answer(); }\n')
    code = native.read_source(source)
    assert b"#include <cstdint>" in code and code.count(b"return 42") == 1 and b'#include "answer.h"' not in code
    assert build_answer(source).gmbench_test_answer() == 42
    first = only_library(native.kernel_dir()).name
    (tmp_path / "answer.h").write_text("static int answer() { return 43; }\n")
    assert native.library_name(source, native.read_source(source), QUICK_FLAGS, native.find_compiler()) != first
    assert build_answer(source).gmbench_test_answer() == 43  # rebuilt under a new name (this process loads a new file)


def test_the_same_sources_in_another_folder_have_the_same_key(tmp_path):
    # An installed wheel and a checkout (or two venvs) share one kernel folder: the key is
    # made of the bytes, not of where they lie, so neither rebuilds the other's libraries.
    for folder in ("checkout", "site-packages"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "answer.h").write_text("static int answer() { return 42; }\n")
        (tmp_path / folder / "uses_header.cpp").write_text('#include "answer.h"\nint f() { return answer(); }\n')
    first, second = (native.read_source(tmp_path / folder / "uses_header.cpp") for folder in ("checkout", "site-packages"))
    assert first == second and b'#line 1 "answer.h"' in first and b'#line 2 "uses_header.cpp"' in first
    (tmp_path / "site-packages" / "answer.h").write_text("static int answer() { return 43; }\n")
    assert native.read_source(tmp_path / "site-packages" / "uses_header.cpp") != first


def test_include_of_a_missing_own_header_is_a_compile_error(isolated, tmp_path):
    source = tmp_path / "missing.cpp"
    source.write_text('#include "nowhere.h"\nextern "C" int gmbench_test_answer() { return 1; }\n')
    kernel = native.NativeLibrary(source, ANSWER_SYMBOLS, QUICK_FLAGS, description="test kernel", fallback="Python")
    assert kernel.load() is None
    assert 'nowhere.h" names no file in' in kernel.unavailable_reason()


def test_compile_errors_in_a_pasted_header_name_the_header(isolated, tmp_path):
    (tmp_path / "broken.h").write_text("int ok;\nthis is not C++;\n")
    source = tmp_path / "includes_broken.cpp"
    source.write_text('#include "broken.h"\nextern "C" int gmbench_test_answer() { return 1; }\n')
    with pytest.raises(native.CompileError, match=r"broken\.h:2"):
        build_answer(source)


# End to end: the real CPU kernel in fresh processes (what a second `gmbench run` would see).

EVALUATE = textwrap.dedent(
    """
    import json, math, torch
    from gmbench import backends, mixture as gm
    from gmbench.backends import cpu_kernel
    one = gm.pack(torch.ones(1, 1, 1), torch.zeros(1, 1, 1, 2), torch.eye(2).expand(1, 1, 1, 2, 2)).double()
    g = torch.Generator().manual_seed(0)
    m = gm.pack(torch.randn(2, 2, 40, generator=g), torch.randn(2, 2, 40, 3, generator=g),
                gm.covariance_from_factor(torch.randn(2, 2, 40, 3, 3, generator=g), 0.05)).double()
    with backends.use("torch", cpu_kernel="auto"):
        single, value = float(gm.evaluate_at_centroids(one)), gm.evaluate_at_centroids(m)
    with backends.use("torch", cpu_kernel="gemm"):
        reference = gm.evaluate_at_centroids(m)
    print(json.dumps({"loaded": cpu_kernel.load() is not None, "reason": cpu_kernel.unavailable_reason(),
                      "single_error": abs(single - 1 / (2 * math.pi)),
                      "difference": float((value - reference).abs().max())}))
    """
)


def environment(root):
    env = {k: v for k, v in os.environ.items() if k not in (native.KERNEL_DIR_ENV, "GMBENCH_DISABLE_CPU_KERNEL")}
    env.update(HOME=str(root / "home"), XDG_CACHE_HOME=str(root / "home" / ".cache"),
               GMBENCH_CACHE=str(root / "shared-cache"), OMP_NUM_THREADS="1")
    return env


def evaluate_in_fresh_process(root):
    result = subprocess.run([sys.executable, "-c", EVALUATE], env=environment(root), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"exit {result.returncode} (-7 is SIGBUS): {result.stderr[-2000:]}"
    outcome = json.loads(result.stdout)
    assert outcome["single_error"] < 1e-12 and outcome["difference"] < 1e-10
    return outcome, [line for line in result.stderr.splitlines() if line.strip()]


def private_folder(root):
    return root / "home" / ".cache" / f"gmbench-kernels-{os.geteuid()}"


@pytest.fixture(scope="module")
def planted_then_run(tmp_path_factory):
    """Libraries planted under the kernel's expected name, then one fresh process evaluates.

    Planted in the private folder (before anything was built there) and in
    ``$GMBENCH_CACHE/kernels/`` (where gmbench used to build and load the kernel,
    and which clusters share).  Compiles the real kernel once for this module.
    """
    root = tmp_path_factory.mktemp("planted")
    folder = private_folder(root)
    folder.mkdir(parents=True, mode=0o700)
    shared = root / "shared-cache" / "kernels"
    shared.mkdir(parents=True)
    marker = root / "marker"
    code = native.read_source(cpu_kernel.SOURCE_FILE)
    name = native.library_name(cpu_kernel.SOURCE_FILE, code, cpu_kernel.FLAGS, native.find_compiler())
    compile_planted(folder / name, marker)
    for planted in (shared / name, shared / "ekmv_0123456789abcdef.so"):
        shutil.copy(folder / name, planted)
    outcome, stderr = evaluate_in_fresh_process(root)
    return root, marker, outcome, stderr


def copy_of(root, tmp_path):
    copy = tmp_path / "root"
    shutil.copytree(root, copy, symlinks=True)
    folder = private_folder(copy)
    return copy, folder, only_library(folder)


def test_planted_libraries_never_run_and_the_kernel_still_works(planted_then_run):
    root, marker, outcome, stderr = planted_then_run
    assert not marker.exists(), "a planted library's code ran"
    assert outcome["loaded"], outcome["reason"]  # rebuilt in the private folder
    (line,) = stderr
    library = only_library(private_folder(root))
    assert line.startswith(f"C++ CPU kernel: {library} is not recorded in manifest.json") and "rebuilt it" in line


def test_truncated_library_does_not_crash_a_fresh_process(planted_then_run, tmp_path):
    root, folder, library = copy_of(planted_then_run[0], tmp_path)
    os.truncate(library, library.stat().st_size // 3)
    outcome, stderr = evaluate_in_fresh_process(root)  # before: SIGBUS inside dlopen, on every rerun
    assert outcome["loaded"]
    (line,) = stderr
    assert "truncated or replaced" in line and "rebuilt it" in line
    outcome, stderr = evaluate_in_fresh_process(root)
    assert outcome["loaded"] and not stderr  # the repair lasts


def test_world_writable_kernel_folder_falls_back_to_gemm_with_one_warning(planted_then_run, tmp_path):
    root, folder, library = copy_of(planted_then_run[0], tmp_path)
    folder.chmod(0o777)
    outcome, stderr = evaluate_in_fresh_process(root)
    assert not outcome["loaded"] and "writable by group or others" in outcome["reason"]
    (line,) = stderr
    assert line.startswith("C++ CPU kernel not loaded, using the PyTorch GEMM path: kernel folder ")
    assert f"chmod 700 {folder}" in line


def test_cpu_kernel_source_is_shipped_next_to_the_module():
    assert cpu_kernel.SOURCE_FILE.is_file() and cpu_kernel.SOURCE_FILE.parent == Path(cpu_kernel.__file__).parent
    assert 'extern "C" void ekmv_forward_##SUFFIX' in cpu_kernel.SOURCE_FILE.read_text()


def test_concurrent_processes_compile_once_and_both_load(isolated, answer_source):
    # DDP ranks or Ray workers start together: the folder lock makes one compile and the others wait.
    log_file = isolated / "compiles.log"
    slow_compiler = isolated / "slow-g++"
    slow_compiler.write_text(f"#!/bin/sh\necho run >> {log_file}\nsleep 1\nexec {native.find_compiler()} \"$@\"\n")
    slow_compiler.chmod(0o755)
    code = (
        "import ctypes, sys\n"
        "from gmbench.backends import native\n"
        "lib = native.build_library(sys.argv[1], {'gmbench_test_answer': ([], ctypes.c_int)}, ['-O0', '-shared', '-fPIC'])\n"
        "print(lib.gmbench_test_answer())\n"
    )
    env = dict(os.environ, CXX=str(slow_compiler))
    processes = [
        subprocess.Popen([sys.executable, "-c", code, str(answer_source)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], results
    assert [out.strip() for out, _ in results] == ["42", "42"]
    assert not any(err.strip() for _, err in results), results
    assert log_file.read_text().splitlines() == ["run"]
