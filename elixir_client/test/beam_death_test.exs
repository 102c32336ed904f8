Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.BeamDeathTest do
  # kill -9 of the BEAM that owns a pool leaves no Python process behind (stdin EOF).
  use ExUnit.Case, async: false
  import Snakepit.PoolHelpers

  @moduletag :slow
  @moduletag timeout: 120_000

  test "Python workers exit when their BEAM is killed with SIGKILL" do
    py_pids = beam_killed(:spawn)
    assert length(py_pids) == 2
  end

  test "a fork server and its workers exit when their BEAM is killed with SIGKILL" do
    # the fork server's pid and its two workers'
    py_pids = beam_killed(:fork_server)
    assert length(py_pids) == 3
  end

  # Starts a BEAM with a pool of 2 workers in `start_mode`, kills it -9, and checks that every
  # Python process of the pool (the fork server too) is gone within 5 s; returns their pids.
  defp beam_killed(start_mode) do
    ebins =
      [Application.app_dir(:snakepit, "ebin")] ++
        (:code.get_path()
         |> Enum.map(&to_string/1)
         |> Enum.filter(&String.contains?(&1, "jiffy")))

    script = """
    # should this test fail before its kill -9, the child halts when the test's port closes its stdin
    spawn(fn -> IO.read(:stdio, :line); System.halt(0) end)
    {:ok, _} = Application.ensure_all_started(:snakepit)
    {:ok, _} = Snakepit.start_pool(name: :doomed, worker_profile: :thread, pool_size: 2, threads_per_worker: 2, start_mode: #{inspect(start_mode)})
    fork_server = Snakepit.Pool.stats(:doomed).fork_server_os_pid
    pids = Enum.map(Snakepit.list_workers(:doomed), & &1.os_pid) ++ List.wrap(fork_server)
    IO.puts("BEAM_PID " <> System.pid() <> " PYTHON_PIDS " <> Enum.join(pids, ","))
    Process.sleep(:infinity)
    """

    elixir = System.find_executable("elixir")
    args = Enum.flat_map(ebins, &["-pa", &1]) ++ ["-e", script]

    port =
      Port.open({:spawn_executable, elixir}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        {:line, 4096},
        args: args
      ])

    {beam_pid, py_pids} = read_pids(port, System.monotonic_time(:millisecond) + 60_000)
    on_exit(fn -> kill9(beam_pid) end)
    assert Enum.all?(py_pids, &os_alive?/1)

    kill9(beam_pid)
    eventually(fn -> Enum.all?(py_pids, &(not os_alive?(&1))) end, 5_000)
    py_pids
  end

  defp read_pids(port, deadline) do
    receive do
      {^port, {:data, {:eol, "BEAM_PID " <> rest}}} ->
        [beam, "PYTHON_PIDS", py] = String.split(rest, " ")
        {String.to_integer(beam), py |> String.split(",") |> Enum.map(&String.to_integer/1)}

      {^port, {:data, _}} ->
        read_pids(port, deadline)

      {^port, {:exit_status, s}} ->
        flunk("child BEAM exited with #{s}")
    after
      max(deadline - System.monotonic_time(:millisecond), 0) ->
        flunk("child BEAM did not report its pids")
    end
  end
end
