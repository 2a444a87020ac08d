"""scripts/test_deps.py: what `make test` installs or asks for, with fake programs on a private PATH."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "test_deps.py"
ALL = ("promtool", "prometheus", "nginx", "haproxy")


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("test_deps", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


deps = _load()


@pytest.fixture(autouse=True)
def no_sbin(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine's own /usr/sbin (nginx, haproxy) must not leak into the private PATH."""
    monkeypatch.setattr(deps, "SBIN_DIRS", ())


def fake_program(directory: Path, name: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


class FakeApt:
    """apt-get as a runner: records each command; `install` puts the packages' programs on the PATH."""

    def __init__(self, bin_dir: Path, works: bool = True) -> None:
        self.bin_dir = bin_dir
        self.works = works
        self.commands: list[list[str]] = []

    def __call__(self, command: Sequence[str], env: dict[str, str]) -> int:
        assert env["DEBIAN_FRONTEND"] == "noninteractive"
        self.commands.append(list(command))
        if not self.works:
            return 100
        if command[1] == "install":
            packages = set(command[2:])
            for program, package in deps.PROGRAMS.items():
                if package in packages:
                    fake_program(self.bin_dir, program)
        return 0


def test_missing_programs_are_the_ones_not_on_path(tmp_path: Path) -> None:
    fake_program(tmp_path, "promtool")
    fake_program(tmp_path, "nginx")
    assert deps.missing_programs(str(tmp_path)) == ["prometheus", "haproxy"]
    (tmp_path / "haproxy").write_text("not executable")
    assert deps.missing_programs(str(tmp_path)) == ["prometheus", "haproxy"]


def test_sbin_is_searched_even_when_path_lacks_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    fake_program(sbin, "nginx")
    monkeypatch.setattr(deps, "SBIN_DIRS", (str(sbin),))
    assert "nginx" not in deps.missing_programs(str(tmp_path / "bin"))


def test_one_package_per_need() -> None:
    assert deps.packages_for(["promtool", "prometheus", "haproxy"]) == ["haproxy", "prometheus"]


@pytest.mark.parametrize(
    ("missing", "packages", "elsewhere"),
    [
        (["promtool", "prometheus"], "prometheus", ["prometheus.io"]),
        (["nginx"], "nginx", ["nginx from your package manager"]),
        (list(ALL), "haproxy nginx prometheus", ["prometheus.io", "nginx and haproxy from your package manager"]),
    ],
)
def test_hint_is_one_line_naming_what_to_install(missing: list[str], packages: str, elsewhere: list[str]) -> None:
    line = deps.hint(missing)
    assert "\n" not in line
    assert line.startswith(f"test-deps: missing {', '.join(missing)}:")
    assert f"apt-get install {packages}`" in line
    assert all(part in line for part in elsewhere)
    if "promtool" not in missing:
        assert "prometheus" not in line


def test_root_with_apt_installs_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_program(tmp_path, "apt-get")
    fake_program(tmp_path, "nginx")
    apt = FakeApt(tmp_path)
    assert deps.ensure(check_only=False, path=str(tmp_path), is_root=True, runner=apt) == 0
    assert apt.commands == [
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "haproxy", "prometheus"],
    ]
    assert capsys.readouterr().err == "test-deps: installing haproxy prometheus with apt-get\n"


def test_nothing_missing_installs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("apt-get", *ALL):
        fake_program(tmp_path, name)
    apt = FakeApt(tmp_path)
    assert deps.ensure(check_only=False, path=str(tmp_path), is_root=True, runner=apt) == 0
    assert apt.commands == [] and capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("is_root", "has_apt", "check_only"),
    [(False, True, False), (True, False, False), (True, True, True)],
    ids=["not-root", "no-apt-get", "check-only"],
)
def test_no_install_possible_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], is_root: bool, has_apt: bool, check_only: bool
) -> None:
    if has_apt:
        fake_program(tmp_path, "apt-get")
    apt = FakeApt(tmp_path)
    assert deps.ensure(check_only=check_only, path=str(tmp_path), is_root=is_root, runner=apt) == 1
    assert apt.commands == []
    assert capsys.readouterr().err == deps.hint(list(ALL)) + "\n"


def test_failed_install_says_what_is_still_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_program(tmp_path, "apt-get")
    fake_program(tmp_path, "promtool")
    fake_program(tmp_path, "prometheus")
    apt = FakeApt(tmp_path, works=False)
    assert deps.ensure(check_only=False, path=str(tmp_path), is_root=True, runner=apt) == 1
    assert apt.commands == [["apt-get", "update", "-qq"]]
    err = capsys.readouterr().err.splitlines()
    assert err == ["test-deps: installing haproxy nginx with apt-get", deps.hint(["nginx", "haproxy"])]


def test_script_exit_status_and_message(tmp_path: Path) -> None:
    """The real script in a subprocess: silent success with everything on PATH, one line and 1 without promtool."""
    for name in ALL:
        fake_program(tmp_path, name)
    command = [sys.executable, str(SCRIPT), "--check"]
    ok = subprocess.run(command, env={"PATH": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    (tmp_path / "promtool").unlink()
    failed = subprocess.run(command, env={"PATH": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and failed.stdout == ""
    lines = failed.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("test-deps: missing promtool:"), failed.stderr


def test_make_test_checks_programs_before_anything_else() -> None:
    """`make test` (and so CI, whose .ci/run is `make test`) runs the check first, then the suite."""
    # Under `make test` itself the parent's MAKEFLAGS/MAKELEVEL would make this make print "Entering directory".
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "test"], cwd=REPO, capture_output=True, text=True, timeout=60, env=env
    )
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0].endswith("scripts/test_deps.py")
    assert any("pytest" in line for line in lines[1:])
    assert "make test" in (REPO / ".ci" / "run").read_text()
