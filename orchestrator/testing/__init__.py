"""Tools for tests and benchmarks that ship with the package: the TCP fault proxy. May import
the top-level core; nothing in the product imports this package.
"""
