"""The README from a newcomer's shell.

A copy of this checkout with no `.venv`; shells whose PATH holds only the system's directories (the
machine's pip configuration stays: it is the machine's, not the project's); and nothing run in them
but what the README says: `bash scripts/serve.sh` in one, `source .venv/bin/activate` in the next,
then its commands and examples as written (only the port is changed, so that this test can run
beside others)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.servers import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
READY = re.compile(r"^SNAKEPIT_READY port=(\d+)", re.M)


def section(title: str) -> str:
    text = README[README.index(f"\n{title}\n"):]
    return text[:text.index("\n## ", 1)]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def newcomer_env(home: Path, **extra: str) -> dict[str, str]:
    env = {"PATH": SYSTEM_PATH, "HOME": str(home), "LANG": "C.UTF-8", "TMPDIR": str(home)}
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_") or k.lower().endswith("_proxy")})
    env.update(extra)
    return env


def in_shell(script: str, cwd: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """`script` in a new bash whose only set-up is the README's `source .venv/bin/activate`."""
    return subprocess.run(["bash", "-c", "source .venv/bin/activate\n" + script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def start(command: str, cwd: Path, env: dict[str, str], timeout: float = 180) -> subprocess.Popen:
    process = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    seen = []
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if READY.match(line):
            return process
    stop(process)
    raise AssertionError(f"{command!r} never became ready:\n{''.join(seen)[-4000:]}")


def stop(process: subprocess.Popen) -> int:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """This checkout's files (tracked, and new ones git does not ignore) in a fresh directory."""
    copy = tmp_path_factory.mktemp("newcomer") / "snakepit_bridge"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    assert not (copy / ".venv").exists()
    return copy


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_every_readme_command_works_from_a_shell_that_ran_only_the_readmes_commands(checkout, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    # Shell 1: the README's main job.
    server = start("bash scripts/serve.sh", checkout, newcomer_env(home, SNAKEPIT_PORT=str(port)))
    try:
        # Shell 2: the grpcurl section, as written, with `grpcurl` from what serve.sh installed.
        commands = "\n".join(code_blocks(section("## Calling it with grpcurl"), "bash"))
        commands = commands.replace("127.0.0.1:50052", f"127.0.0.1:{port}")
        ok, failing = commands.split("grpcurl -plaintext -v -d '{\"tool_name\": \"fail\"")
        run = in_shell("set -e\n" + ok, checkout, newcomer_env(home))
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        assert '"result_json": "5"' in run.stdout and '"status": "SERVING"' in run.stdout
        run = in_shell("grpcurl -plaintext -v -d '{\"tool_name\": \"fail\"" + failing, checkout, newcomer_env(home))
        assert run.returncode != 0 and "snakepit-error-bin" in run.stdout + run.stderr
    finally:
        assert stop(server) == 0  # SIGTERM: a clean shutdown

    # The adapter examples: my_adapters.py as the README writes it, served by the README's command.
    adapters = code_blocks(section("## Writing an adapter"), "python")[0] + "\n\n" + \
        code_blocks(section("## Threaded workers"), "python")[0]
    (checkout / "my_adapters.py").write_text(adapters)
    for command in code_blocks(section("## Writing an adapter"), "bash") + code_blocks(section("## Threaded workers"),
                                                                                       "bash"):
        command = re.sub(r"--port \d+", f"--port {free_port()}", command)
        assert stop(start("source .venv/bin/activate\n" + command, checkout, newcomer_env(home), timeout=60)) == 0

    # The toolkit's examples, each a script of its own.
    for number, example in enumerate(code_blocks(section("## Concurrency toolkit"), "python")):
        script = checkout / f"readme_example_{number}.py"
        script.write_text(example)
        run = in_shell(f"python {script.name}", checkout, newcomer_env(home))
        assert run.returncode == 0, f"{example}\n{run.stdout}\n{run.stderr}"
    leftovers = [p.name for p in home.iterdir()]
    assert not [name for name in leftovers if name.startswith("tmp")], leftovers  # the examples clean up
