"""Adapters that ship with snakepit_bridge: `showcase.ShowcaseAdapter` (the process server's default)
and `threaded_showcase.ThreadedShowcaseAdapter` (the threaded server's default)."""
