"""The tests leave the checkout alone: run test files while the demo runs in the same checkout.

    .venv/bin/python tests/check_beside_demo.py [PYTEST OPTIONS] [TEST FILES ...]

Starts ``orchestrator up profiles/demo.toml --local-ingest demo-archive`` from the repository
root, as the README says (its ``demo-state``, its ports 18081, 18082 and 9464), waits until it
streams, runs pytest with the given options on the given test files (default: the tests that
run ``up`` and ``ingest`` as processes, and the container install that builds the package), and
stops the demo with SIGINT. It passes when the tests pass (a test that used the demo's state
directory would find its lock held, one that used its ports would find them taken), the demo
streamed to every endpoint throughout and exited 0, and the checkout has no new paths besides
the demo's own ``demo-state`` and ``demo-archive``.

Not a test (it is named ``check_*``, so pytest does not collect it): it runs the demo in the
checkout, which the suite itself never does. Exit code: pytest's, or 1 when a check fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TESTS = ["tests/test_cli.py", "tests/test_instances.py", "tests/test_integration.py", "tests/test_restart.py",
                 "tests/test_ctrl_c.py", "tests/test_terminal.py", "tests/test_help.py", "tests/ops/test_statuscli.py",
                 "tests/deploy/test_container.py"]  # fmt: skip
KEPT = ("demo-state", "demo-archive")  # the demo's own paths in the checkout
CACHES = ("__pycache__", ".pytest_cache")  # Python's and pytest's own, wherever they run


def untracked() -> set[str]:
    """Untracked and ignored paths of the checkout (directories collapsed, as git shows them)."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=normal"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!")}


def streaming() -> bool:
    try:
        status = httpx.get("http://127.0.0.1:9464/status", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return False
    endpoints = [e for s in status["streams"] for g in s["groups"] for e in g["endpoints"]]
    return len(endpoints) == 8 and all(e["state"] == "streaming" for e in endpoints)


def main(args: list[str]) -> int:
    before = untracked()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"demo-beside-tests-{os.getpid()}.log"
    with log.open("wb") as out:
        argv = [sys.executable, "-m", "orchestrator", "up", "profiles/demo.toml", "--local-ingest", "demo-archive",
                "--status", "log"]  # fmt: skip
        demo = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    problems: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not streaming():
            if demo.poll() is not None or time.monotonic() > deadline:
                print(f"the demo did not start streaming (exit {demo.poll()}); its log: {log}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print("the demo streams to all 8 endpoints; running the tests beside it", flush=True)
        if not any(a.endswith(".py") or "::" in a or (ROOT / a).is_dir() for a in args):
            args = [*args, *DEFAULT_TESTS]  # only options given: the default test files
        code = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=ROOT, check=False).returncode
        if demo.poll() is not None:
            problems.append(f"the demo exited ({demo.returncode}) while the tests ran; its log: {log}")
        elif not streaming():
            problems.append(f"the demo no longer streams to every endpoint after the tests; its log: {log}")
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
        demo_code = demo.wait(30)
    if demo_code != 0:
        problems.append(f"the demo exited {demo_code} on SIGINT; its log: {log}")
    new = sorted(p for p in untracked() - before
                 if not p.rstrip("/").startswith(KEPT) and not any(c in p.split("/") for c in CACHES))  # fmt: skip
    if new:
        problems.append(f"new paths in the checkout: {', '.join(new)}")
    for problem in problems:
        print(f"check_beside_demo: {problem}", file=sys.stderr)
    if not problems:
        verdict = "ok" if code == 0 else f"the tests failed (pytest exit {code})"
        print(f"check_beside_demo: {verdict}; the demo ran throughout and exited 0, no new paths in the checkout")
    return code or (1 if problems else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
