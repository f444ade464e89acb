"""Encoders: the group's encoder supervisor (restarts, stall watchdog, state persistence), the
continuity gate, the synthetic encoder, the ffmpeg instance, its command line and the recutter.
Pure modules (continuity, recut, ffmpeg_command) import ``fmp4``, ``wire`` and the top-level core;
the shells (group, ffmpeg, statefile) may also import trio, ``push`` (the outboxes they feed) and ``ops``.
"""
