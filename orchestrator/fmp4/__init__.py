"""The fragmented-MP4 wire format: box writers and parsers, the incremental reader, the Live
Server Manifest, and the stream header / encoded fragment types handed between encoders and
publishers. Pure: imports only the top-level core (errors, clock, profile), never I/O.
"""
