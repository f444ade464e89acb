"""The deploy tests' session fixture: the container image, built once per session (imagekit)."""

from __future__ import annotations

from collections.abc import Iterator

import imagekit
import pytest


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[imagekit.Image]:
    """The image, built by ``deploy/container/build.sh`` with buildah from an mmdebstrap root
    filesystem; skips (fails under CI=true) where buildah cannot run. Deleted after the session."""
    imagekit.require_engine()
    with imagekit.build(tmp_path_factory.mktemp("image")) as built:
        yield built


@pytest.fixture(scope="module")
def container(image: imagekit.Image) -> Iterator[str]:
    """A container of the image for a module's tests that only look and run (each `buildah from`
    copies the whole image with the vfs driver); removed after the module."""
    yield image.container()
    image.remove_containers()
