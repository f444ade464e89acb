import itertools
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator.encode.synthetic import FragmentTemplates, SyntheticStream, clip_for
from orchestrator.errors import EncoderError
from orchestrator.fmp4.reader import NEED_DATA, Fragment, Header, StreamReader
from orchestrator.profile import load_profile, parse_profile
from orchestrator.wire import smooth

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
        parsed = smooth.parse_fragment(fragment.data)
        assert parsed.sequence_number == K
        (traf,) = parsed.trafs
        assert traf.base_time == clock.start(K)
        assert traf.tfxd == smooth.Tfxd(1, clock.start(K), clock.duration(K), None)
        assert [s.duration for s in traf.samples] == clock.sample_durations(K)
        assert all(s.is_sync for s in traf.samples)


def test_tfxd_version_2_carries_the_index(profile):
    text = DEMO.read_text().replace("tfxd_version = 1", "tfxd_version = 2")
    v2 = parse_profile(text, "v2.toml")
    (fragment,) = SyntheticStream(v2, v2.streams[0]).fragment(K)
    assert smooth.parse_fragment(fragment.data).trafs[0].tfxd.fragment_index == K


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
    reader = smooth.reader(require_manifest=True)
    reader.feed(source.header.data)
    header = reader.next_event()
    assert isinstance(header, Header)
    assert header.data == source.header.data
    (track,) = header.tracks
    # Track IDs are presentation-wide: the audio stream's only track is the presentation's second.
    assert (track.track_id, track.handler, track.timescale, track.codec) == (2, b"soun", 48000, "mp4a")
    assert 'trackName" value="audio_eng"' in header.manifest_text


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


# --- templates: the fast path, byte for byte the same as smooth.write_fragment ---------------

VIDEO_TRACK = """  [[streams.tracks]]
  kind = "video"
  name = "v_{name}"
  bitrate = 250_000
  width = 192
  height = 108
  frame_rate = "{rate}"
{extra}"""
AUDIO_TRACK = """  [[streams.tracks]]
  kind = "audio"
  name = "a_{name}"
  bitrate = 64_000
  sample_rate = {rate}
  channels = {channels}
"""
GROUPS = [
    line
    for group in ("primary", "backup")
    for line in (f"[groups.{group}]", 'encoder = { backend = "synthetic" }', f"  [[groups.{group}.endpoints]]",
                 '  name = "e"', '  region = "r"', '  url = "http://127.0.0.1:1/live/t.isml"', "")
]  # fmt: skip


def templated_profile(fragment_duration="2", tfxd_version=1):
    """Streams covering the clocks whose frame pattern is not trivial: 29.97 fps at 90 kHz (59.94
    frames per 2 s fragment), 23.976 fps at 10 MHz (durations alternate 417083/417084 ticks),
    44.1 kHz AAC (86.13 frames per fragment), a 25 fps track, and one stream with three tracks."""
    streams = [
        ("v25", VIDEO_TRACK.format(name="25", rate="25", extra="")),
        ("v2997", VIDEO_TRACK.format(name="2997", rate="30000/1001", extra="")),
        ("v23976", VIDEO_TRACK.format(name="23976", rate="24000/1001", extra="  timescale = 10_000_000\n")),
        ("a44", AUDIO_TRACK.format(name="44", rate=44100, channels=2)),
        ("a48", AUDIO_TRACK.format(name="48", rate=48000, channels=1)),
        ("muxed", VIDEO_TRACK.format(name="m2997", rate="30000/1001", extra="")
         + AUDIO_TRACK.format(name="m44", rate=44100, channels=1)
         + AUDIO_TRACK.format(name="m48", rate=48000, channels=2)),
    ]  # fmt: skip
    text = "\n".join([
        "[presentation]", 'name = "templates"', f"fragment_duration = {fragment_duration}",
        "epoch = 2026-01-01T00:00:00Z", "video_timescale = 90000", f"tfxd_version = {tfxd_version}", "",
        *(f'[[streams]]\nid = "{sid}"\n{tracks}' for sid, tracks in streams),
        *GROUPS,
    ])  # fmt: skip
    return parse_profile(text, "templates.toml")


@pytest.mark.parametrize(("fragment_duration", "tfxd_version", "first_k", "count"),
                         [("2", 1, K, 1_100), ("2", 2, K, 1_100), ("3.2", 1, K, 300), ("6", 1, 0, 300)])  # fmt: skip
def test_templated_fragments_are_the_bytes_write_fragment_writes(fragment_duration, tfxd_version, first_k, count):
    """Over consecutive indices, every fragment of every track equals the one built box by box.
    1,100 indices of 2 s are more than a whole period of every pattern above: the first frame of
    29.97 fps video comes back to the same place in the 50-frame clip every 1001 indices at most
    (1001 fragments are 60,000 frames), and every template of the period is used again."""
    profile = templated_profile(fragment_duration, tfxd_version)
    templates = FragmentTemplates(max_bytes=1 << 30)  # keep all, to see them used again
    made = 0
    for stream in profile.streams:
        source = SyntheticStream(profile, stream, templates)
        for k in range(first_k, first_k + count):
            fragments = source.fragment(k)
            assert fragments == source.written_fragment(k), (stream.id, k)
            made += len(fragments)
    assert templates.built == len(templates) < made / 2  # nothing dropped, templates used again


def test_templated_fragment_reads_back_as_the_clock_and_clip_say():
    profile = templated_profile()
    source = SyntheticStream(profile, profile.streams[-1], FragmentTemplates())
    for k in (K, K + 1, K + 2):
        for fragment, clock, clip, track_id in zip(source.fragment(k), source.clocks, source.clips,
                                                   source.track_ids, strict=True):  # fmt: skip
            (traf,) = smooth.parse_fragment(fragment.data).trafs
            first = clock.first_frame(k)
            assert (traf.track_id, traf.base_time) == (track_id, clock.start(k))
            assert traf.tfxd == smooth.Tfxd(1, clock.start(k), clock.duration(k), None)
            assert [s.duration for s in traf.samples] == clock.sample_durations(k)
            assert [s.data for s in traf.samples] == [
                clip.samples[n % len(clip.samples)] for n in range(first, clock.first_frame(k + 1))
            ]


def test_streams_of_one_configuration_share_one_template():
    """1,000 streams of 25 fps video in 2 s fragments: 50 frames, the whole clip, every time."""
    text = "\n".join(
        ["[presentation]", 'name = "many"', "fragment_duration = 2", "epoch = 2026-01-01T00:00:00Z", ""]
        + [f'[[streams]]\nid = "s{i}"\n' + VIDEO_TRACK.format(name=i, rate="25", extra="") for i in range(1000)]
        + GROUPS
    )  # fmt: skip
    profile = parse_profile(text, "many.toml")
    templates = FragmentTemplates()
    sources = [SyntheticStream(profile, stream, templates) for stream in profile.streams]
    for k in range(K, K + 3):
        for source in sources:
            source.fragment(k)
    assert (templates.built, len(templates)) == (1, 1)
    assert templates.bytes == len(sources[0].fragment(K)[0].data)


def test_templates_stay_within_their_byte_bound_least_recently_used_first():
    profile = templated_profile()
    stream = profile.streams[1]  # 29.97 fps: the first frame wanders through the clip
    clock = SyntheticStream(profile, stream, FragmentTemplates()).clocks[0]
    key = {k: (clock.first_frame(k) % 50, clock.frame_count(k)) for k in range(K, K + 10)}
    a, b, c = K, K + 1, K + 2
    assert len({key[a], key[b], key[c]}) == 3
    size = {k: len(SyntheticStream(profile, stream, FragmentTemplates()).fragment(k)[0].data) for k in (a, b, c)}
    templates = FragmentTemplates(max_bytes=size[a] + size[b] + min(size.values()) - 1)  # room for two
    source = SyntheticStream(profile, stream, templates)
    built = []
    for k in (a, b, a, c, a, b, b, c):
        assert source.fragment(k) == source.written_fragment(k)
        built.append(templates.built)
        assert templates.bytes == sum(t.size for t in templates._by_key.values()) <= templates.max_bytes
    # a, b built; a used again, so c drops b (the least recently used), not a; b drops c.
    assert built == [1, 2, 2, 3, 3, 4, 4, 5]
    assert len(templates) == 2
    # A bound smaller than one template keeps the newest only.
    tiny = FragmentTemplates(max_bytes=1)
    source = SyntheticStream(profile, stream, tiny)
    for k in (a, a, b, a):
        assert source.fragment(k) == source.written_fragment(k)
    assert (tiny.built, len(tiny), tiny.bytes) == (3, 1, size[a])
