"""On-demand benchmarks (``make bench``); not part of the fast test suite.

Each ``benchmarks/bench_*.py`` module has a ``main()`` that runs its benchmark
with defaults and writes its own section of ``BENCHMARKS.md`` through
:func:`benchmarks.common.write_section`. ``python -m benchmarks.run_all`` runs
them all, in file-name order.
"""
