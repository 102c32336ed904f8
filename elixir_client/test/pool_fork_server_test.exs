Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.PoolForkServerTest do
  # start_mode: :fork_server: every worker is a child of the pool's one fork server.
  use ExUnit.Case, async: false
  import Snakepit.PoolHelpers

  @moduletag :slow
  @moduletag timeout: 120_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit)
    :ok
  end

  defp fork_server_os_pid(pool), do: Snakepit.Pool.stats(pool).fork_server_os_pid

  defp ppid(os_pid) do
    case File.read("/proc/#{os_pid}/stat") do
      {:ok, stat} ->
        stat
        |> String.split(") ")
        |> Enum.at(1)
        |> String.split(" ")
        |> Enum.at(1)
        |> String.to_integer()

      {:error, _} ->
        nil
    end
  end

  # OS pids of the live processes whose parent is `parent`.
  defp children_of(parent) do
    for dir <- File.ls!("/proc"),
        match?({_, ""}, Integer.parse(dir)),
        pid = String.to_integer(dir),
        ppid(pid) == parent,
        os_alive?(pid),
        do: pid
  end

  defp ready_os_pids(pool), do: pool |> ready_workers() |> Enum.map(& &1.os_pid) |> Enum.sort()

  for profile <- [:process, :thread] do
    test "a #{profile} pool forked from its fork server serves execute, stream and batch" do
      pool = start_pool!(worker_profile: unquote(profile), pool_size: 2, start_mode: :fork_server)
      fork_server = fork_server_os_pid(pool)
      assert is_integer(fork_server) and os_alive?(fork_server)

      workers = Snakepit.list_workers(pool)
      assert length(workers) == 2
      for w <- workers, do: assert(ppid(w.os_pid) == fork_server)
      assert Enum.sort(children_of(fork_server)) == ready_os_pids(pool)

      assert {:ok, 5} = Snakepit.execute(pool, "add", %{a: 2, b: 3})

      assert [%{"step" => 1}, %{"step" => 2}, %{"step" => 3} | _] =
               Snakepit.execute_stream(pool, "progress", %{steps: 3}) |> Enum.to_list()

      assert {:ok, [{:ok, 3}, {:ok, 7}]} =
               Snakepit.execute_batch(pool, "add", [%{a: 1, b: 2}, %{a: 3, b: 4}])
    end
  end

  test "a worker killed -9 is replaced by a new child of the same fork server" do
    pool = start_pool!(pool_size: 2, start_mode: :fork_server)
    fork_server = fork_server_os_pid(pool)
    [victim, survivor] = ready_os_pids(pool)

    kill9(victim)

    [replacement] =
      eventually(fn ->
        pids = ready_os_pids(pool)
        length(pids) == 2 and victim not in pids and pids -- [survivor]
      end)

    assert ppid(replacement) == fork_server
    assert fork_server_os_pid(pool) == fork_server
    for _ <- 1..4, do: assert({:ok, 3} = Snakepit.execute(pool, "add", %{a: 1, b: 2}))
  end

  test "max_requests recycling forks the replacement from the fork server" do
    pool =
      start_pool!(
        pool_size: 1,
        start_mode: :fork_server,
        worker_max_requests: 2,
        max_requests_jitter: 0
      )

    fork_server = fork_server_os_pid(pool)
    [first] = ready_os_pids(pool)

    # two recycles in a row: each replacement is a new child of the same fork server
    last =
      Enum.reduce(1..2, first, fn _round, previous ->
        for _ <- 1..2, do: assert({:ok, 3} = Snakepit.execute(pool, "add", %{a: 1, b: 2}))

        [next] =
          eventually(fn ->
            case ready_os_pids(pool) do
              [p] when p != previous -> [p]
              _ -> false
            end
          end)

        assert ppid(next) == fork_server
        eventually(fn -> not os_alive?(previous) end, 5_000)
        next
      end)

    assert last != first
    {:ok, stats} = Snakepit.get_stats(pool)
    assert stats.recycles >= 2
    assert fork_server_os_pid(pool) == fork_server
  end

  test "a fork server killed -9 takes its workers with it; the pool starts a new one and new workers" do
    pool = start_pool!(pool_size: 2, start_mode: :fork_server)
    old_server = fork_server_os_pid(pool)
    old_workers = ready_os_pids(pool)

    kill9(old_server)

    eventually(fn -> Enum.all?([old_server | old_workers], &(not os_alive?(&1))) end, 5_000)

    new_server =
      eventually(fn ->
        server = fork_server_os_pid(pool)
        server not in [nil, old_server] and length(ready_workers(pool)) == 2 and server
      end)

    new_workers = ready_os_pids(pool)
    assert Enum.all?(new_workers, &(ppid(&1) == new_server))
    assert MapSet.disjoint?(MapSet.new(new_workers), MapSet.new(old_workers))
    assert children_of(old_server) == []
    assert {:ok, 5} = Snakepit.execute(pool, "add", %{a: 2, b: 3})
  end

  test "stop_pool leaves no Python process: neither the fork server nor a worker" do
    pool = start_pool!(pool_size: 3, start_mode: :fork_server)
    fork_server = fork_server_os_pid(pool)
    workers = ready_os_pids(pool)
    assert length(workers) == 3 and Enum.all?(workers, &os_alive?/1)

    assert :ok = Snakepit.stop_pool(pool)

    alive = Enum.filter([fork_server | workers], &os_alive?/1)
    assert alive == [], "still running after stop_pool: #{inspect(alive)}"
    assert children_of(fork_server) == []
  end

  test "a fork server that cannot import the adapter fails the pool start with its error" do
    assert {:error, %Snakepit.Error{reason: :worker_start_failed, message: message}} =
             Snakepit.start_pool(
               name: :"pool_#{System.unique_integer([:positive])}",
               pool_size: 2,
               start_mode: :fork_server,
               python_adapter: "snakepit_bridge.adapters.nope.Missing",
               startup_timeout: 10_000
             )

    assert message =~ "error: cannot import adapter module 'snakepit_bridge.adapters.nope'"
    assert message =~ "fork server"
  end
end
