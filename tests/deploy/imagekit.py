"""The container image, built and run with buildah for the deploy tests.

buildah runs here without a daemon or user namespaces: as root, with chroot isolation (the
container's processes are host processes under a chroot, sharing the host's network, so they reach
servers on the host's loopback) and the vfs storage driver, whose storage lives in a temporary
directory of the test session (nothing of an earlier run is reused: CI starts clean).
:func:`build` runs ``deploy/container/build.sh`` as a user would, on a root filesystem made by
mmdebstrap (``install.sh rootfs``) instead of an image from a registry; ``conftest.py`` builds once
per session.

Where buildah (or mmdebstrap, or root) is missing the image tests skip with how to install it, and
the pod-life test runs the pod's command as a plain process instead; under ``CI=true`` that is a
failure (``.ci/run`` installs both).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kube import ROOT

from orchestrator import __version__

CONTAINER = ROOT / "deploy" / "container"
BUILD = CONTAINER / "build.sh"
BASE = "localhost/orchestrator-rootfs:bookworm"  # the image build.sh makes of --rootfs
HOW = ("apt-get install buildah mmdebstrap, and run the tests as root (buildah's chroot isolation needs no user "
       "namespaces, but root); .ci/run installs them")  # fmt: skip


def missing() -> str | None:
    """What keeps the image from being built here, or None."""
    for tool in ("buildah", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if os.geteuid() != 0:
        return "not root"
    return None


def engine_present() -> bool:
    """Whether the image can be built and run here; under CI=true it must be (fails the test if not)."""
    reason = missing()
    if reason is not None and os.environ.get("CI") == "true":
        pytest.fail(f"the container image cannot be built in CI: {reason}: {HOW}")
    return reason is None


def require_engine() -> None:
    """Skip (fail under CI=true) where the image cannot be built."""
    if not engine_present():
        pytest.skip(f"needs buildah to build the image: {missing()}: {HOW}")


def engine_environment(directory: Path) -> dict[str, str]:
    """The environment for buildah with its storage under ``directory``, vfs, chroot isolation."""
    conf = directory / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{directory / "storage"}"\n'
                    f'runroot = "{directory / "run"}"\n')  # fmt: skip
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf), "STORAGE_DRIVER": "vfs", "BUILDAH_ISOLATION": "chroot"}


@dataclass
class Image:
    """The built image, and the buildah storage it lives in."""

    tag: str
    directory: Path  # the session's image directory: storage, root filesystem tar, wheels, build log
    env: dict[str, str]
    build_seconds: float
    containers: list[str] = field(default_factory=list)

    @property
    def wheels(self) -> Path:
        return self.directory / "wheels"

    def buildah(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["buildah", *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            pytest.fail(f"buildah {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
        return result

    def build_sh(self, *args: str, log: Path) -> subprocess.CompletedProcess[str]:
        """``deploy/container/build.sh --engine buildah ARGS`` in this storage, its output in ``log``."""
        with log.open("w") as out:
            return subprocess.run(["bash", str(BUILD), "--engine", "buildah", *args], stdout=out,
                                  stderr=subprocess.STDOUT, text=True, env=self.env, timeout=900)  # fmt: skip

    def label(self, name: str) -> str:
        return self.buildah("inspect", "--type", "image", "--format", f'{{{{index .OCIv1.Config.Labels "{name}"}}}}',
                            self.tag).stdout.strip()  # fmt: skip

    def config(self, go_template: str) -> str:
        """A field of the image's OCI configuration, e.g. ``{{.OCIv1.Config.User}}``."""
        return self.buildah("inspect", "--type", "image", "--format", go_template, self.tag).stdout.strip()

    def container(self) -> str:
        """A new container of the image (a new pod's: its root filesystem fresh from the image)."""
        name = self.buildah("from", "--pull-never", "--quiet", self.tag).stdout.strip()
        self.containers.append(name)
        return name

    def run(self, container: str, *argv: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        """``argv`` in ``container``, as the image's user unless ``user``; its result (not checked)."""
        options = ["--user", user] if user else []
        return self.buildah("run", *options, container, "--", *argv, check=False)

    def size(self) -> str:
        """The image's size as buildah states it (e.g. ``492 MB``)."""
        return self.buildah("images", "--format", "{{.Size}}", self.tag).stdout.strip()

    def remove_containers(self) -> None:
        for name in self.containers:
            self.buildah("rm", name, check=False)
        self.containers.clear()


@contextmanager
def build(directory: Path) -> Iterator[Image]:
    """Build the image with ``build.sh`` in a buildah storage under ``directory`` (the root filesystem
    by mmdebstrap first, the wheels kept for later builds); fails with the build's log if the build
    fails. On exit, the storage is deleted (a gigabyte or so)."""
    env = engine_environment(directory)
    image = Image(tag=f"localhost/orchestrator:{__version__}", directory=directory, env=env, build_seconds=0)
    log = directory / "build.log"
    started = time.monotonic()
    try:
        result = image.build_sh("--rootfs", str(directory / "rootfs.tar"), "--wheels", str(image.wheels),
                                "--tag", image.tag, log=log)  # fmt: skip
        image.build_seconds = time.monotonic() - started
        if result.returncode != 0:
            pytest.fail(f"build.sh exited {result.returncode}:\n{log.read_text(errors='replace')[-6000:]}")
        yield image
    finally:
        # The vfs storage is plain directories (chroot isolation leaves no mount behind): deleting
        # them deletes the containers and the images.
        for storage in ("storage", "run"):
            shutil.rmtree(directory / storage, ignore_errors=True)
        (directory / "rootfs.tar").unlink(missing_ok=True)


def step_seconds(log: Path) -> dict[str, int]:
    """build.sh's step lines (``build.sh: [N s] what``) as {what: N}."""
    return {m.group(2): int(m.group(1)) for m in re.finditer(r"^build\.sh: \[(\d+) s\] (.*)$", log.read_text(), re.M)}
