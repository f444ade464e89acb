"""ISO BMFF for fragmented MP4, shared by every wire format: box writers and parsers, the
incremental reader, and the stream header / encoded fragment types handed between encoders and
publishers. What one ingest protocol adds lives in ``orchestrator.wire``. Pure: imports only the
top-level core (errors), never I/O, and never ``wire``.
"""
