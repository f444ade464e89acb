import xml.etree.ElementTree as ET

from orchestrator.wire.smooth import ManifestTrack, live_server_manifest

SMIL = "{http://www.w3.org/2001/SMIL20/Language}"


def tracks():
    return [
        ManifestTrack("video", 1, "video_720p", 3_000_000, 90000, "avc1", width=1280, height=720),
        ManifestTrack("audio", 2, "audio_eng", 128_000, 48000, "mp4a", language="eng", sample_rate=48000, channels=2),
    ]


def params(element):
    return {p.get("name"): p.get("value") for p in element.findall(f"{SMIL}param")}


def test_manifest_lists_each_track_with_its_params():
    root = ET.fromstring(live_server_manifest(tracks()))
    switch = root.find(f"{SMIL}body/{SMIL}switch")
    video, audio = list(switch)
    assert video.tag == f"{SMIL}video"
    assert video.get("src") == "video_720p"
    assert video.get("systemBitrate") == "3000000"
    assert params(video) == {
        "systemBitrate": "3000000", "trackID": "1", "trackName": "video_720p", "timescale": "90000",
        "FourCC": "H264", "MaxWidth": "1280", "MaxHeight": "720",
    }  # fmt: skip
    assert audio.get("systemLanguage") == "eng"
    assert params(audio) == {"systemBitrate": "128000", "trackID": "2", "trackName": "audio_eng",
                             "timescale": "48000", "FourCC": "AACL", "SamplingRate": "48000", "Channels": "2",
                             "BitsPerSample": "16"}  # fmt: skip


def test_manifest_is_deterministic_and_escapes_names():
    odd = [ManifestTrack("video", 1, "a&b", 1, 90000, "avc1")]
    first = live_server_manifest(odd)
    assert first == live_server_manifest(odd)
    assert 'src="a&amp;b"' in first
    ET.fromstring(first)  # still well-formed
