"""The push side: one publisher per (group, stream, endpoint), its outbox (catch-up backlog and
forward buffer), the reconnect policy and the hand-off from the encoder. Pure modules (outbox,
reconnect) import only ``fmp4``, ``wire`` and the top-level core; the shells add trio, httpx and ``ops``.
"""
