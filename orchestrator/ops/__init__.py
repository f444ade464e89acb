"""Operations: metrics, the process's live state as plain data, the HTTP seam that serves
metrics (and the ingest server), the terminal status view. May import only the top-level core:
every other concern reports into it, never the other way round.
"""
