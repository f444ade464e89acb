"""orchestrator: a multi-encoder redundancy orchestrator for fragmented-MP4 live ingest."""

__version__ = "0.1.0"
