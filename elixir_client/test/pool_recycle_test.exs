Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.PoolRecycleTest do
  # Worker recycling (max requests and TTL) under steady concurrent load: no call may fail.
  use ExUnit.Case, async: false
  import Snakepit.PoolHelpers

  @moduletag :slow
  @moduletag timeout: 180_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit)
    :ok
  end

  # `callers` processes call `add` (with a small sleep mixed in) until `ms` have passed.
  defp load(pool, callers, ms) do
    stop_at = System.monotonic_time(:millisecond) + ms

    1..callers
    |> Enum.map(fn c ->
      Task.async(fn -> loop(pool, c, stop_at, []) end)
    end)
    |> Task.await_many(ms + 60_000)
    |> List.flatten()
  end

  defp loop(pool, c, stop_at, acc) do
    if System.monotonic_time(:millisecond) > stop_at do
      acc
    else
      r =
        if rem(length(acc), 5) == 0,
          do: Snakepit.execute(pool, "sleep", %{seconds: 0.02}),
          else: Snakepit.execute(pool, "add", %{a: c, b: length(acc)})

      loop(pool, c, stop_at, [r | acc])
    end
  end

  test "max_requests recycling under concurrent load fails no call" do
    pool =
      start_pool!(
        worker_profile: :thread,
        pool_size: 2,
        threads_per_worker: 4,
        worker_max_requests: 20,
        queue_timeout: 20_000
      )

    first = Enum.map(Snakepit.list_workers(pool), & &1.os_pid)
    results = load(pool, 8, 6_000)
    failures = Enum.reject(results, &match?({:ok, _}, &1))

    assert failures == [],
           "#{length(failures)} of #{length(results)} calls failed: #{inspect(Enum.take(failures, 3))}"

    {:ok, stats} = Snakepit.get_stats(pool)

    assert stats.recycles >= 3,
           "expected several recycles, got #{stats.recycles} for #{length(results)} calls"

    assert stats.crashes == 0
    assert stats.failures == 0
    # each worker's limit is max_requests less its jitter; one past it takes calls only while no
    # other worker could (it is :retiring, waiting for its replacement), never as a :ready worker
    assert Enum.all?(stats.workers, &(&1.max_requests in 18..20))

    assert Enum.all?(stats.workers, &(&1.requests <= &1.max_requests or &1.status != :ready)),
           inspect(
             Enum.map(stats.workers, &Map.take(&1, [:id, :status, :requests, :max_requests]))
           )

    # recycled workers' Python processes are gone, and the pool is back to full size
    eventually(fn -> Enum.all?(first, &(not os_alive?(&1))) end, 15_000)
    eventually(fn -> length(ready_workers(pool)) == 2 end, 15_000)
  end

  test "TTL recycling under concurrent load fails no call and staggers workers" do
    pool =
      start_pool!(
        worker_profile: :process,
        pool_size: 2,
        worker_ttl: {1_000, :milliseconds},
        ttl_jitter: 0.3,
        queue_timeout: 20_000
      )

    results = load(pool, 4, 6_000)
    failures = Enum.reject(results, &match?({:ok, _}, &1))

    assert failures == [],
           "#{length(failures)} of #{length(results)} calls failed: #{inspect(Enum.take(failures, 3))}"

    {:ok, stats} = Snakepit.get_stats(pool)
    assert stats.recycles >= 3
    assert stats.crashes == 0
  end

  test "TTL jitter staggers workers started together" do
    pool =
      start_pool!(
        worker_profile: :process,
        pool_size: 3,
        worker_ttl: {1, :hours},
        ttl_jitter: 0.1
      )

    ttls = Enum.map(Snakepit.list_workers(pool), & &1.ttl_ms)
    assert length(Enum.uniq(ttls)) == 3, "TTLs #{inspect(ttls)} should differ"
    assert Enum.all?(ttls, &(&1 >= 3_240_000 and &1 <= 3_600_000))
  end

  test "the only worker, recycled, serves until its replacement is ready, and finishes its in-flight call before it stops" do
    # a replacement that takes a second to start, so the old worker is seen serving past its limit
    pool =
      start_pool!(
        Map.merge(test_adapter("SlowStartAdapter"), %{
          worker_profile: :process,
          pool_size: 1,
          worker_max_requests: 1,
          queue_timeout: 20_000
        })
      )

    [w] = Snakepit.list_workers(pool)
    slow = Task.async(fn -> Snakepit.execute(pool, "sleep", %{seconds: 1.0}) end)
    eventually(fn -> match?({:ok, %{in_flight: 1}}, Snakepit.get_stats(pool)) end)
    # past its limit, but without it the pool would have no worker: it still takes calls
    assert %{status: :retiring} = Enum.find(Snakepit.list_workers(pool), &(&1.id == w.id))

    # once the replacement is ready, calls go there; the old worker's call finishes, then it stops
    eventually(fn -> match?([%{os_pid: p}] when p != w.os_pid, ready_workers(pool)) end)
    assert {:ok, %{"pid" => new_pid}} = Snakepit.execute(pool, "ping", %{})
    assert new_pid != w.os_pid
    assert {:ok, %{"cancelled" => false}} = Task.await(slow, 10_000)
    eventually(fn -> not os_alive?(w.os_pid) end, 10_000)
  end

  test "max_requests recycling leaves no gap: calls keep completing while replacements start" do
    # workers that take a second to start (a model load): a recycle that left the pool without a
    # routable worker would stop calls for about that long
    pool =
      start_pool!(
        Map.merge(test_adapter("SlowStartAdapter"), %{
          worker_profile: :process,
          pool_size: 2,
          worker_max_requests: 50,
          queue_timeout: 30_000
        })
      )

    # 5 ms calls: a few hundred calls/s on two process workers, so that several recycles happen
    # within the bounded number of calls
    callers = 16
    calls_each = 64
    t0 = System.monotonic_time(:millisecond)

    results =
      1..callers
      |> Enum.map(fn c ->
        Task.async(fn ->
          for i <- 1..calls_each do
            r = Snakepit.execute(pool, "sleep", %{seconds: 0.005}, timeout: 30_000)
            _ = {c, i}
            {System.monotonic_time(:millisecond), r}
          end
        end)
      end)
      |> Task.await_many(120_000)
      |> List.flatten()

    failures = for {_, r} <- results, not match?({:ok, _}, r), do: r
    assert failures == [], "#{length(failures)} calls failed: #{inspect(Enum.take(failures, 3))}"

    done = results |> Enum.map(&elem(&1, 0)) |> Enum.sort()
    gaps = Enum.zip_with([t0 | done], done, &(&2 - &1))
    {:ok, stats} = Snakepit.get_stats(pool)
    assert stats.recycles >= 3, "#{stats.recycles} recycles for #{callers * calls_each} calls"
    assert stats.crashes == 0

    # Without a worker left serving while a replacement starts, calls would stop for up to the
    # second a worker takes to start; 200 ms leaves room for a loaded machine.
    assert Enum.max(gaps) <= 200,
           "longest gap between completions #{Enum.max(gaps)} ms " <>
             "(#{stats.recycles} recycles, #{List.last(done) - t0} ms in all)"
  end

  test "a session whose worker was recycled is re-created on the new worker" do
    pool =
      start_pool!(
        worker_profile: :process,
        pool_size: 1,
        worker_max_requests: 3,
        queue_timeout: 20_000
      )

    [w] = Snakepit.list_workers(pool)
    # InitializeSession does not count as a request; the 3 tool calls do
    assert {:ok, 1} = Snakepit.execute_in_session(pool, "recycled-sess", "session_counter", %{})
    assert {:ok, 2} = Snakepit.execute_in_session(pool, "recycled-sess", "session_counter", %{})
    assert {:ok, 3} = Snakepit.execute_in_session(pool, "recycled-sess", "session_counter", %{})
    # the worker reached max requests: once its replacement is ready, the session's next call runs
    # there, in a new session
    eventually(fn -> match?([%{os_pid: p}] when p != w.os_pid, ready_workers(pool)) end)
    assert {:ok, 1} = Snakepit.execute_in_session(pool, "recycled-sess", "session_counter", %{})
    assert {:ok, %{state: %{"count" => 1}}} = Snakepit.get_session(pool, "recycled-sess")
  end
end
