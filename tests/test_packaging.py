"""Packaging: every module folder is in pyproject's explicit package list and really ships."""

import importlib
import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import gmbench

REPO = Path(__file__).resolve().parents[1]
# Top-level folders and the package they are imported as (pyproject [tool.setuptools] package-dir).
SOURCE_ROOTS = {"gmbench": "gmbench", "backends": "gmbench.backends", "baselines": "gmbench.baselines"}


def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def module_folders():
    """``{package name: folder}`` for every folder under the source roots that holds .py files."""
    found = {}
    for root, package in SOURCE_ROOTS.items():
        base = REPO / root
        if not base.is_dir():
            continue
        for folder in [base, *(p for p in base.rglob("*") if p.is_dir())]:
            if "__pycache__" in folder.parts or not any(folder.glob("*.py")):
                continue
            relative = folder.relative_to(base).parts
            found[".".join([package, *relative])] = folder
    return found


def test_every_module_folder_is_listed_in_pyproject_packages():
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    missing = sorted(set(module_folders()) - listed)
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {missing}"


def package_folder(package, package_dir):
    """The source folder of ``package`` under the ``package-dir`` mapping."""
    for prefix, folder in package_dir.items():
        if package == prefix or package.startswith(prefix + "."):
            rest = package[len(prefix) :].lstrip(".")
            return REPO / folder / Path(*rest.split(".")) if rest else REPO / folder
    return REPO.joinpath(*package.split("."))


def test_listed_packages_exist():
    setuptools = pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"gmbench.backends": "backends", "gmbench.baselines": "baselines",
                                         "gmbench.shipped_suites": "suites"}
    for package in setuptools["packages"]:
        folder = package_folder(package, setuptools["package-dir"])
        assert folder.is_dir(), f"pyproject lists {package} but {folder} does not exist"


def test_backends_and_baselines_import_as_gmbench_subpackages():
    backends = importlib.import_module("gmbench.backends")
    baselines = importlib.import_module("gmbench.baselines")
    assert Path(backends.__file__).resolve().parent == REPO / "backends"
    assert Path(baselines.__file__).resolve().parent == REPO / "baselines"
    assert importlib.import_module("gmbench.backends.torch").TorchBackend.name == "torch"


def test_distribution_metadata_matches_the_package():
    assert importlib.metadata.version("gmbench") == gmbench.__version__
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "gmbench"}
    assert scripts == {"gmbench": "gmbench.cli:main"}
    assert pyproject()["project"]["scripts"] == {"gmbench": "gmbench.cli:main"}


def test_wheel_ships_every_module_under_its_import_name(tmp_path):
    # Build from a copy so the shared working tree gets no build/ or egg-info folders.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for root in [*SOURCE_ROOTS, "suites"]:  # suites/: package data (gmbench.shipped_suites)
        if (REPO / root).is_dir():
            shutil.copytree(REPO / root, source / root, ignore=ignore)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0 and "No module named pip" in result.stderr:
        pytest.skip("pip is not available in this interpreter")
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("gmbench-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for package, folder in module_folders().items():
        for module in [*folder.glob("*.py"), *folder.glob("*.cpp"), *folder.glob("*.h")]:  # kernel sources (package data)
            expected.add("/".join([*package.split("."), module.name]))
    assert not sorted(expected - shipped), f"modules missing from the wheel: {sorted(expected - shipped)}"
