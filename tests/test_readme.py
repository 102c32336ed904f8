"""The README's examples work as written: its adapters serve, its grpcurl commands succeed."""
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from snakepit_bridge.client import BridgeCallError
from tests.servers import ROOT, WorkerServer

README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    text = README[README.index(f"## {title}"):]
    return text[:text.index("\n## ", 1)]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


@pytest.fixture()
def my_adapters(tmp_path):
    """my_adapters.py as a reader would write it: the README's adapter examples, verbatim."""
    scorer = code_blocks(section("Writing an adapter"), "python")[0]
    counter = code_blocks(section("Threaded workers"), "python")[0]
    (tmp_path / "my_adapters.py").write_text(scorer + "\n\n" + counter)
    return tmp_path


def test_the_scorer_adapter_from_the_readme_serves_its_tools(my_adapters):
    with WorkerServer("process", "--adapter", "my_adapters.Scorer", env={"PYTHONPATH": str(my_adapters)}) as server:
        client = server.client()
        assert client.execute("score", {"features": [1, 1, 1, 1]}) == pytest.approx(2.0)
        with pytest.raises(BridgeCallError) as wrong:
            client.execute("score", {"features": [1]})
        assert wrong.value.code == grpc.StatusCode.UNKNOWN
        assert wrong.value.tool_error.type == "ToolError"
        chunks = client.stream("countdown", {"start": 3})
        assert list(chunks) == [3, 2, 1]


def test_the_counter_adapter_from_the_readme_is_race_free_under_the_checker(my_adapters, tmp_path):
    report_path = tmp_path / "report.json"
    server = WorkerServer("threaded", "--adapter", "my_adapters.Counter", "--max-workers", "8",
                          "--thread-safety-check", "--thread-safety-report", str(report_path),
                          env={"PYTHONPATH": str(my_adapters)})
    with server:
        client = server.client()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: client.execute("lookup", {"key": "ab"[i % 2]}), range(200)))
        assert sorted(set(results)) == [1.0, 2.0]
    report = json.loads(report_path.read_text())
    assert report["tracked_adapters"] == ["my_adapters.Counter"]
    assert report["findings"] == []
    assert report["methods"]["Counter.lookup"]["calls"] == 200


def grpcurl_commands() -> list[str]:
    commands = []
    for block in code_blocks(section("Calling it with grpcurl"), "bash"):
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip().startswith("grpcurl"):
                commands.append(command.strip())
    return commands


def test_the_readme_has_grpcurl_examples_for_every_rpc():
    text = " ".join(grpcurl_commands())
    for rpc in ("Ping", "DescribeTools", "ExecuteTool", "ExecuteStreamingTool", "ExecuteBatch", "InitializeSession",
                "GetSession", "GetStats", "Health/Check", " list", "describe"):
        assert rpc in text, rpc


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is installed by the test extras")
def test_every_grpcurl_command_in_the_readme_works_against_the_threaded_server():
    with WorkerServer("threaded") as server:  # the README's main job: default adapter
        for command in grpcurl_commands():
            run = subprocess.run(command.replace("127.0.0.1:50052", server.address), shell=True, capture_output=True,
                                 text=True, timeout=30)
            if '"tool_name": "fail"' in command:
                assert run.returncode != 0, command
                assert "ValueError: boom" in run.stderr + run.stdout
                assert "snakepit-error-bin" in run.stdout + run.stderr  # -v shows the trailer
            else:
                assert run.returncode == 0, f"{command}\n{run.stdout}\n{run.stderr}"
        assert server.process.poll() is None  # the failing call left it serving
