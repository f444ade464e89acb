"""The ingest side: a local publishing point. The receiver core (per-POST checks,
de-duplication, archive decisions) is pure and asks the wire format's receiver rules for what is
format-specific; the server is its hypercorn/trio shell, with its confidence monitor (what each
group sent, side by side). May import ``fmp4``, ``wire``, ``ops``
(the HTTP seam, the monitor's decoder) and the top-level core, never the push or encode sides.
"""
