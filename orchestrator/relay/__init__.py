"""The relay: someone else's Smooth encoder POSTs to it, and it pushes every stream on to the
profile's endpoints with the push side's publishers. Pure modules (intake, spool) import ``fmp4``,
``wire`` and the top-level core; the shells add trio, ``ops``, ``push`` and the ingest's path rules.
"""
