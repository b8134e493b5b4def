"""fastbert benchmarks: ``pytest bench/ --benchmark-only --benchmark-json=OUT.json`` then
``python -m bench.report OUT.json``; compile-time evidence with ``python -m bench.compile_report``."""
