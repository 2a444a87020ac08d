"""The programs `make test` needs besides Python: install them where we can, else say in one line what to install.

The Prometheus tests run ``promtool`` and ``prometheus``; the rolling-restart test starts ``nginx`` and
``haproxy``. With apt-get and root (Debian, Ubuntu, CI) the missing ones are installed (Debian's ``prometheus``
package ships both Prometheus programs). Otherwise, or if the install fails, one line says what to install
and the exit status is 1: those tests fail without the programs (they never skip, so CI cannot pass without
them), and a newcomer learns why at once rather than at the end of a long run.

    python3 scripts/test_deps.py            # check, install what is missing if possible
    python3 scripts/test_deps.py --check    # check only

Standard library only: it runs before the virtual environment exists.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence

# program -> the Debian/Ubuntu package that provides it
PROGRAMS = {"promtool": "prometheus", "prometheus": "prometheus", "nginx": "nginx", "haproxy": "haproxy"}
# nginx and haproxy live in sbin, which a non-root PATH often lacks; the Makefile puts these on the tests' PATH.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
RELEASES = "https://prometheus.io/download/"

Runner = Callable[[Sequence[str], dict[str, str]], int]


def search_path(path: str | None = None) -> str:
    """``path`` (default: $PATH) with the sbin directories appended."""
    parts = (os.environ.get("PATH", "") if path is None else path).split(os.pathsep)
    return os.pathsep.join([*(p for p in parts if p), *(d for d in SBIN_DIRS if d not in parts)])


def missing_programs(path: str | None = None, programs: Sequence[str] = tuple(PROGRAMS)) -> list[str]:
    where = search_path(path)
    return [name for name in programs if shutil.which(name, path=where) is None]


def packages_for(programs: Sequence[str]) -> list[str]:
    return sorted({PROGRAMS[name] for name in programs})


def can_install(path: str | None = None, is_root: bool | None = None) -> bool:
    root = os.geteuid() == 0 if is_root is None else is_root
    return root and shutil.which("apt-get", path=search_path(path)) is not None


def hint(missing: Sequence[str]) -> str:
    """The one line a person reads: what is missing and how to get it."""
    elsewhere = []
    if any(PROGRAMS[name] == "prometheus" for name in missing):
        elsewhere.append(f"prometheus and promtool from {RELEASES}")
    if others := [name for name in missing if PROGRAMS[name] != "prometheus"]:
        elsewhere.append(f"{' and '.join(others)} from your package manager")
    return (
        f"test-deps: missing {', '.join(missing)}: install them (Debian/Ubuntu: "
        f"`sudo apt-get install {' '.join(packages_for(missing))}`, or run `make test` as root; "
        f"elsewhere: {'; '.join(elsewhere)}) and put them on PATH"
    )


def run_command(command: Sequence[str], env: dict[str, str]) -> int:
    return subprocess.run(list(command), env=env, stdin=subprocess.DEVNULL, check=False).returncode


def install(packages: Sequence[str], runner: Runner = run_command) -> bool:
    """apt-get update + install; no recommends (prometheus would pull in node-exporter), no prompts."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if runner(["apt-get", "update", "-qq"], env) != 0:
        return False
    return runner(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], env) == 0


def ensure(check_only: bool, path: str | None = None, is_root: bool | None = None, runner: Runner = run_command) -> int:
    missing = missing_programs(path)
    if missing and not check_only and can_install(path, is_root):
        packages = packages_for(missing)
        print(f"test-deps: installing {' '.join(packages)} with apt-get", file=sys.stderr, flush=True)
        install(packages, runner)  # its own errors are on stderr; what counts is what is on PATH afterwards
        missing = missing_programs(path)
    if missing:
        print(hint(missing), file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="only check; never install")
    args = parser.parse_args(argv)
    return ensure(check_only=args.check)


if __name__ == "__main__":
    sys.exit(main())
