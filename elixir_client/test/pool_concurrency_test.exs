Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.PoolConcurrencyTest do
  # Capacity, multiplexing and the FIFO queue, with real Python workers.
  use ExUnit.Case, async: false
  import Snakepit.PoolHelpers
  alias Snakepit.Error

  @moduletag :slow
  @moduletag timeout: 120_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit)
    :ok
  end

  defp sleep_calls(pool, n, seconds, opts \\ []) do
    1..n
    |> Enum.map(fn _ ->
      Task.async(fn -> Snakepit.execute(pool, "sleep", %{seconds: seconds}, opts) end)
    end)
    |> Task.await_many(30_000)
  end

  test "one thread worker with 4 threads runs 4 concurrent 0.5 s calls in about 0.5 s" do
    pool = start_pool!(worker_profile: :thread, pool_size: 1, threads_per_worker: 4)
    {ms, results} = timed(fn -> sleep_calls(pool, 4, 0.5) end)
    assert Enum.all?(results, &match?({:ok, %{"cancelled" => false}}, &1))
    assert ms < 950, "4 concurrent sleeps took #{ms} ms (4 slots: ~500; 3 or fewer: >= 1000)"
    # the 5th call must wait for a free thread slot
    {ms5, results5} = timed(fn -> sleep_calls(pool, 5, 0.5) end)
    assert Enum.all?(results5, &match?({:ok, _}, &1))
    assert ms5 >= 950, "5 calls on 4 slots took only #{ms5} ms"
  end

  test "a process worker runs one call at a time; a pool of them spreads calls (least loaded)" do
    pool = start_pool!(worker_profile: :process, pool_size: 2)
    {ms, results} = timed(fn -> sleep_calls(pool, 4, 0.3) end)
    assert Enum.all?(results, &match?({:ok, _}, &1))
    assert ms >= 550 and ms < 1_150, "4 calls on 2 single-slot workers took #{ms} ms"

    pids =
      1..4
      |> Enum.map(fn _ ->
        Task.async(fn ->
          Snakepit.execute(pool, "sleep", %{seconds: 0.2}) && Snakepit.execute(pool, "ping", %{})
        end)
      end)
      |> Task.await_many(10_000)
      |> Enum.map(fn {:ok, %{"pid" => p}} -> p end)

    assert pids |> Enum.uniq() |> length() == 2
  end

  test "callers beyond capacity + queue_size get :queue_full" do
    # capacity 2: a process worker takes a second call into its server's queue (pipelining)
    pool =
      start_pool!(worker_profile: :process, pool_size: 1, queue_size: 2, queue_timeout: 10_000)

    assert [%{capacity: 2}] = Snakepit.list_workers(pool)
    results = sleep_calls(pool, 6, 0.3)
    {ok, err} = Enum.split_with(results, &match?({:ok, _}, &1))
    assert length(ok) == 4
    assert length(err) == 2
    assert Enum.all?(err, &match?({:error, %Error{reason: :queue_full}}, &1))
    assert {:ok, %{queue_full: 2}} = Snakepit.get_stats(pool)
  end

  test "a process worker takes a second call while the first runs; an idle worker gets a call first" do
    pool = start_pool!(worker_profile: :process, pool_size: 1, queue_timeout: 10_000)
    first = Task.async(fn -> Snakepit.execute(pool, "sleep", %{seconds: 0.5}) end)
    eventually(fn -> match?({:ok, %{in_flight: 1}}, Snakepit.get_stats(pool)) end)
    # not queued in the pool: on its way to the server, which runs it after the first
    second = Task.async(fn -> Snakepit.execute(pool, "ping", %{}) end)
    eventually(fn -> match?({:ok, %{in_flight: 2, queued: 0}}, Snakepit.get_stats(pool)) end)
    assert {:ok, %{"cancelled" => false}} = Task.await(first, 10_000)
    assert {:ok, %{"message" => "pong"}} = Task.await(second, 10_000)

    # two workers: two calls at once go one to each, not both to one
    pool2 = start_pool!(worker_profile: :process, pool_size: 2, queue_timeout: 10_000)

    assert [{:ok, _}, {:ok, _}] = sleep_calls(pool2, 2, 0.5)
    assert [1, 1] = Enum.map(Snakepit.list_workers(pool2), & &1.requests)
  end

  # (process_pipeline_depth: 1 in the queue tests: one busy call fills the pool)
  test "a caller that waits longer than queue_timeout gets :queue_timeout" do
    pool =
      start_pool!(
        worker_profile: :process,
        pool_size: 1,
        queue_timeout: 200,
        process_pipeline_depth: 1
      )

    busy = Task.async(fn -> Snakepit.execute(pool, "sleep", %{seconds: 1.0}) end)
    Process.sleep(100)
    {ms, result} = timed(fn -> Snakepit.execute(pool, "ping", %{}) end)
    assert {:error, %Error{reason: :queue_timeout}} = result
    assert ms >= 180 and ms < 1_000
    assert {:ok, _} = Task.await(busy)
    assert {:ok, %{queue_timeouts: 1, queued: 0}} = Snakepit.get_stats(pool)
  end

  test "queued callers are served first in, first out" do
    pool = start_pool!(worker_profile: :process, pool_size: 1, process_pipeline_depth: 1)
    parent = self()
    busy = Task.async(fn -> Snakepit.execute(pool, "sleep", %{seconds: 0.3}) end)
    Process.sleep(50)

    tasks =
      for i <- 1..5 do
        t =
          Task.async(fn ->
            {:ok, _} = Snakepit.execute(pool, "ping", %{})
            send(parent, {:done, i})
          end)

        Process.sleep(20)
        t
      end

    Task.await_many([busy | tasks], 10_000)
    order = for _ <- 1..5, do: receive(do: ({:done, i} -> i))
    assert order == [1, 2, 3, 4, 5]
  end

  test "a caller that dies mid-call frees its slot" do
    pool = start_pool!(worker_profile: :process, pool_size: 1, queue_timeout: 3_000)
    {pid, ref} = spawn_monitor(fn -> Snakepit.execute(pool, "sleep", %{seconds: 30}) end)
    eventually(fn -> match?({:ok, %{in_flight: 1}}, Snakepit.get_stats(pool)) end)
    Process.exit(pid, :kill)
    assert_receive {:DOWN, ^ref, _, _, _}
    # the server sees the cancellation; the slot is back for the next caller
    {ms, result} = timed(fn -> Snakepit.execute(pool, "ping", %{}) end)
    assert {:ok, _} = result
    assert ms < 2_500
  end

  test "a caller that dies while queued leaves the queue" do
    pool =
      start_pool!(
        worker_profile: :process,
        pool_size: 1,
        queue_timeout: 5_000,
        process_pipeline_depth: 1
      )

    busy = Task.async(fn -> Snakepit.execute(pool, "sleep", %{seconds: 0.5}) end)
    Process.sleep(50)
    {pid, ref} = spawn_monitor(fn -> Snakepit.execute(pool, "ping", %{}) end)
    eventually(fn -> match?({:ok, %{queued: 1}}, Snakepit.get_stats(pool)) end)
    Process.exit(pid, :kill)
    assert_receive {:DOWN, ^ref, _, _, _}
    eventually(fn -> match?({:ok, %{queued: 0}}, Snakepit.get_stats(pool)) end)
    assert {:ok, _} = Task.await(busy)
  end

  test "many concurrent callers on a mixed load all succeed" do
    pool = start_pool!(worker_profile: :thread, pool_size: 2, threads_per_worker: 8)

    results =
      1..400
      |> Task.async_stream(fn i -> Snakepit.execute(pool, "add", %{a: i, b: 1}) end,
        max_concurrency: 64,
        timeout: 30_000
      )
      |> Enum.map(fn {:ok, r} -> r end)

    assert results == Enum.map(1..400, &{:ok, &1 + 1})
    {:ok, stats} = Snakepit.get_stats(pool)
    assert stats.in_flight == 0
    assert Enum.all?(stats.workers, &(&1.requests > 0)), "both workers should get calls"
  end
end
