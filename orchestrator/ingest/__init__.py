"""The ingest side: a local publishing point. The receiver core (per-POST checks,
de-duplication, archive decisions) is pure; the server is its hypercorn/trio shell. May import
the wire format, ``ops`` (the HTTP seam) and the top-level core, never the push or encode sides.
"""
