Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.PoolFaultTest do
  # Worker crashes, restarts and start-up failures, with real Python workers.
  use ExUnit.Case, async: false
  import Snakepit.PoolHelpers
  alias Snakepit.Error

  @moduletag :slow
  @moduletag timeout: 120_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit)
    :ok
  end

  for profile <- [:process, :thread] do
    test "kill -9 of a #{profile} worker mid-call: that caller gets :worker_crashed, the pool restarts it" do
      pool = start_pool!(worker_profile: unquote(profile), pool_size: 1, threads_per_worker: 2)
      [w] = Snakepit.list_workers(pool)
      task = Task.async(fn -> Snakepit.execute(pool, "sleep", %{seconds: 10}) end)
      eventually(fn -> match?({:ok, %{in_flight: 1}}, Snakepit.get_stats(pool)) end)
      kill9(w.os_pid)

      assert {:error, %Error{reason: :worker_crashed} = e} = Task.await(task, 5_000)
      assert e.message =~ "crashed"

      # the pool starts a new worker and keeps serving
      [w2] = eventually(fn -> match?([_], ready_workers(pool)) && ready_workers(pool) end, 20_000)
      assert w2.os_pid != w.os_pid
      assert {:ok, 5} = Snakepit.execute(pool, "add", %{a: 2, b: 3})
      assert {:ok, %{crashes: 1}} = Snakepit.get_stats(pool)
      refute os_alive?(w.os_pid)
    end
  end

  test "a stream whose worker is killed mid-stream ends with :worker_crashed after the chunks so far" do
    pool = start_pool!(worker_profile: :thread, pool_size: 1, threads_per_worker: 2)
    [w] = Snakepit.list_workers(pool)
    parent = self()

    task =
      Task.async(fn ->
        Snakepit.execute_stream(
          pool,
          "progress",
          %{steps: 100, delay: 0.05},
          &send(parent, {:chunk, &1})
        )
      end)

    assert_receive {:chunk, %{"step" => 2}}, 5_000
    kill9(w.os_pid)
    assert {:error, %Error{reason: :worker_crashed}} = Task.await(task, 5_000)
    eventually(fn -> match?([_], ready_workers(pool)) end, 20_000)

    assert {:ok, %{"completed" => 2}} =
             Snakepit.execute_stream(pool, "progress", %{steps: 2}, fn _ -> :ok end)
  end

  test "callers queued while the only worker crashes are served by its replacement" do
    pool =
      start_pool!(
        worker_profile: :process,
        pool_size: 1,
        queue_timeout: 20_000,
        process_pipeline_depth: 1
      )

    [w] = Snakepit.list_workers(pool)
    busy = Task.async(fn -> Snakepit.execute(pool, "sleep", %{seconds: 10}) end)
    eventually(fn -> match?({:ok, %{in_flight: 1}}, Snakepit.get_stats(pool)) end)

    waiting =
      for i <- 1..3, do: Task.async(fn -> Snakepit.execute(pool, "add", %{a: i, b: 0}) end)

    eventually(fn -> match?({:ok, %{queued: 3}}, Snakepit.get_stats(pool)) end)
    kill9(w.os_pid)
    assert {:error, %Error{reason: :worker_crashed}} = Task.await(busy, 5_000)
    assert Task.await_many(waiting, 20_000) == [{:ok, 1}, {:ok, 2}, {:ok, 3}]
  end

  test "a worker SIGTERMed from outside leaves rotation: its call finishes, calls made meanwhile wait for its replacement" do
    # (`hang` ignores the cancellation a draining server signals: its call keeps the drain going)
    pool =
      start_pool!(
        Map.merge(test_adapter("HangingAdapter"), %{
          worker_profile: :thread,
          pool_size: 1,
          threads_per_worker: 2,
          queue_timeout: 30_000
        })
      )

    [w] = Snakepit.list_workers(pool)
    task = Task.async(fn -> Snakepit.execute(pool, "hang", %{seconds: 1.5}) end)
    eventually(fn -> match?([%{in_flight: 1}], Snakepit.list_workers(pool)) end)
    signal(w.os_pid, "TERM")

    # its server drains: the pool routes nothing there, though it has a free slot
    eventually(fn -> match?([%{status: :server_draining}], Snakepit.list_workers(pool)) end)
    assert {:ok, %{"pid" => pid}} = Snakepit.execute(pool, "ping", %{})
    assert pid != w.os_pid

    assert {:ok, %{"slept" => 1.5}} = Task.await(task, 10_000)
    assert [%{status: :ready, os_pid: ^pid}] = Snakepit.list_workers(pool)
    refute os_alive?(w.os_pid)
  end

  test "a session whose worker crashed is re-created on the new worker" do
    pool = start_pool!(worker_profile: :process, pool_size: 1)
    assert {:ok, 1} = Snakepit.execute_in_session(pool, "crash-sess", "session_counter", %{})
    assert {:ok, 2} = Snakepit.execute_in_session(pool, "crash-sess", "session_counter", %{})
    [w] = Snakepit.list_workers(pool)
    kill9(w.os_pid)
    eventually(fn -> match?([%{os_pid: p}] when p != w.os_pid, ready_workers(pool)) end, 20_000)
    # state lived in the dead process: the session starts over on the new worker
    assert {:ok, 1} = Snakepit.execute_in_session(pool, "crash-sess", "session_counter", %{})
  end

  test "restart delays grow exponentially up to restart_backoff_max" do
    assert Enum.map(1..8, &Snakepit.Pool.backoff(&1, 10_000)) == [
             100,
             200,
             400,
             800,
             1600,
             3200,
             6400,
             10_000
           ]

    assert Snakepit.Pool.backoff(100, 2_000) == 2_000
  end

  test "a worker that keeps failing to start is restarted with backoff, not in a tight loop" do
    pool =
      start_pool_no_wait!(%{
        pool_size: 1,
        python_adapter: "snakepit_bridge.adapters.nope.Missing",
        startup_timeout: 10_000,
        queue_timeout: 100
      })

    # When each start attempt begins (polled every 10 ms), up to the 5th attempt.
    started_at = start_times(pool, 5, System.monotonic_time(:millisecond) + 20_000, %{})

    # A restart cannot come before its backoff delay, so these bounds hold however slow the machine;
    # without backoff an attempt follows the previous failure at once (~0.3-0.5 s apart).
    for attempt <- 3..4 do
      gap = started_at[attempt + 1] - started_at[attempt]

      assert gap >= Snakepit.Pool.backoff(attempt, 10_000) - 10,
             "attempt #{attempt + 1} came #{gap} ms after attempt #{attempt}"
    end
  end

  defp start_times(_pool, count, _deadline, acc) when map_size(acc) >= count, do: acc

  defp start_times(pool, count, deadline, acc) do
    assert System.monotonic_time(:millisecond) < deadline, "only #{map_size(acc)} start attempts"
    {:ok, %{workers_started: started}} = Snakepit.get_stats(pool)
    acc = Map.put_new(acc, started, System.monotonic_time(:millisecond))
    Process.sleep(10)
    start_times(pool, count, deadline, acc)
  end

  test "a worker whose executable vanished cannot be spawned: the pool survives and keeps retrying" do
    dir = Path.join(System.tmp_dir!(), "snakepit_vanish_#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    exe = Path.join(dir, "python")
    File.write!(exe, "#!/bin/sh\nexit 3\n")
    File.chmod!(exe, 0o755)
    pool = start_pool_no_wait!(%{pool_size: 1, python_executable: exe, queue_timeout: 100})
    pool_pid = Snakepit.Pool.whereis(pool)
    File.rm_rf!(dir)

    eventually(fn ->
      match?({:ok, %{crashes: crashes}} when crashes >= 2, Snakepit.get_stats(pool))
    end)

    assert Snakepit.Pool.whereis(pool) == pool_pid
  end

  test "invalid pool config fails at start naming the key" do
    assert {:error, msg} = Snakepit.start_pool(name: :bad, pool_size: -1)
    assert msg =~ ":pool_size"
    assert {:error, msg} = Snakepit.start_pool(name: :bad, python_executable: "/no/such/python")
    assert msg =~ ":python_executable"
    assert {:error, msg} = Snakepit.Application.validate_all([%{name: :a, worker_ttl: 5}])
    assert msg =~ ":worker_ttl"
  end

  test "stopping a pool stops its Python processes" do
    pool = start_pool!(worker_profile: :process, pool_size: 2)
    os_pids = Enum.map(Snakepit.list_workers(pool), & &1.os_pid)
    assert Enum.all?(os_pids, &os_alive?/1)
    :ok = Snakepit.stop_pool(pool)
    eventually(fn -> Enum.all?(os_pids, &(not os_alive?(&1))) end, 10_000)
  end
end
