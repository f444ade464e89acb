"""CPU cost of building one synthetic fragment: box by box (``smooth.write_fragment``) against the
templates (``smooth.FragmentTemplate``), in the same run.

Not a test: it prints figures. For each track kind it times ``SyntheticStream.written_fragment(k)``
(every box written from the samples, as the synthetic encoder did before the templates) and
``SyntheticStream.fragment(k)`` (a template per (first frame in the clip, frame count), patched
with index, track ID and start time) over the same indices, best of ``--repeat`` runs, and checks
the two give the same bytes. ``cold µs`` is the cost when the template is not there yet (written,
then patched): once per key and process, since every stream of the same track configuration
shares it; ``templates`` is how many keys the indices needed. The ``alive`` columns time the same
with the last ``--alive`` fragments kept referenced, as in ``up`` (``SharedFragments`` keeps 4
indices per stream: 4,000 fragments at 1,000 streams): each fragment is then a copy into memory
that is not in the CPU cache, often freshly mapped, and costs more. At 1,000 streams all
fragments fall due at the same instant, so this cost, times the number of streams, is how long
the last stream's fragment waits to be built.

Run:  .venv/bin/python bench/fragment_build.py [--fragments 2000] [--repeat 5]

The machine is shared and noisy: compare the columns of one run, not runs with each other.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import deque
from collections.abc import Callable

from orchestrator.encode.synthetic import FragmentTemplates, SyntheticStream
from orchestrator.profile import Profile
from orchestrator.testing.profiles import audio, build_profile, two_groups, video

K = 14_080_000  # a 2 s fragment index in late 2026

VIDEO = {"bitrate": 250_000, "width": 192, "height": 108}
TRACKS = {
    "video 192x108 25 fps, 90 kHz": video("t", **VIDEO, frame_rate="25"),
    "video 29.97 fps, 90 kHz": video("t", **VIDEO, frame_rate="30000/1001"),
    "audio AAC 44.1 kHz stereo": audio("t", bitrate=64_000, sample_rate=44100),
    "audio AAC 48 kHz stereo": audio("t", bitrate=64_000, sample_rate=48000),
}


def bench_profile(track: dict[str, object], fragment_seconds: int) -> Profile:
    """One stream of one track; the endpoints are never contacted."""
    return build_profile(name="bench", fragment_duration=fragment_seconds, streams={"s": [track]},
                         groups=two_groups(1), metrics={})  # fmt: skip


def best_us(build: Callable[[int], object], ks: range, repeat: int, alive: int = 1) -> float:
    """µs per call, best of ``repeat`` runs; the last ``alive`` results are kept referenced."""
    best = float("inf")
    for _ in range(repeat):
        kept: deque[object] = deque(maxlen=alive)
        started = time.perf_counter_ns()
        for k in ks:
            kept.append(build(k))
        best = min(best, (time.perf_counter_ns() - started) / len(ks) / 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fragments", type=int, default=2000, help="indices timed per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best is printed")
    parser.add_argument("--fragment-seconds", type=int, default=2)
    parser.add_argument(
        "--alive",
        type=int,
        default=4000,
        help="fragments kept referenced in the 'alive' columns (SharedFragments holds 4 per stream)",
    )
    args = parser.parse_args()
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'track':32} {'bytes':>7} {'write_fragment µs':>18} {'template µs':>12} {'speed-up':>9} "
          f"{'cold µs':>8} {'templates':>10} {'w_f µs, alive':>14} {'tpl µs, alive':>14}")  # fmt: skip
    for name, track in TRACKS.items():
        profile = bench_profile(track, args.fragment_seconds)
        templates = FragmentTemplates()
        source = SyntheticStream(profile, profile.streams[0], templates)
        ks = range(K, K + args.fragments)
        for k in ks[:50]:
            if source.fragment(k) != source.written_fragment(k):
                raise SystemExit(f"{name}: fragment {k} differs between the two paths")
        old = best_us(source.written_fragment, ks, args.repeat)
        new = best_us(source.fragment, ks, args.repeat)
        cold_source = SyntheticStream(profile, profile.streams[0])

        def cold(k: int, source: SyntheticStream = cold_source) -> object:
            source.templates = FragmentTemplates()
            return source.fragment(k)

        cold_us = best_us(cold, ks[: max(1, len(ks) // 10)], args.repeat)
        old_alive = best_us(source.written_fragment, ks, args.repeat, args.alive)
        new_alive = best_us(source.fragment, ks, args.repeat, args.alive)
        size = len(source.fragment(K)[0].data)
        print(f"{name:32} {size:7d} {old:18.1f} {new:12.1f} {old / new:8.1f}x {cold_us:8.1f} {len(templates):10d} "
              f"{old_alive:14.1f} {new_alive:14.1f}")  # fmt: skip
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
