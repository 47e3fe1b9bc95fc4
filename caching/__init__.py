"""Redis-backed caches shared by every process: agent results (and, later, memoized functions)."""
