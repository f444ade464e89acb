"""The ingest server's per-fragment path without HTTP: CPU per fragment, peak memory.

Not a test: it prints figures. It opens ``--posts`` POSTs on one publishing point (as
``orchestrator ingest`` does, one :class:`~orchestrator.ingest.receiver.Post` each, all open at
once), feeds each the synthetic encoder's header, then ``--fragments`` fragments per POST in
64 kB pieces (as hypercorn hands them over), in rounds, and applies every decision as the server
does (archive writes into a temporary directory included). It prints the CPU time per fragment,
best of five rounds, and the process's peak RSS.

Run:  .venv/bin/python bench/ingest_path.py [--posts 1200] [--fragments 4]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import write_profile

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.fmp4.reader import NEED_DATA
from orchestrator.ingest.receiver import StreamPath
from orchestrator.ingest.server import IngestApp
from orchestrator.profile import load_profile

K0 = 14_080_000  # a fragment index near the shared clock's present
PIECE = 65536


def main() -> None:
    parser = argparse.ArgumentParser(description="Ingest per-fragment path (see the module docstring).")
    parser.add_argument("--posts", type=int, default=1200)
    parser.add_argument("--fragments", type=int, default=4, help="per POST and round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        write_profile(tmp / "p.toml", args.posts, ["http://127.0.0.1:1/e0/scale.isml"])
        profile = load_profile(tmp / "p.toml")
        streams = [SyntheticStream(profile, stream) for stream in profile.streams]
        app = IngestApp(tmp / "archive")
        posts = [app.point.open_post(StreamPath(("e0", "scale"), s.id), "primary", 0.0)
                 for s in profile.streams]  # fmt: skip
        for post, stream in zip(posts, streams, strict=True):
            post.feed(stream.header.data)
            while post.next_decision() is not NEED_DATA:
                pass
        per_fragment = []
        for r in range(5):
            first = K0 + r * args.fragments
            fragments = [[s.fragment(first + k)[0].data for k in range(args.fragments)] for s in streams]
            count = 0
            start = time.process_time()
            for k in range(args.fragments):
                for post, stream_fragments in zip(posts, fragments, strict=True):
                    data = stream_fragments[k]
                    for at in range(0, len(data), PIECE):
                        post.feed(data[at : at + PIECE])
                        while (decision := post.next_decision()) is not NEED_DATA:
                            app._apply(decision)
                            if decision.outcome == "archived":
                                post.written(decision)
                            count += 1
            per_fragment.append((time.process_time() - start) / count)
        app.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.posts} POSTs open, {count} fragments a round ({len(fragments[0][0])} bytes each): "
          f"{1e6 * min(per_fragment):.0f} µs CPU per fragment (best of 5), peak RSS {peak_mb:.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
