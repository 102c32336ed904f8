defmodule Snakepit.TestServer do
  @moduledoc false
  # Starts test/support/bridge_test_server.py and waits for its READY line. The server exits when
  # the port (its stdin) closes.

  @script Path.expand("bridge_test_server.py", __DIR__)

  @spec start([String.t()]) :: %{port: pos_integer(), os_pid: pos_integer(), handle: port()}
  def start(extra_args \\ []) do
    python = System.find_executable("python3") || raise "python3 not found"

    handle =
      Port.open({:spawn_executable, python}, [
        :binary,
        :exit_status,
        {:line, 4096},
        args: ["-u", @script | extra_args]
      ])

    wait_ready(handle, System.monotonic_time(:millisecond) + 20_000)
  end

  defp wait_ready(handle, deadline) do
    left = max(deadline - System.monotonic_time(:millisecond), 0)

    receive do
      {^handle, {:data, {:eol, "READY port=" <> rest}}} ->
        [port, "pid=" <> pid] = String.split(rest, " ")
        %{port: String.to_integer(port), os_pid: String.to_integer(pid), handle: handle}

      {^handle, {:data, _other}} ->
        wait_ready(handle, deadline)

      {^handle, {:exit_status, status}} ->
        raise "test server exited with status #{status}"
    after
      left -> raise "test server did not become ready"
    end
  end

  @spec stop(%{handle: port(), os_pid: pos_integer()}) :: :ok
  def stop(%{handle: handle, os_pid: os_pid}) do
    if Port.info(handle), do: Port.close(handle)
    System.cmd("kill", ["-TERM", to_string(os_pid)], stderr_to_stdout: true)
    :ok
  end
end
