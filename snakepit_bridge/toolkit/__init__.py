"""The concurrency toolkit, usable with or without the server:

- `rng`: reproducible random streams per thread, request and session (`RNG`, `derive_rng`, `get_rng`).
- `checkpoint`: file-locked, atomic checkpoints (`SafeCheckpoint`).
- `ratelimit`: a thread-safe token bucket (`RateLimiter`).
- `frozen`: deep-frozen values for shared read-only state (`Frozen`, `frozen_mapping`, `thaw`).
- `batch`: fan a batch out over threads with per-item error isolation (`run_batch`).

The README imports them by their short paths (`snakepit_bridge.rng`, ...): the same modules.
"""
