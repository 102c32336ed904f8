#!/usr/bin/env python3
"""Process snakepit worker: one tool call at a time per process, for adapters that are not thread-safe.

    python grpc_server_process.py --port 50053 --processes 4

Flags: python grpc_server_process.py --help
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from a checkout without installing

from snakepit_bridge.server.main import main_process  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_process())
