"""migration layer: the untrusted engine (pre-copy, switchover, streams, statistics, fallback)."""
