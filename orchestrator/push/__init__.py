"""The push side: the fan-out of a group's streams to its endpoints, one publisher per (group,
stream, endpoint) with its outbox (catch-up backlog and forward buffer), the request lifecycle,
the retry policy and the transport seam. Pure modules (outbox, lifecycle, failures, reconnect)
import only ``fmp4``, ``wire`` and the top-level core; the shells (fanout, handoff, publisher,
connection, memory) add trio, h11, httpx and ``ops``. Never imports ``encode``: whatever
produces a stream (an encoder, a relay's ingest) hands it to the fan-out.
"""
