"""Wire formats: what one ingest protocol adds to the shared ISO BMFF of ``fmp4`` (the interface
in ``format``; Smooth Streaming in ``smooth``). Pure: may import the top-level core and ``fmp4``,
never I/O; ``push``, ``encode``, ``ingest`` and the app may import it.
"""
