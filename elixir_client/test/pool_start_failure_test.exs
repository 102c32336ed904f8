Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.PoolStartFailureTest do
  # A worker that exits before it is ready: its own last words reach start_pool and the callers at
  # once, not a bare timeout after startup_timeout; the pool keeps retrying with backoff.
  use ExUnit.Case, async: false
  import Snakepit.PoolHelpers
  alias Snakepit.Error

  @moduletag :slow
  @moduletag timeout: 120_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit)
    :ok
  end

  test "start_pool of an adapter that fails to import returns the Python error at once" do
    {ms, result} =
      timed(fn ->
        Snakepit.start_pool(%{
          name: :import_fails,
          pool_size: 2,
          python_adapter: "snakepit_bridge.adapters.nope.Missing",
          startup_timeout: 10_000
        })
      end)

    assert {:error, %Error{reason: :worker_start_failed, message: msg}} = result
    assert msg =~ "error: cannot import adapter module 'snakepit_bridge.adapters.nope'"
    assert ms < 5_000, "took #{ms} ms"
    eventually(fn -> Snakepit.Pool.whereis(:import_fails) == nil end, 2_000)
  end

  test "callers queued on a pool whose adapter setup raises get the exception line, while restarts go on" do
    pool =
      start_pool_no_wait!(
        Map.merge(test_adapter("BrokenSetupAdapter"), %{
          pool_size: 1,
          startup_timeout: 8_000,
          queue_timeout: 8_000
        })
      )

    {ms, result} = timed(fn -> Snakepit.execute(pool, "add", %{a: 1, b: 2}) end)

    assert {:error, %Error{reason: :worker_start_failed, message: msg}} = result

    assert msg =~
             "error: adapter setup failed: ValueError: model weights missing at /nonexistent/weights.bin"

    assert ms < 5_000, "took #{ms} ms"

    # later callers are not queued for startup_timeout either
    {ms, result} = timed(fn -> Snakepit.execute(pool, "add", %{a: 1, b: 2}) end)
    assert {:error, %Error{reason: :worker_start_failed}} = result
    assert ms < 1_000, "took #{ms} ms"

    assert {:error, %Error{reason: :worker_start_failed}} = Snakepit.await_ready(pool, 5_000)

    eventually(fn ->
      match?({:ok, %{workers_started: n}} when n >= 3, Snakepit.get_stats(pool))
    end)
  end

  test "a pool whose Python lacks grpc fails to start at once with the ModuleNotFoundError" do
    dir = Path.join(System.tmp_dir!(), "snakepit_nogrpc_#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    on_exit(fn -> File.rm_rf!(dir) end)
    python = Path.join(dir, "python")
    # -S: no site-packages, so no grpc, whatever is installed
    File.write!(python, "#!/bin/sh\nexec #{Snakepit.Config.default_python()} -S \"$@\"\n")
    File.chmod!(python, 0o755)

    {ms, result} =
      timed(fn ->
        Snakepit.start_pool(%{
          name: :no_grpc,
          pool_size: 1,
          python_executable: python,
          startup_timeout: 10_000
        })
      end)

    assert {:error, %Error{reason: :worker_start_failed, message: msg}} = result
    assert msg =~ "ModuleNotFoundError: No module named 'grpc'"
    assert ms < 5_000, "took #{ms} ms"
  end

  test "a worker that never prints its ready line fails start_pool after startup_timeout" do
    dir = Path.join(System.tmp_dir!(), "snakepit_silent_#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    on_exit(fn -> File.rm_rf!(dir) end)
    python = Path.join(dir, "python")
    File.write!(python, "#!/bin/sh\nexec sleep 60\n")
    File.chmod!(python, 0o755)

    {ms, result} =
      timed(fn ->
        Snakepit.start_pool(%{
          name: :silent,
          pool_size: 1,
          python_executable: python,
          startup_timeout: 1_000
        })
      end)

    assert {:error, %Error{reason: :startup_timeout, message: msg}} = result
    assert msg =~ "1000 ms"
    assert ms < 4_000, "took #{ms} ms"
    eventually(fn -> Snakepit.Pool.whereis(:silent) == nil end, 2_000)
  end
end
