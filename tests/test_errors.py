"""One error tree: every exception class the package defines derives from ``OrchestratorError``,
and the tree drawn atop ``errors.py`` names every class in it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest

import orchestrator
from orchestrator import errors
from orchestrator.errors import (
    FileLockError,
    MediaError,
    OrchestratorError,
    ScanError,
    SourceError,
    StateError,
    StateMismatch,
    StatusUnreadable,
)

# Modules not imported for the walk: ``__main__`` runs the CLI when imported.
NOT_IMPORTED = {"orchestrator.__main__"}
# Exceptions that may stand outside the tree because a foreign protocol dictates their base.
# None today: add one here only with the reason beside it.
FOREIGN: set[str] = set()


def package_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined (not merely imported) in a module of the package."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(orchestrator.__path__, "orchestrator."):
        if info.name in NOT_IMPORTED:
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == info.name:
                found[f"{info.name}.{name}"] = value
    return found


EXCEPTIONS = package_exceptions()


def test_the_walk_finds_the_known_exceptions():
    """The walk itself: it sees classes in errors.py and those defined beside their code."""
    assert "orchestrator.errors.OrchestratorError" in EXCEPTIONS
    assert "orchestrator.encode.ffmpeg.FfmpegExited" in EXCEPTIONS
    assert len(EXCEPTIONS) >= 19


@pytest.mark.parametrize("name", sorted(set(EXCEPTIONS) - FOREIGN))
def test_every_exception_derives_from_the_root(name):
    assert issubclass(EXCEPTIONS[name], OrchestratorError), f"{name} is outside the OrchestratorError tree"


def test_the_drawn_tree_names_every_class_of_errors_py():
    docstring = errors.__doc__ or ""
    drawn = set(re.findall(r"[├└]── (\w+)", docstring)) | {"OrchestratorError"}
    defined = {cls.__name__ for name, cls in EXCEPTIONS.items() if name.startswith("orchestrator.errors.")}
    assert drawn == defined


def test_the_drawn_tree_matches_the_classes_parents():
    """Each class is drawn under its parent in the tree: indentation is the parent link."""
    docstring = errors.__doc__ or ""
    stack: list[tuple[int, str]] = [(0, "OrchestratorError")]
    for line in docstring.splitlines():
        match = re.match(r"^(.*?)[├└]── (\w+)", line)
        if not match:
            continue
        depth, name = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parent = stack[-1][1] if stack else "OrchestratorError"
        assert getattr(errors, parent) in getattr(errors, name).__bases__, f"{name} is drawn under {parent}"
        stack.append((depth, name))


@pytest.mark.parametrize(
    ("cls", "branch"),
    [
        (SourceError, OrchestratorError),
        (FileLockError, SourceError),
        (ScanError, MediaError),
        (StateMismatch, StateError),
        (StatusUnreadable, OrchestratorError),
    ],
)
def test_the_five_that_joined_sit_on_their_branch(cls, branch):
    assert issubclass(cls, branch)


@pytest.mark.parametrize("cls", [SourceError, FileLockError, ScanError, StateMismatch])
def test_the_value_errors_stay_value_errors(cls):
    """Callers that plan a run catch them with other bad values as ``ValueError``."""
    assert issubclass(cls, ValueError)


def test_file_lock_error_names_the_source_path_key():
    exc = FileLockError("the video frame rate is not constant")
    assert (exc.key, str(exc)) == ("source.path", "the video frame rate is not constant")


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("orchestrator.encode.lock", "FileLockError"),
        ("orchestrator.encode.ffmpeg", "SourceError"),
        ("orchestrator.encode.continuity", "StateMismatch"),
        ("orchestrator.testing.bodyscan", "ScanError"),
        ("orchestrator.ops.statuscli", "StatusUnreadable"),
    ],
)
def test_moved_names_stay_importable_where_they_were(module, name):
    assert getattr(importlib.import_module(module), name) is getattr(errors, name)
