#!/usr/bin/env python3
"""Threaded snakepit worker: many tool calls at once in one process.

    python grpc_server_threaded.py --port 50052 --max-workers 16 --thread-safety-check

Flags: python grpc_server_threaded.py --help
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from a checkout without installing

from snakepit_bridge.server.main import main_threaded  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_threaded())
