"""The content-lock tests' kit (``test_content_lock.py``, ``test_live_lock.py``): the two-group
profile on ffmpeg, the clips (a moving picture with its frame number burnt in and pink noise; the
marked clip with its frame number as blocks and a pip on each second), and the checks on the
archives, decoded by ffmpeg: the same picture under the same timestamp, the sound's lag, the
clip frame each picture carries and the pips' onsets."""

from __future__ import annotations

import itertools
import json
import subprocess
from array import array
from pathlib import Path

from orchestrator.ingest.server import IngestApp
from orchestrator.testing import profiles


def lock_profile(primary_source: str, backup_source: str, primary_port: int, backup_port: int,
                 metrics: dict | None = None, frame_rate: str = "30000/1001") -> str:  # fmt: skip
    """One stream (320x180 video, 29.97 fps unless told, mono audio); each group on ffmpeg with its source (an
    inline table, as TOML text) and its own ingest server. Metrics off unless given."""
    primary = profiles.group(profiles.endpoint(primary_port, name="a", region="eu-west"),
                             encoder=profiles.ffmpeg(source=profiles.Raw(primary_source)))  # fmt: skip
    backup = profiles.group(profiles.endpoint(backup_port, name="b", region="eu-north"),
                            encoder=profiles.ffmpeg(source=profiles.Raw(backup_source)))  # fmt: skip
    video = profiles.video("video", bitrate=1_000_000, width=320, height=180, frame_rate=frame_rate)
    streams = {"av": [video, profiles.audio("audio", channels=1)]}
    groups = {"primary": primary, "backup": backup}
    return profiles.profile_text(name="lock", streams=streams, groups=groups, metrics=metrics)


SIDE = (32, 18)  # pictures are compared at this size, in gray
DECIMATED_RATE = 3000  # audio is compared at this rate: a lag step is 16 samples at 48 kHz
AAC_FRAME = 1024
NOISE = 1.5  # mean absolute difference (gray levels) of one picture coded twice; neighbours differ by 5 or more
TIE = 0.5


def make_clip(path: Path) -> None:
    """4.004 s (120 frames at 29.97 fps): a moving test picture with its own frame number burnt
    in big, and pink noise (sharp under cross-correlation), both streams the same length."""
    subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-f", "lavfi", "-i", "testsrc2=size=320x180:rate=30000/1001",
         "-f", "lavfi", "-i", "anoisesrc=color=pink:seed=7:sample_rate=48000:amplitude=0.4",
         "-vf", "drawtext=text='%{frame_num}':fontsize=90:fontcolor=white:box=1:boxcolor=black:x=10:y=40",
         "-t", "4.004", "-c:v", "libx264", "-preset", "ultrafast", "-g", "30",
         "-c:a", "aac", "-ac", "1", str(path)],
        check=True)  # fmt: skip


def track_files(app: IngestApp) -> dict[str, Path]:
    """'video' / 'audio' -> the archived fragmented MP4 of that track."""
    status = app.point.status()
    tracks = status["publishing_points"]["live/lock"]["streams"]["av"]["tracks"]
    return {("video" if t == "1" else "audio"): app.archive.root / track["file"] for t, track in tracks.items()}


def packet_times(path: Path) -> list[int]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "0", "-show_entries", "packet=pts",
                          "-of", "json", str(path)], check=True, capture_output=True, text=True)  # fmt: skip
    return [int(p["pts"]) for p in json.loads(out.stdout)["packets"]]


def pictures(path: Path) -> dict[int, bytes]:
    """pts -> the decoded picture, scaled down to SIDE, gray."""
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-vf", f"scale={SIDE[0]}:{SIDE[1]}",
         "-fps_mode", "passthrough", "-pix_fmt", "gray", "-f", "rawvideo", "-"],
        check=True, capture_output=True).stdout  # fmt: skip
    size = SIDE[0] * SIDE[1]
    frames = [raw[i : i + size] for i in range(0, len(raw), size)]
    times = packet_times(path)
    assert len(frames) == len(times)
    return dict(zip(times, frames, strict=True))


def sound(path: Path) -> tuple[int, array]:
    """(pts of the first sample at 48 kHz, mono PCM decimated to DECIMATED_RATE)."""
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-ac", "1", "-ar", str(DECIMATED_RATE),
         "-f", "s16le", "-"], check=True, capture_output=True).stdout  # fmt: skip
    return packet_times(path)[0], array("h", raw)


def difference(a: bytes, b: bytes) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def assert_same_pictures(primary: dict[int, bytes], backup: dict[int, bytes], step: int) -> int:
    """Every picture at a common timestamp is the other group's picture at that very timestamp:
    they differ by no more than coding noise, and no picture up to 5 frames before or after
    matches better (a tie is allowed: the source itself can hold a picture for two frames).
    Returns how many were compared."""
    common = sorted(set(primary) & set(backup))
    assert len(common) >= 90, f"only {len(common)} pictures in common"
    wrong = {}
    for t in common:
        scores = {s: difference(primary[t], backup[t + s * step]) for s in range(-5, 6) if t + s * step in backup}
        best = min(scores, key=lambda s: scores[s])
        if scores[0] > NOISE or scores[0] > scores[best] + TIE:
            wrong[t // step] = (best, round(scores[0], 2))
    assert not wrong, f"{len(wrong)} of {len(common)} pictures are off (frame: best offset, difference): " + str(
        sorted(wrong.items())[:8]
    )
    return len(common)


def audio_lag(primary: tuple[int, array], backup: tuple[int, array]) -> int:
    """The lag (in 48 kHz samples) that best lines the backup's sound up with the primary's, over
    their common span; 0 when the same sound is under the same timestamps."""
    scale = 48000 // DECIMATED_RATE
    (p_start, p), (b_start, b) = primary, backup
    start = max(p_start, b_start) // scale + 200  # skip the edges
    end = min(p_start // scale + len(p), b_start // scale + len(b)) - 200
    assert end - start >= DECIMATED_RATE * 2, "less than 2 s of sound in common"
    end = min(end, start + DECIMATED_RATE * 3)
    ps = p[start - p_start // scale : end - p_start // scale]
    best, best_lag = None, 0
    for lag in range(-150, 151):  # +-0.05 s
        bs = b[start - b_start // scale + lag : end - b_start // scale + lag]
        score = sum(x * y for x, y in zip(ps, bs, strict=True))
        if best is None or score > best:
            best, best_lag = score, lag
    return best_lag * scale


def assert_same_content(primary: IngestApp, backup: IngestApp) -> None:
    p, b = track_files(primary), track_files(backup)
    assert_same_pictures(pictures(p["video"]), pictures(b["video"]), step=3003)
    lag = audio_lag(sound(p["audio"]), sound(b["audio"]))
    assert abs(lag) < AAC_FRAME, f"the backup's sound is {lag} samples off the primary's"


# --- the marked clip: its own frame number burnt in as blocks, a pip on each of its seconds

MARK_BITS = 12  # the clip frame number, as a row of black/white blocks across the top of the picture
MARK_SIZE = 20  # pixels per block, on a 320x180 picture (the profile's size)
MARKED_FRAMES = 160  # 6.4 s at 25 fps: 307,200 samples at 48 kHz = 300 AAC frames, so the loop is exactly N/25
PIP = 4800  # the clip's tone is on for the first 100 ms of every clip second


def make_marked_clip(path: Path, *, rate: str = "25", seconds: float = MARKED_FRAMES / 25) -> None:
    """A clip (6.4 s at 25 fps by default) whose every picture carries its own frame number as
    MARK_BITS blocks (bit b white iff set) across the top, read back exactly, over a moving test
    picture, and a 1 kHz pip on each of its seconds (its first 100 ms). The blocks are drawn on
    a strip only (geq is slow per pixel) and overlaid."""
    width = MARK_BITS * MARK_SIZE
    bits = (f"color=black:size={width}x{MARK_SIZE}:rate={rate},format=gray,"
            f"geq=lum='255*mod(floor(N/pow(2,floor(X/{MARK_SIZE}))),2)'")  # fmt: skip
    graph = f"testsrc2=size=320x180:rate={rate}[bg];{bits}[bits];[bg][bits]overlay=0:0:shortest=1,format=yuv420p"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-f", "lavfi", "-i", graph,
         "-f", "lavfi", "-i", "aevalsrc='0.5*sin(2*PI*1000*t)*lt(mod(t,1),0.1)':sample_rate=48000",
         "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-g", "50",
         "-c:a", "aac", "-ac", "1", str(path)],
        check=True)  # fmt: skip


def marks(path: Path) -> dict[int, int]:
    """pts -> the clip frame number the picture carries (its blocks, thresholded at mid-gray)."""
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-fps_mode", "passthrough", "-pix_fmt", "gray",
         "-f", "rawvideo", "-"], check=True, capture_output=True).stdout  # fmt: skip
    size, row = 320 * 180, 320 * (MARK_SIZE // 2)
    frames = [raw[i : i + size] for i in range(0, len(raw), size)]
    times = packet_times(path)
    assert len(frames) == len(times)
    return {t: sum(1 << b for b in range(MARK_BITS) if f[row + b * MARK_SIZE + MARK_SIZE // 2] > 128)
            for t, f in zip(times, frames, strict=True)}  # fmt: skip


def holes(path: Path, step: int) -> list[tuple[int, int]]:
    """(first missing frame, how many) of each gap in a video archive whose pictures are ``step``
    ticks apart: a restarted group skips the fragment it cannot fill from its first frame."""
    times = packet_times(path)
    return [(a // step + 1, (b - a) // step - 1) for a, b in itertools.pairwise(times) if b - a != step]


def pip_onsets(path: Path) -> list[int]:
    """The shared sample numbers (48 kHz) where the decoded sound turns on after a silence. Each
    AAC packet decodes to AAC_FRAME samples, placed at its own timestamp (a restart leaves a gap)."""
    times = packet_times(path)
    raw = subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-ac", "1", "-f", "s16le", "-"],
                         check=True, capture_output=True).stdout  # fmt: skip
    pcm = array("h", raw)
    assert len(pcm) == AAC_FRAME * len(times)
    onsets, quiet = [], 0
    for i, value in enumerate(pcm):
        packet, within = divmod(i, AAC_FRAME)
        if within == 0 and packet and times[packet] != times[packet - 1] + AAC_FRAME:
            quiet = 0  # a gap: what came before says nothing about what follows
        if abs(value) > 3000:
            if quiet > 24000:  # after at least half a second of silence
                onsets.append(times[packet] + within)
            quiet = 0
        else:
            quiet += 1
    return onsets
