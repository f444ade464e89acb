"""The container image (deploy/container), built for real: ``deploy/container/build.sh`` with
buildah, from a Debian root filesystem made by mmdebstrap (the ``image`` fixture, once per
session; imagekit). Its version, labels, user and entry point; what it holds and what it must
not (a compiler, pip, caches, the GL drivers ffmpeg never loads); the deployed profile validated
in it; and a Containerfile with a step missing fails the build. The pod's whole life in the image
is tests/deploy/test_pod_life.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import imagekit
import pytest
from imagekit import CONTAINER, Image
from kube import OVERLAYS, configmap_profile, render

from orchestrator import __version__

INSTALL = CONTAINER / "install.sh"
CONTAINERFILE = CONTAINER / "Containerfile"

pytestmark = pytest.mark.integration


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def test_image_reports_the_package_version_and_labels_what_it_holds(image: Image, container: str):
    assert ok(image.run(container, "orchestrator", "--version")) == f"orchestrator, version {__version__}"
    assert image.label("org.opencontainers.image.version") == __version__
    assert image.label("org.opencontainers.image.base.name") == imagekit.BASE
    # The labels name what is in the image, read from inside it.
    ffmpeg = ok(image.run(container, "dpkg-query", "-W", "-f", "${Version}", "ffmpeg"))
    assert re.fullmatch(r"7:5\.1\.\d+-\S+", ffmpeg), ffmpeg  # Debian bookworm's ffmpeg 5.1
    assert image.label("orchestrator.ffmpeg") == ffmpeg
    assert ok(image.run(container, "ffmpeg", "-hide_banner", "-version")).startswith("ffmpeg version 5.1.")
    assert image.label("orchestrator.base.debian") == ok(image.run(container, "cat", "/etc/debian_version"))
    python = ok(image.run(container, "python3", "-c", "import platform; print(platform.python_version())"))
    assert image.label("orchestrator.base.python") == python


def test_image_runs_as_user_10001_with_the_orchestrator_as_its_exec_form_entry_point(image: Image, container: str):
    assert image.config("{{.OCIv1.Config.User}}") == "10001:10001"
    assert image.config("{{.OCIv1.Config.Entrypoint}}") == "[orchestrator]"
    assert image.config("{{.OCIv1.Config.WorkingDir}}") == "/tmp"
    identity = ok(image.run(container, "id"))
    assert identity == "uid=10001(orchestrator) gid=10001(orchestrator) groups=10001(orchestrator)"
    # Not writable by that user: the image's files (Kubernetes mounts the root read-only besides).
    denied = image.run(container, "touch", "/opt/orchestrator/x")
    assert denied.returncode != 0
    assert "Permission denied" in denied.stderr


def test_image_holds_no_compiler_pip_caches_or_unloaded_gl_drivers(image: Image, container: str):
    assert ok(image.run(container, "sh", "-c", "command -v cc gcc g++ c++ make pip pip3 || true")) == ""
    venv = ok(image.run(container, "ls", "/opt/orchestrator/lib/python3.11/site-packages"))
    assert "orchestrator" in venv.split()
    assert not [name for name in venv.split() if name.startswith(("pip", "setuptools"))], venv
    # No pip cache (nor any other under /root), no wheels, no apt lists or archives, nothing in /tmp
    # but the wheels' mount point. (Debian's python3-venv keeps pip's wheel for `python3 -m venv`.)
    leftovers = ok(image.run(container, "sh", "-c", "find /root /var/lib/apt/lists /var/cache/apt /tmp -mindepth 1 "
                             "-not -name .bashrc -not -name .profile -not -name lock -not -name partial "
                             "-not -name archives -not -path /tmp/wheels; "
                             "find / -xdev -name '*.whl' -not -path '/usr/share/python-wheels/*'",
                             user="0:0"))  # fmt: skip
    assert leftovers == "", leftovers
    # ffmpeg loads: everything it links is there. The GL drivers, LLVM and Z3 that its packages
    # depend on but an encoding ffmpeg never loads are not (install.sh's dpkg excludes).
    ldd = ok(image.run(container, "ldd", "/usr/bin/ffmpeg"))
    assert "not found" not in ldd
    assert "libx264" in ldd
    assert "libfreetype" in ldd
    unloaded = ok(image.run(container, "find", "/usr/lib", "-path", "*/dri/*", "-o", "-name", "libLLVM-*", "-o",
                            "-name", "libz3.so*"))  # fmt: skip
    assert unloaded == ""
    # The compiled dependency loads under the image's Python.
    assert ok(image.run(container, "python3", "-c", "import pydantic_core; print('ok')")) == "ok"
    # Byte-compiled: the root filesystem is read-only at run time.
    assert ok(image.run(container, "sh", "-c", "ls /opt/orchestrator/lib/python3.11/site-packages/orchestrator/"
                                               "__pycache__ | grep -c 'cli.*pyc'")) == "1"  # fmt: skip


def test_the_build_fails_when_the_base_is_not_what_the_labels_would_say(image: Image, container: str):
    # install.sh system, as the build runs it (root, in the image), given each version wrong in turn.
    debian = image.label("orchestrator.base.debian")
    python = image.label("orchestrator.base.python")
    ffmpeg = image.label("orchestrator.ffmpeg")
    assert ok(image.run(container, "orchestrator-install", "system", debian, python, ffmpeg, user="0:0")) == ""
    for wrong, reason in [((debian + "9", python, ffmpeg), f"the base is Debian {debian}, not {debian}9"),
                          ((debian, "3.11.0", ffmpeg), f"the base's python3 is Python {python}, not 3.11.0"),
                          ((debian, python, "7:5.1.0-1"), f"ffmpeg {ffmpeg} is installed, not 7:5.1.0-1")]:  # fmt: skip
        result = image.run(container, "orchestrator-install", "system", *wrong, user="0:0")
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"install.sh: {reason}" in result.stderr


def test_image_validates_the_deployed_profile_as_user_10001(image: Image, container: str, tmp_path: Path):
    profile = tmp_path / "profile.toml"
    profile.write_text(configmap_profile(render(OVERLAYS[0])))
    tmp_path.chmod(0o755)  # as a ConfigMap's volume: readable by the pod's user
    profile.chmod(0o644)
    result = image.buildah("run", "--volume", f"{tmp_path}:/etc/orchestrator:ro", container, "--",
                           "orchestrator", "validate", "/etc/orchestrator/profile.toml", check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_a_containerfile_missing_a_copy_fails_the_build(image: Image, tmp_path: Path):
    text = CONTAINERFILE.read_text()
    copy = "COPY install.sh /usr/local/sbin/orchestrator-install\n"
    assert copy in text
    broken = tmp_path / "Containerfile"
    broken.write_text(text.replace(copy, ""))
    log = tmp_path / "build.log"
    result = image.build_sh("--base", imagekit.BASE, "--wheels", str(image.wheels), "--file", str(broken),
                            "--tag", "localhost/orchestrator:broken", log=log)  # fmt: skip
    output = log.read_text()
    assert result.returncode != 0, output[-4000:]
    assert re.search(r"orchestrator-install: (command )?not found", output), output[-4000:]
    assert "built localhost/orchestrator:broken" not in output
    assert image.buildah("images", "--quiet", "localhost/orchestrator:broken", check=False).returncode != 0


def test_install_script_refuses_unknown_steps():
    for argv in (["everything"], ["app", "/opt/x"], []):
        result = subprocess.run(["bash", str(INSTALL), *argv], capture_output=True, text=True)
        assert result.returncode == 2
        assert "usage" in result.stderr


def test_containerfile_builds_from_a_base_argument_as_a_numeric_non_root_user():
    text = CONTAINERFILE.read_text()
    # The default base is the slim Python image users pull; build.sh --rootfs passes CI's own.
    assert re.search(r"^ARG BASE=\S*python:3\.11-slim-bookworm$", text, flags=re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE\}$", text, flags=re.MULTILINE)
    assert "RUN orchestrator-install system " in text
    assert "RUN --mount=type=bind,source=wheels,target=/tmp/wheels" in text
    (user,) = re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE)
    uid, gid = (int(n) for n in user.split(":"))
    assert uid != 0
    assert gid != 0
    assert re.search(r'^ENTRYPOINT \["orchestrator"\]$', text, flags=re.MULTILINE), "exec form, no shell"
    packages = re.search(r"^PACKAGES=\((.*)\)$", INSTALL.read_text(), flags=re.MULTILINE)
    assert packages is not None
    assert set(packages.group(1).split()) == {"ffmpeg", "fonts-dejavu-core"}
