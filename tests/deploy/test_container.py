"""The container image's install steps (deploy/container/install.sh), run as CI can: there is no
container engine here, so the image build itself is untested, but the steps it takes are. The
system step runs in .ci/run (it installs ffmpeg and the font when missing); here the package step
installs into a scratch virtual environment, whose `orchestrator` then validates the profile the
Kubernetes overlays deploy. And the Containerfile calls exactly those steps, as a numeric non-root
user, with an exec-form entry point.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from kube import OVERLAYS, ROOT, configmap_profile, render

from orchestrator import __version__

CONTAINER = ROOT / "deploy" / "container"
INSTALL = CONTAINER / "install.sh"

pytestmark = pytest.mark.integration


def test_install_script_builds_a_working_orchestrator_in_a_scratch_prefix(tmp_path: Path):
    prefix = tmp_path / "opt-orchestrator"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    # What the Containerfile copies to /src, copied here: pip builds in its source tree (build/),
    # which must not be the user's checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "orchestrator", src / "orchestrator", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(["bash", str(INSTALL), "app", str(prefix), str(src)], capture_output=True, text=True,
                            env=env, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"orchestrator, version {__version__}" in result.stdout
    # Installed, not linked to this checkout; byte-compiled (the image's root filesystem is read-only).
    (package,) = prefix.glob("lib/python3*/site-packages/orchestrator")
    assert (package / "cli.py").is_file()
    assert list(package.glob("__pycache__/*.pyc")), "not byte-compiled"
    assert list(package.glob("encode/media/*.mp4")), "the synthetic encoder's clips are missing"
    profile = tmp_path / "profile.toml"
    profile.write_text(configmap_profile(render(OVERLAYS[0])))
    check = subprocess.run([str(prefix / "bin" / "orchestrator"), "validate", str(profile)], capture_output=True,
                           text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert check.returncode == 0, check.stderr


def test_install_script_refuses_unknown_steps():
    result = subprocess.run(["bash", str(INSTALL), "everything"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage" in result.stderr


def test_containerfile_runs_the_install_steps_as_a_numeric_non_root_user():
    text = (CONTAINER / "Containerfile").read_text()
    assert re.search(r"^FROM \S*python:3\.\d+-slim", text, flags=re.MULTILINE)
    assert "RUN orchestrator-install system" in text
    assert "RUN orchestrator-install app /opt/orchestrator /src" in text
    assert "COPY deploy/container/install.sh /usr/local/sbin/orchestrator-install" in text
    (user,) = re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE)
    uid, gid = (int(n) for n in user.split(":"))
    assert uid != 0
    assert gid != 0
    assert re.search(r'^ENTRYPOINT \["orchestrator"\]$', text, flags=re.MULTILINE), "exec form, no shell"
    packages = re.search(r"^PACKAGES=\((.*)\)$", INSTALL.read_text(), flags=re.MULTILINE)
    assert packages is not None
    assert set(packages.group(1).split()) == {"ffmpeg", "fonts-dejavu-core"}
