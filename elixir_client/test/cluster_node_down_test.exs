Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.ClusterNodeDownTest do
  # Three nodes (this one and two peers): the least-loaded peer gets the overflow; kill -9 of a peer
  # BEAM node while it runs calls for this node's pool: only the calls in flight
  # there fail (:node_down), counted exactly; later calls go to the nodes that remain.
  use ExUnit.Case, async: false
  import Snakepit.PoolHelpers

  alias Snakepit.Cluster
  alias Snakepit.Test.ClusterPeer

  @moduletag :cluster
  # (the peer's kill makes :global log its disconnect)
  @moduletag :capture_log
  @moduletag timeout: 180_000

  setup do
    started = ClusterPeer.ensure_distributed!()
    b = ClusterPeer.start!("cluster_doomed")
    c = ClusterPeer.start!("cluster_c")

    on_exit(fn ->
      ClusterPeer.stop(b)
      ClusterPeer.stop(c)
      if started, do: ClusterPeer.stop_distribution()
    end)

    %{b: b, c: c}
  end

  defp in_flight(peer, name) do
    {:ok, stats} = ClusterPeer.call(peer, :get_stats, [name])
    stats.in_flight
  end

  defp calls(name, n, seconds) do
    Enum.map(1..n, fn _ ->
      Task.async(fn -> Snakepit.execute(name, "pid_after", %{seconds: seconds}) end)
    end)
  end

  test "a call the local pool cannot take goes to the node with the most free slots",
       %{b: b, c: c} do
    name = :"cluster_pool_#{System.unique_integer([:positive])}"
    start_pool!(ClusterPeer.pool_config(name, 1))
    {:ok, _} = ClusterPeer.call(b, :start_pool, [ClusterPeer.pool_config(name, 1)])
    {:ok, _} = ClusterPeer.call(c, :start_pool, [ClusterPeer.pool_config(name, 3)])
    eventually(fn -> Cluster.remote_nodes(name) |> Enum.sort() == Enum.sort([b.node, c.node]) end)
    [%{os_pid: b_worker}] = ClusterPeer.call(b, :list_workers, [name])
    [%{os_pid: c_worker}] = ClusterPeer.call(c, :list_workers, [name])

    local_hold =
      hold(fn -> Snakepit.execute(name, "pid_after", %{seconds: 60}, cluster: false) end)

    eventually(fn -> Snakepit.Pool.stats(name).in_flight == 1 end)
    # c has 3 free slots, b 1
    assert {:ok, %{"pid" => ^c_worker}} = Snakepit.execute(name, "pid_after", %{seconds: 0})

    c_holds =
      for _ <- 1..3 do
        hold(fn ->
          ClusterPeer.call(c, :execute, [name, "pid_after", %{seconds: 60}, [cluster: false]])
        end)
      end

    eventually(fn -> in_flight(c, name) == 3 end)
    # now only b has a free slot
    assert {:ok, %{"pid" => ^b_worker}} = Snakepit.execute(name, "pid_after", %{seconds: 0})
    Enum.each([local_hold | c_holds], &Task.shutdown(&1, :brutal_kill))
  end

  defp hold(fun), do: Task.async(fun)

  test "killing a node fails only the calls in flight there; later calls route to the others",
       %{b: b, c: c} do
    name = :"cluster_pool_#{System.unique_integer([:positive])}"
    start_pool!(ClusterPeer.pool_config(name, 1))
    {:ok, _} = ClusterPeer.call(b, :start_pool, [ClusterPeer.pool_config(name, 2)])
    eventually(fn -> Cluster.remote_nodes(name) == [b.node] end)
    [%{os_pid: a_worker}] = Snakepit.list_workers(name)
    [%{os_pid: b_worker}] = ClusterPeer.call(b, :list_workers, [name])

    # load: one call on this node's slot, two on b's
    first_wave = calls(name, 3, 5)
    eventually(fn -> Snakepit.Pool.stats(name).in_flight == 1 and in_flight(b, name) == 2 end)
    :ok = ClusterPeer.kill9(b)

    results = Task.await_many(first_wave, 30_000)
    failed = for {:error, e} <- results, do: e
    assert length(failed) == 2
    assert Enum.all?(failed, &(&1.reason == :node_down))
    assert Enum.all?(failed, &(&1.message =~ to_string(b.node)))

    assert [{:ok, %{"pid" => ^a_worker, "cancelled" => false}}] =
             for({:ok, _} = r <- results, do: r)

    # b's pool is gone from the group, and its Python worker died with its BEAM
    eventually(fn -> Cluster.remote_nodes(name) == [] end)
    eventually(fn -> not os_alive?(b_worker) end)

    # the next overflow goes to c, none to b, and nothing fails
    {:ok, _} = ClusterPeer.call(c, :start_pool, [ClusterPeer.pool_config(name, 2)])
    eventually(fn -> Cluster.remote_nodes(name) == [c.node] end)
    [%{os_pid: c_worker}] = ClusterPeer.call(c, :list_workers, [name])
    second_wave = name |> calls(3, 1) |> Task.await_many(30_000)

    assert second_wave |> Enum.map(fn {:ok, %{"pid" => pid}} -> pid end) |> Enum.frequencies() ==
             %{a_worker => 1, c_worker => 2}

    {:ok, cluster} = Snakepit.get_stats(name, cluster: true)
    assert cluster.nodes == [node(), c.node]
  end
end
