"""Thread safety: adapters that declare it (`adapter`: `ThreadSafeAdapter`, `@thread_safe_method`,
`acquire_lock()`, thread-local state), the declaration's rule and message (`declaration`), and a
runtime checker that proves it (`checker/`: `ThreadSafetyChecker`, a facade over lockset,
instrumentation, library detection, overlap and reporting). The adapter side tells the checker what
happens only through `hooks.CheckerHooks`. `interpreter` says whether the GIL is on.

The guide's import paths, `snakepit_bridge.base_adapter_threaded` and
`snakepit_bridge.thread_safety_checker`, are `adapter` and the `checker` package.
"""
