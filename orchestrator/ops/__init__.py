"""Operations: metrics, the process's live state as plain data, the /status document and
readiness, the metrics listener (/metrics /healthz /readyz /status) on the HTTP seam that also
serves the ingest server, the operator's view (live table, ``orchestrator status``), the
confidence monitor (``/monitor``: pictures decoded by ffmpeg while a page is open). May import
only the top-level core: every other concern reports into it, never the other way round.
"""
