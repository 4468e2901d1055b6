"""The shipped suites are package data: ``gmbench suites`` lists them, ``gmbench run NAME`` runs one.

The slow test installs a freshly built wheel (not editable) into a new virtual
environment and runs the packaged quickstart from a folder outside the checkout.
"""

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from gmbench.backends import private_folder
from gmbench.cli import main
from gmbench.commands.suites import packaged_suites, resolve_suite
from gmbench.errors import SuiteError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (REPO / "suites").glob("*.yaml"))


def test_every_suite_file_of_the_repository_is_a_packaged_suite():
    assert sorted(packaged_suites()) == SHIPPED and "quickstart" in SHIPPED


def test_gmbench_suites_lists_each_with_its_description(capsys):
    assert main(["suites", "--json"]) == 0
    rows = {row["name"]: row["description"] for row in json.loads(capsys.readouterr().out)}
    assert sorted(rows) == SHIPPED
    for name, description in rows.items():
        text = (REPO / "suites" / f"{name}.yaml").read_text()
        declared = yaml.safe_load(text).get("description")
        if declared:
            assert description == " ".join(declared.split()), name
        else:  # no description: the first line of the top comment
            assert description and text.startswith("# " + description), name
    assert main(["suites"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("quickstart ") and rows["quickstart"] in line for line in lines)


def test_a_suite_without_description_is_described_by_its_top_comment(tmp_path):
    from gmbench.commands.suites import describe

    path = tmp_path / "s.yaml"
    path.write_text("# First line of the comment.\n# Second line.\nname: s\ncell: {}\n")
    assert describe(path) == "First line of the comment."
    path.write_text("# Comment.\nname: s\ndescription: >\n  Folded\n  text.\ncell: {}\n")
    assert describe(path) == "Folded text."


def test_gmbench_suites_name_prints_the_yaml(capsys):
    assert main(["suites", "footprint"]) == 0
    assert capsys.readouterr().out == (REPO / "suites" / "footprint.yaml").read_text()
    assert main(["suites", "nosuch"]) == 2
    assert "no packaged suite 'nosuch'" in capsys.readouterr().err


def test_a_name_resolves_to_the_packaged_suite_and_an_existing_file_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_suite("quickstart").samefile(REPO / "suites" / "quickstart.yaml")
    # README commands name suites/<name>.yaml; outside a checkout they mean the packaged file.
    assert resolve_suite("suites/quickstart.yaml").samefile(REPO / "suites" / "quickstart.yaml")
    (tmp_path / "quickstart").write_text("name: mine\ncell: {}\n")
    assert resolve_suite("quickstart") == Path("quickstart")
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "quickstart.yaml").write_text("name: mine\ncell: {}\n")
    assert resolve_suite("suites/quickstart.yaml") == Path("suites/quickstart.yaml")


def test_an_unknown_suite_names_the_packaged_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SuiteError, match="neither a file nor a packaged suite.*quickstart"):
        resolve_suite("quickstrat")
    with pytest.raises(SuiteError):
        resolve_suite("elsewhere/quickstart.yaml")  # a path that is not suites/<name>.yaml stays a path
    assert main(["run", "quickstrat", "--dry-run"]) == 2
    assert "gmbench suites" in capsys.readouterr().err


def test_gmbench_run_with_a_name_runs_the_packaged_suite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "footprint", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("suite footprint: 4 cells -> runs/footprint")


@pytest.mark.slow
def test_an_installed_wheel_runs_the_packaged_quickstart_outside_the_checkout(tmp_path):
    # Build from a copy so the shared working tree gets no build/ or egg-info folders.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("gmbench", "backends", "baselines", "suites"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                            str(source)], capture_output=True, text=True, timeout=300)
    if built.returncode != 0 and "No module named pip" in built.stderr:
        pytest.skip("pip is not available in this interpreter")
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("gmbench-*.whl")

    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # torch & co. come from the test's environment; its editable gmbench does not (a path
    # listed in a .pth file is added to sys.path without running that folder's .pth files).
    (purelib / "reuse-test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr

    work = tmp_path / "elsewhere"
    work.mkdir()
    # The wheel's kernels are built from the same sources as the checkout's, so they share this
    # process's kernel folder (building them again takes most of a minute; test_kernel_security
    # builds them from scratch).
    environment = {"PATH": f"{env / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
                   "GMBENCH_CACHE": str(tmp_path / "cache"), "GMBENCH_DISABLE_ENTRYPOINTS": "1", "MPLBACKEND": "Agg",
                   private_folder.KERNEL_DIR_ENV: str(private_folder.kernel_dir())}
    where = subprocess.run([str(python), "-c", "import gmbench; print(gmbench.__file__)"], cwd=work, env=environment,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(purelib), where  # the wheel's copy, not the checkout
    gmbench = str(env / "bin" / "gmbench")
    listed = subprocess.run([gmbench, "suites"], cwd=work, env=environment, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "quickstart " in listed.stdout and str(purelib / "gmbench" / "shipped_suites") in listed.stdout
    run = subprocess.run([gmbench, "run", "quickstart", "--smoke", "--no-progress"], cwd=work, env=environment,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = work / "runs" / "quickstart-smoke" / "results.csv"
    summary = re.search(r"(\d+) cells: 0 already done, (\d+) run, 0 failed", run.stdout)
    assert results.is_file() and summary and summary.group(1) == summary.group(2), run.stdout[-2000:]
