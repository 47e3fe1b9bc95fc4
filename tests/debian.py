"""Debian programs some tests need (chromium, promtool, docker-compose), installed with apt-get when missing.

A test that cannot have its program fails saying why; it never skips, since a skipped test shows nothing.
"""

import os
import shutil
import subprocess

import pytest

INSTALL_SECONDS = 600


def debian_program(program: str, *packages: str) -> str:
    """The path of `program`, installing Debian's `packages` first when it is not on PATH."""
    if found := shutil.which(program):
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.fail(f"{program} is missing and cannot be installed here: apt-get install {' '.join(packages)} as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Waits for another apt-get (a concurrent test run installing the same) rather than failing.
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-y", "-q", "install", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, capture_output=True, timeout=INSTALL_SECONDS).returncode != 0:
        # A new machine may have no package lists yet, or lists older than the archive.
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=INSTALL_SECONDS)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=INSTALL_SECONDS)
        if done.returncode != 0:
            pytest.fail(f"apt-get could not install {' '.join(packages)}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return shutil.which(program) or pytest.fail(f"apt-get installed {' '.join(packages)} but {program} is not on PATH")
