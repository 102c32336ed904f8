"""Thread safety: adapters that declare it (`adapter`: `ThreadSafeAdapter`, `@thread_safe_method`,
`acquire_lock()`, thread-local state) and a runtime checker that proves it (`checker`:
`ThreadSafetyChecker`). `interpreter` says whether the GIL is on.

The guide's import paths, `snakepit_bridge.base_adapter_threaded` and
`snakepit_bridge.thread_safety_checker`, are these modules.
"""
