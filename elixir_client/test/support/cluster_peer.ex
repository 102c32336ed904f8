defmodule Snakepit.Test.ClusterPeer do
  @moduledoc false
  # Other BEAM nodes on this machine for the cluster tests: each one a real `elixir --sname`
  # OS process (epmd on loopback, the test node's cookie) running this build's :snakepit
  # application, connected to the test node, which it outlives by no more than a nodedown: it
  # halts when the test node goes away.

  @epmd_env [{"ERL_EPMD_ADDRESS", "127.0.0.1"}]

  defstruct [:node, :os_pid, :port_owner]

  @doc """
  Makes the test node distributed (`snakepit_test_<os pid>@localhost`, epmd on 127.0.0.1)
  unless it already is; returns true when it started distribution (stop it with `stop_distribution/0`).
  """
  def ensure_distributed! do
    if node() == :nonode@nohost do
      {_, 0} = System.cmd("epmd", ["-daemon"], env: @epmd_env)
      name = :"snakepit_test_#{System.pid()}@localhost"
      {:ok, _} = start_net_kernel(name, 20)
      true
    else
      false
    end
  end

  # (epmd -daemon returns before it listens)
  defp start_net_kernel(name, tries) do
    case :net_kernel.start([name, :shortnames]) do
      {:ok, pid} ->
        {:ok, pid}

      {:error, _} = error when tries == 0 ->
        error

      {:error, _} ->
        Process.sleep(100)
        start_net_kernel(name, tries - 1)
    end
  end

  def stop_distribution, do: :net_kernel.stop()

  @doc "Starts a peer node `<prefix>_<unique>@localhost` and waits until it is connected."
  def start!(prefix, timeout \\ 60_000) do
    name = :"#{prefix}_#{System.pid()}_#{System.unique_integer([:positive])}@localhost"
    parent = self()

    code_paths =
      Enum.filter(:code.get_path(), fn path ->
        path = to_string(path)
        String.starts_with?(path, build_path()) or String.contains?(path, "jiffy")
      end)

    args =
      ["--sname", to_string(name), "--cookie", to_string(Node.get_cookie())] ++
        Enum.flat_map(code_paths, &["-pa", to_string(&1)]) ++
        ["-e", "Snakepit.Test.ClusterPeer.run(:'#{node()}')"]

    owner =
      spawn(fn ->
        port =
          Port.open({:spawn_executable, System.find_executable("elixir")}, [
            :binary,
            :exit_status,
            :stderr_to_stdout,
            args: args,
            env: Enum.map(@epmd_env, fn {k, v} -> {~c"#{k}", ~c"#{v}"} end)
          ])

        send(parent, {:peer_port, self(), port})
        drain(port, "")
      end)

    receive do
      {:peer_port, ^owner, _port} -> :ok
    end

    wait_connected(name, System.monotonic_time(:millisecond) + timeout, owner)
    os_pid = :erpc.call(name, System, :pid, []) |> String.to_integer()
    %__MODULE__{node: name, os_pid: os_pid, port_owner: owner}
  end

  defp build_path, do: Mix.Project.build_path()

  # keeps the peer's last output, shown should it exit before it connects
  defp drain(port, tail) do
    receive do
      {^port, {:data, data}} ->
        drain(port, String.slice(tail <> data, -4_000, 4_000))

      {^port, {:exit_status, status}} ->
        exit({:peer_exited, status, tail})

      {:tail, from} ->
        send(from, {:tail, tail})
        drain(port, tail)
    end
  end

  defp wait_connected(name, deadline, owner) do
    cond do
      name in Node.list() ->
        :ok

      not Process.alive?(owner) ->
        raise "peer #{name} exited before it connected"

      System.monotonic_time(:millisecond) > deadline ->
        send(owner, {:tail, self()})

        tail =
          receive do
            {:tail, t} -> t
          after
            1_000 -> ""
          end

        raise "peer #{name} did not connect in time; its output: #{tail}"

      true ->
        Process.sleep(50)
        wait_connected(name, deadline, owner)
    end
  end

  @doc "Stops a peer (and its pools' workers with it), if it still runs; kill -9 after 20 s."
  def stop(%__MODULE__{node: node, os_pid: os_pid}) do
    try do
      :erpc.call(node, System, :stop, [0], 5_000)
    catch
      _, _ -> :ok
    end

    unless gone?(node, 200), do: kill9(os_pid)
    :ok
  end

  @doc "kill -9 of the peer's BEAM (its OS process)."
  def kill9(%__MODULE__{os_pid: os_pid}), do: kill9(os_pid)

  def kill9(os_pid) when is_integer(os_pid) do
    case System.cmd("kill", ["-9", Integer.to_string(os_pid)], stderr_to_stdout: true) do
      {_, 0} -> :ok
      {out, _} -> {:error, out}
    end
  end

  defp gone?(node, tries) do
    cond do
      node not in Node.list() -> true
      tries == 0 -> false
      true -> wait_then(fn -> gone?(node, tries - 1) end)
    end
  end

  defp wait_then(fun) do
    Process.sleep(100)
    fun.()
  end

  @doc "Runs `Snakepit.<fun>(args...)` on the peer."
  def call(%__MODULE__{node: node}, fun, args, timeout \\ 60_000),
    do: :erpc.call(node, Snakepit, fun, args, timeout)

  @doc false
  # The peer's main (its `-e`): starts :snakepit, connects to the test node, halts when it goes.
  def run(parent) do
    # should the test's port close (the test node gone), its stdin ends: halt
    spawn(fn ->
      IO.read(:stdio, :line)
      System.halt(0)
    end)

    Logger.configure(level: :warning)
    {:ok, _} = Application.ensure_all_started(:snakepit)
    true = connect(parent, 100)
    Node.monitor(parent, true)

    receive do
      {:nodedown, ^parent} -> System.halt(0)
    end
  end

  defp connect(parent, tries) do
    cond do
      Node.connect(parent) == true -> true
      tries == 0 -> false
      true -> wait_then(fn -> connect(parent, tries - 1) end)
    end
  end

  @doc """
  A pool config of one thread worker with `threads` slots running test/support's
  `cluster_adapter.ClusterAdapter` (its `pid_after` tool says which worker served a call).
  """
  def pool_config(name, threads, extra \\ %{}) do
    Map.merge(
      %{
        name: name,
        worker_profile: :thread,
        pool_size: 1,
        threads_per_worker: threads,
        python_adapter: "cluster_adapter.ClusterAdapter",
        adapter_env: [{"PYTHONPATH", Path.expand(".", __DIR__)}]
      },
      extra
    )
  end
end
