import itertools
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator.encode.synthetic import SyntheticStream, clip_for
from orchestrator.errors import EncoderError
from orchestrator.fmp4 import boxes
from orchestrator.fmp4.reader import NEED_DATA, Fragment, Header, StreamReader
from orchestrator.profile import load_profile, parse_profile

DEMO = Path(__file__).resolve().parents[2] / "profiles" / "demo.toml"
K = 14_080_000  # a fragment index in late 2026 for the demo's 2 s fragments


@pytest.fixture(scope="module")
def profile():
    return load_profile(DEMO)


def test_primary_and_backup_instances_emit_identical_bytes(profile):
    for stream in profile.streams:
        primary, backup = SyntheticStream(profile, stream), SyntheticStream(profile, stream)
        assert primary.header.data == backup.header.data
        for k in (K, K + 1, K + 7):
            assert [f.data for f in primary.fragment(k)] == [f.data for f in backup.fragment(k)]


def test_fragment_is_stamped_from_the_shared_clock(profile):
    for stream in profile.streams:
        source = SyntheticStream(profile, stream)
        (clock,) = source.clocks
        (fragment,) = source.fragment(K)
        assert (fragment.index, fragment.start, fragment.duration) == (K, clock.start(K), clock.duration(K))
        parsed = boxes.parse_fragment(fragment.data)
        assert parsed.sequence_number == K
        (traf,) = parsed.trafs
        assert traf.base_time == clock.start(K)
        assert traf.tfxd == boxes.Tfxd(1, clock.start(K), clock.duration(K), None)
        assert [s.duration for s in traf.samples] == clock.sample_durations(K)
        assert all(s.is_sync for s in traf.samples)


def test_tfxd_version_2_carries_the_index(profile):
    text = DEMO.read_text().replace("tfxd_version = 1", "tfxd_version = 2")
    v2 = parse_profile(text, "v2.toml")
    (fragment,) = SyntheticStream(v2, v2.streams[0]).fragment(K)
    assert boxes.parse_fragment(fragment.data).trafs[0].tfxd.fragment_index == K


def test_consecutive_fragments_are_contiguous(profile):
    source = SyntheticStream(profile, profile.streams[0])
    fragments = [source.fragment(k)[0] for k in range(K, K + 5)]
    for a, b in itertools.pairwise(fragments):
        assert a.start + a.duration == b.start
        assert b.index == a.index + 1


def test_unsupported_audio_clip_is_a_clear_error(profile):
    text = DEMO.read_text().replace("sample_rate = 48000", "sample_rate = 32000")
    odd = parse_profile(text, "odd.toml")
    with pytest.raises(EncoderError, match="32000 Hz"):
        clip_for(odd.streams[1].tracks[0])


def test_header_reads_back(profile):
    source = SyntheticStream(profile, profile.streams[1])
    reader = StreamReader(require_manifest=True)
    reader.feed(source.header.data)
    header = reader.next_event()
    assert isinstance(header, Header)
    assert header.data == source.header.data
    (track,) = header.tracks
    # Track IDs are presentation-wide: the audio stream's only track is the presentation's second.
    assert (track.track_id, track.handler, track.timescale, track.codec) == (2, b"soun", 48000, "mp4a")
    assert 'trackName" value="audio_eng"' in header.smil


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="needs ffprobe: apt-get install ffmpeg (see README)")
@pytest.mark.parametrize("stream_index", [0, 1])
def test_ffprobe_decodes_every_frame(profile, tmp_path, stream_index):
    source = SyntheticStream(profile, profile.streams[stream_index])
    (clock,) = source.clocks
    path = tmp_path / "out.mp4"
    ks = range(K, K + 4)
    path.write_bytes(source.header.data + b"".join(source.fragment(k)[0].data for k in ks))
    # Sanity: our own reader sees the same four fragments.
    reader = StreamReader()
    reader.feed(path.read_bytes())
    events = []
    while (event := reader.next_event()) is not NEED_DATA:
        events.append(event)
    assert sum(isinstance(e, Fragment) for e in events) == 4
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_entries", "stream=codec_name,nb_read_frames",
         "-of", "json", str(path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (stream,) = json.loads(out.stdout)["streams"]
    assert stream["codec_name"] == ("h264" if stream_index == 0 else "aac")
    expected_frames = sum(clock.frame_count(k) for k in ks)
    # AAC decoders may hold back the first frame (priming); every video frame must decode.
    decoded = int(stream["nb_read_frames"])
    assert expected_frames - (1 if stream_index else 0) <= decoded <= expected_frames
