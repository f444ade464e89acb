"""Tools for tests and benchmarks that ship with the package: the TCP fault proxy, the counting
sink (``countsink``, its core in ``bodyscan``) and the profile builder (``profiles``). May import
the top-level core; nothing in the product imports this package.
"""
