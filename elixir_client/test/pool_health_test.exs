Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.PoolHealthTest do
  # Sick workers that never exit by themselves: a tool that ignores its deadline keeps its server
  # slot, a SIGSTOPped server answers nothing. The pool must notice and replace them.
  use ExUnit.Case, async: false
  import Snakepit.PoolHelpers
  alias Snakepit.Error

  @moduletag :slow
  @moduletag timeout: 120_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit)
    :ok
  end

  test "a process worker whose tool ignores its deadline is replaced, and the next calls succeed" do
    pool =
      start_pool!(
        Map.merge(test_adapter("HangingAdapter"), %{
          worker_profile: :process,
          pool_size: 1,
          shutdown_grace: 200,
          queue_timeout: 20_000
        })
      )

    [hung] = Snakepit.list_workers(pool)

    assert {:error, %Error{reason: :timeout}} =
             Snakepit.execute(pool, "hang", %{seconds: 3600}, timeout: 300)

    # Without detection each later call queues in the server behind the hung one and times out.
    assert {:ok, 5} = Snakepit.execute(pool, "add", %{a: 2, b: 3}, timeout: 10_000)
    assert [%{os_pid: os_pid}] = ready_workers(pool)
    assert os_pid != hung.os_pid
    assert {:ok, %{stuck_replacements: 1}} = Snakepit.get_stats(pool)
    eventually(fn -> not os_alive?(hung.os_pid) end, 10_000)
  end

  test "a caller that dies during a hung call leaves a stuck call: its worker is replaced" do
    pool =
      start_pool!(
        Map.merge(test_adapter("HangingAdapter"), %{
          worker_profile: :process,
          pool_size: 1,
          stuck_call_grace: 200,
          shutdown_grace: 200,
          queue_timeout: 20_000
        })
      )

    [hung] = Snakepit.list_workers(pool)
    caller = spawn(fn -> Snakepit.execute(pool, "hang", %{seconds: 3600}, timeout: 60_000) end)
    eventually(fn -> match?({:ok, %{in_flight: 1}}, Snakepit.get_stats(pool)) end)
    Process.exit(caller, :kill)
    # the pool knows the call was given up (else the next call could be pipelined behind it)
    eventually(fn -> Snakepit.Pool.stats(pool).in_flight == 0 end)

    assert {:ok, 5} = Snakepit.execute(pool, "add", %{a: 2, b: 3}, timeout: 10_000)
    assert [%{os_pid: os_pid}] = ready_workers(pool)
    assert os_pid != hung.os_pid
    eventually(fn -> not os_alive?(hung.os_pid) end, 10_000)
  end

  test "a thread worker loses one slot per hung call and is replaced at max_stuck_calls" do
    pool =
      start_pool!(
        Map.merge(test_adapter("HangingAdapter"), %{
          worker_profile: :thread,
          pool_size: 1,
          threads_per_worker: 3,
          max_stuck_calls: 2,
          stuck_call_grace: 200,
          shutdown_grace: 200,
          queue_timeout: 20_000
        })
      )

    [w] = Snakepit.list_workers(pool)

    assert {:error, %Error{reason: :timeout}} =
             Snakepit.execute(pool, "hang", %{seconds: 3600}, timeout: 300)

    # one stuck call: the worker stays, with one slot fewer
    eventually(fn -> match?([%{stuck_calls: 1}], Snakepit.list_workers(pool)) end)
    assert [%{os_pid: same}] = ready_workers(pool)
    assert same == w.os_pid
    assert {:ok, %{capacity: 2}} = Snakepit.get_stats(pool)

    assert {:error, %Error{reason: :timeout}} =
             Snakepit.execute(pool, "hang", %{seconds: 3600}, timeout: 300)

    # two: replaced; the new worker has all its slots
    calls =
      for _ <- 1..3,
          do:
            Task.async(fn -> Snakepit.execute(pool, "sleep", %{seconds: 0.3}, timeout: 10_000) end)

    assert [{:ok, _}, {:ok, _}, {:ok, _}] = Task.await_many(calls, 15_000)

    eventually(fn ->
      match?([%{os_pid: p, stuck_calls: 0}] when p != w.os_pid, ready_workers(pool))
    end)

    assert {:ok, %{capacity: 3, stuck_replacements: 1}} = Snakepit.get_stats(pool)
    eventually(fn -> not os_alive?(w.os_pid) end, 10_000)
  end

  test "a call that times out in a tool that honours cancellation does not replace its worker" do
    pool = start_pool!(worker_profile: :process, pool_size: 1, queue_timeout: 20_000)
    [w] = Snakepit.list_workers(pool)

    assert {:error, %Error{reason: :timeout}} =
             Snakepit.execute(pool, "sleep", %{seconds: 30}, timeout: 200)

    assert {:ok, 5} = Snakepit.execute(pool, "add", %{a: 2, b: 3})
    assert [%{os_pid: same, stuck_calls: 0}] = ready_workers(pool)
    assert same == w.os_pid

    assert {:ok, %{stuck_replacements: 0, unhealthy_replacements: 0, crashes: 0}} =
             Snakepit.get_stats(pool)
  end

  test "a SIGSTOPped worker fails its health check and is replaced; its caller learns why; its OS process ends" do
    interval = 300
    check_timeout = 300

    pool =
      start_pool!(
        worker_profile: :process,
        pool_size: 1,
        health_check_interval: interval,
        health_check_timeout: check_timeout,
        shutdown_grace: 200,
        queue_timeout: 20_000
      )

    [w] = Snakepit.list_workers(pool)
    # never leave a stopped process behind, whatever the outcome
    on_exit(fn -> if os_alive?(w.os_pid), do: signal(w.os_pid, "CONT") && kill9(w.os_pid) end)

    caller = Task.async(fn -> Snakepit.execute(pool, "sleep", %{seconds: 5}, timeout: 30_000) end)
    eventually(fn -> match?({:ok, %{in_flight: 1}}, Snakepit.get_stats(pool)) end)
    signal(w.os_pid, "STOP")
    stopped_at = System.monotonic_time(:millisecond)

    [replacement] =
      eventually(
        fn ->
          case ready_workers(pool) do
            [%{os_pid: p}] = ws when p != w.os_pid -> ws
            _ -> nil
          end
        end,
        15_000
      )

    # the replacement was started within interval + timeout (+ slack) of the SIGSTOP
    started_after = System.monotonic_time(:millisecond) - replacement.uptime_ms - stopped_at
    assert started_after <= interval + check_timeout + 1_000, "detected after #{started_after} ms"

    assert {:error, %Error{reason: :worker_unhealthy} = e} = Task.await(caller, 15_000)
    assert e.message =~ "health check"
    assert {:ok, 5} = Snakepit.execute(pool, "add", %{a: 2, b: 3})
    assert {:ok, %{unhealthy_replacements: 1}} = Snakepit.get_stats(pool)
    # SIGTERM cannot reach a stopped process: the graceful path ends in SIGKILL
    eventually(fn -> not os_alive?(w.os_pid) end, 10_000)
  end
end
