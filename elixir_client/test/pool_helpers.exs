defmodule Snakepit.PoolHelpers do
  @moduledoc false
  # Shared helpers of the pool tests (real Python workers from this repository).
  import ExUnit.Assertions

  @doc "Starts a uniquely named pool, stops it when the test ends; returns its name."
  def start_pool!(config) do
    config = Map.new(config)
    name = Map.get_lazy(config, :name, fn -> :"pool_#{System.unique_integer([:positive])}" end)
    config = Map.put(config, :name, name)
    {:ok, _pid} = Snakepit.start_pool(config)
    ExUnit.Callbacks.on_exit(fn -> Snakepit.stop_pool(name) end)
    name
  end

  @support_dir Path.expand("support", __DIR__)

  @doc "Config keys that run `test/support/pool_test_adapters.py`'s adapter `class`."
  def test_adapter(class) do
    %{python_adapter: "pool_test_adapters." <> class, adapter_env: [{"PYTHONPATH", @support_dir}]}
  end

  @doc "Starts a uniquely named pool without waiting for its workers; stops it when the test ends."
  def start_pool_no_wait!(config) do
    name = :"pool_#{System.unique_integer([:positive])}"
    {:ok, _} = Snakepit.start_pool(Map.put(Map.new(config), :name, name), await: false)
    ExUnit.Callbacks.on_exit(fn -> Snakepit.stop_pool(name) end)
    name
  end

  def os_alive?(os_pid) do
    {_, code} = System.cmd("kill", ["-0", Integer.to_string(os_pid)], stderr_to_stdout: true)
    code == 0 and not zombie?(os_pid)
  end

  defp zombie?(os_pid) do
    case File.read("/proc/#{os_pid}/stat") do
      {:ok, stat} -> stat |> String.split(") ") |> Enum.at(1, "") |> String.starts_with?("Z")
      _ -> false
    end
  end

  def kill9(os_pid),
    do: System.cmd("kill", ["-9", Integer.to_string(os_pid)], stderr_to_stdout: true)

  @doc "Sends `signal` (\"STOP\", \"CONT\", ...) to an OS process."
  def signal(os_pid, signal),
    do: System.cmd("kill", ["-" <> signal, Integer.to_string(os_pid)], stderr_to_stdout: true)

  @doc "Polls `fun` until it returns truthy, at most `timeout` ms."
  def eventually(fun, timeout \\ 10_000, step \\ 50) do
    deadline = System.monotonic_time(:millisecond) + timeout
    do_eventually(fun, deadline, step)
  end

  defp do_eventually(fun, deadline, step) do
    case fun.() do
      v when v not in [nil, false] ->
        v

      _ ->
        if System.monotonic_time(:millisecond) > deadline do
          flunk("condition not met in time")
        else
          Process.sleep(step)
          do_eventually(fun, deadline, step)
        end
    end
  end

  def ready_workers(pool),
    do: pool |> Snakepit.list_workers() |> Enum.filter(&(&1.status == :ready))

  def timed(fun) do
    t0 = System.monotonic_time(:millisecond)
    r = fun.()
    {System.monotonic_time(:millisecond) - t0, r}
  end
end
