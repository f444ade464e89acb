"""The container image's build time and size, as CI builds it (docs/container.md).

Builds the image with ``deploy/container/build.sh --engine buildah --rootfs`` exactly as the
tests' session fixture does (tests/deploy/imagekit.py: a fresh mmdebstrap root filesystem, vfs
storage and chroot isolation in a temporary directory), then prints the seconds of each of
build.sh's steps, the sizes buildah states for the image and its base, and, read inside the
image, what takes the room: the files ffmpeg's dynamic loader maps (ldd), the package's virtual
environment, and the installed size dpkg records for the GL drivers, LLVM and Z3 whose files the
image leaves out. With ``--compressed``, also the size of the image as a registry stores it
(gzip-compressed layers, from ``buildah push`` to an OCI archive).

    .venv/bin/python bench/image_build.py [--compressed]

Needs root, buildah and mmdebstrap (apt-get install buildah mmdebstrap) and Debian's mirror. The
machine is shared and noisy: the seconds vary from run to run (mmdebstrap's download most).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "deploy")]

import imagekit  # noqa: E402

# The packages whose files install.sh's dpkg excludes leave out (their Installed-Size stays in dpkg's database).
EXCLUDED = ["libgl1-mesa-dri", "libllvm15", "libz3-4"]


def in_image(image: imagekit.Image, container: str, script: str) -> str:
    result = image.run(container, "sh", "-c", script, user="0:0")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compressed", action="store_true", help="also push to an OCI archive and measure it")
    options = parser.parse_args()
    if (reason := imagekit.missing()) is not None:
        sys.exit(f"image_build.py: {reason}: {imagekit.HOW}")
    with tempfile.TemporaryDirectory(prefix="image-bench-") as scratch:
        started = time.monotonic()
        with imagekit.build(Path(scratch)) as image:
            total = time.monotonic() - started
            steps = imagekit.step_seconds(Path(scratch) / "build.log")
            print("build.sh steps (seconds from its start):")
            for what, at in steps.items():
                print(f"  {at:5d} s  {what}")
            print(f"build: {total:.0f} s in all")
            print(f"image {image.tag}: {image.size()}; its base {imagekit.BASE}: "
                  f"{image.buildah('images', '--format', '{{.Size}}', imagekit.BASE).stdout.strip()}")  # fmt: skip
            container = image.container()
            mapped = "ldd /usr/bin/ffmpeg | awk '/=> \\//{print $3}' | xargs readlink -f | sort -u"
            ffmpeg = in_image(image, container, f"{mapped} | xargs du -cbL /usr/bin/ffmpeg | tail -1 | cut -f1")
            libraries = in_image(image, container, "ldd /usr/bin/ffmpeg | grep -c '=> /'")
            venv = in_image(image, container, "du -sb /opt/orchestrator | cut -f1")
            excluded = in_image(image, container, f"dpkg-query -W -f='${{Installed-Size}}\\n' {' '.join(EXCLUDED)} "
                                                  "| awk '{ s += $1 } END { print s }'")  # fmt: skip
            print(f"ffmpeg and the {libraries} libraries its loader maps: {int(ffmpeg) / 1e6:.0f} MB")
            print(f"the virtual environment /opt/orchestrator: {int(venv) / 1e6:.0f} MB")
            print(f"left out by the dpkg excludes ({', '.join(EXCLUDED)}): {int(excluded) * 1024 / 1e6:.0f} MB")
            if options.compressed:
                archive = Path(scratch) / "image.tar"
                image.buildah("push", "--quiet", image.tag, f"oci-archive:{archive}", timeout=600)
                size = archive.stat().st_size / 1e6
                print(f"compressed (OCI archive, gzip layers, as a registry stores it): {size:.0f} MB")
            image.remove_containers()


if __name__ == "__main__":
    main()
