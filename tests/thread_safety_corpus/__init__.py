"""Small adapters for the ThreadSafetyChecker, each served by the real threaded server.

Every class declares ``CALLS``: the tool calls a test makes, each many times from many client
threads at once, and ``EXPECT``: what the checker must report, ``None`` for "nothing", otherwise
``("unprotected_shared_state", attribute)`` or ``("unsafe_library", library)``.

``racy`` holds adapters with real races (the checker must flag the named attribute or library),
``safe`` holds correct ones (locked, thread-local, read-only, immutable) that it must not flag.
"""
