Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.PoolStopTest do
  # stop_pool with calls in flight: they get shutdown_grace to finish; what is left then, and every
  # caller still queued, gets :pool_stopped.
  use ExUnit.Case, async: false
  import Snakepit.PoolHelpers
  alias Snakepit.Error

  @moduletag :slow
  @moduletag timeout: 120_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit)
    :ok
  end

  test "calls in flight when stop_pool is called finish normally within the grace period" do
    pool = start_pool!(worker_profile: :process, pool_size: 2, shutdown_grace: 5_000)
    os_pids = Enum.map(Snakepit.list_workers(pool), & &1.os_pid)

    calls =
      for _ <- 1..2, do: Task.async(fn -> Snakepit.execute(pool, "sleep", %{seconds: 0.5}) end)

    eventually(fn -> match?({:ok, %{in_flight: 2}}, Snakepit.get_stats(pool)) end)
    {ms, :ok} = timed(fn -> Snakepit.stop_pool(pool) end)

    assert [{:ok, %{"cancelled" => false}}, {:ok, %{"cancelled" => false}}] =
             Task.await_many(calls, 10_000)

    # it stopped once they were done, not after the whole grace
    assert ms < 4_000, "stop_pool took #{ms} ms"
    # (the registry forgets a dead pool asynchronously)
    eventually(fn -> Snakepit.Pool.whereis(pool) == nil end, 2_000)
    eventually(fn -> Enum.all?(os_pids, &(not os_alive?(&1))) end, 10_000)
  end

  test "calls still running after the grace, queued callers and new callers get :pool_stopped" do
    grace = 1_000

    pool =
      start_pool!(
        worker_profile: :process,
        pool_size: 1,
        shutdown_grace: grace,
        queue_timeout: 20_000,
        # the busy call fills the worker: the next one queues in the pool
        process_pipeline_depth: 1
      )

    [w] = Snakepit.list_workers(pool)
    busy = Task.async(fn -> Snakepit.execute(pool, "sleep", %{seconds: 30}) end)
    eventually(fn -> match?({:ok, %{in_flight: 1}}, Snakepit.get_stats(pool)) end)
    queued = Task.async(fn -> Snakepit.execute(pool, "add", %{a: 1, b: 2}) end)
    eventually(fn -> match?({:ok, %{queued: 1}}, Snakepit.get_stats(pool)) end)

    stopping = Task.async(fn -> timed(fn -> Snakepit.stop_pool(pool) end) end)

    assert {:error, %Error{reason: :pool_stopped}} = Task.await(queued, 5_000)
    # during the grace the pool takes no new call
    assert {:error, %Error{reason: :pool_stopped}} = Snakepit.execute(pool, "add", %{a: 1, b: 2})

    assert {:error, %Error{reason: :pool_stopped} = e} = Task.await(busy, 10_000)
    assert e.message =~ "#{grace} ms"
    assert {ms, :ok} = Task.await(stopping, 10_000)
    assert ms >= grace and ms < grace + 5_000, "stop_pool took #{ms} ms"
    eventually(fn -> not os_alive?(w.os_pid) end, 10_000)
  end
end
