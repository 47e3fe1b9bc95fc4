"""Redis-backed caches shared by every process: agent results (results.py) and memoized functions (memoize.py)."""
