"""An adapter module whose import raises something other than ImportError (the server's start-up
must still end with one `error:` line). Loaded by tests/test_server_lifecycle.py."""
raise RuntimeError("no GPU visible at import time")
