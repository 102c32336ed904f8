Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.ClusterRoutingTest do
  # Pools of one name on two BEAM nodes of this machine (this test node and a peer started with
  # `elixir --sname`, epmd on 127.0.0.1), real Python workers on both: see Snakepit.Cluster.
  use ExUnit.Case, async: false
  import Snakepit.PoolHelpers

  alias Snakepit.Cluster
  alias Snakepit.Test.ClusterPeer

  @moduletag :cluster
  @moduletag timeout: 180_000

  setup_all do
    started = ClusterPeer.ensure_distributed!()
    peer = ClusterPeer.start!("cluster_b")

    on_exit(fn ->
      ClusterPeer.stop(peer)
      if started, do: ClusterPeer.stop_distribution()
    end)

    %{b: peer}
  end

  defp unique_name, do: :"cluster_pool_#{System.unique_integer([:positive])}"

  defp start_remote_pool!(peer, config) do
    {:ok, _} = ClusterPeer.call(peer, :start_pool, [config])

    on_exit(fn ->
      try do
        ClusterPeer.call(peer, :stop_pool, [config.name], 30_000)
      catch
        _, _ -> :ok
      end
    end)

    config.name
  end

  # pool `name` with `local` slots here and `remote` on the peer, both seen by this node
  defp start_pools!(peer, local, remote) do
    name = unique_name()
    start_pool!(ClusterPeer.pool_config(name, local))
    start_remote_pool!(peer, ClusterPeer.pool_config(name, remote))
    eventually(fn -> Cluster.remote_nodes(name) == [peer.node] end)
    name
  end

  defp worker_nodes(name),
    do: Map.new(Snakepit.list_workers(name, cluster: true), &{&1.os_pid, &1.node})

  defp served_by(name, results) do
    nodes = worker_nodes(name)
    Enum.map(results, fn {:ok, %{"pid" => pid}} -> Map.fetch!(nodes, pid) end)
  end

  defp concurrently(n, fun) do
    1..n |> Enum.map(fn _ -> Task.async(fun) end) |> Task.await_many(60_000)
  end

  # a call holding the pool's only local slot until the returned task is shut down
  defp hold_local_slot!(name) do
    task =
      Task.async(fn -> Snakepit.execute(name, "pid_after", %{seconds: 60}, cluster: false) end)

    eventually(fn -> Snakepit.Pool.stats(name).in_flight == 1 end)
    task
  end

  defp remote_stats(peer, name) do
    {:ok, stats} = ClusterPeer.call(peer, :get_stats, [name])
    stats
  end

  test "calls stay on the local pool while it has a free slot, and use the other node's when it is full",
       %{b: b} do
    name = start_pools!(b, 1, 2)

    # one at a time: the local slot is always free
    sequential = for _ <- 1..3, do: Snakepit.execute(name, "pid_after", %{seconds: 0})
    assert served_by(name, sequential) == [node(), node(), node()]

    # three at once: one local slot, the other two go to b's two
    overlapping = concurrently(3, fn -> Snakepit.execute(name, "pid_after", %{seconds: 1}) end)
    assert Enum.frequencies(served_by(name, overlapping)) == %{node() => 1, b.node => 2}

    {:ok, cluster} = Snakepit.get_stats(name, cluster: true)
    assert cluster.nodes == [node(), b.node]
    assert cluster.by_node[node()].calls == 4
    assert cluster.by_node[b.node].calls == 2
    assert cluster.calls == 6
    assert cluster.capacity == 3
    assert Enum.map(cluster.workers, & &1.node) == [node(), b.node]
  end

  test "results and errors of a call run on the other node are those of a local call", %{b: b} do
    name = start_pools!(b, 1, 1)
    blob = :crypto.strong_rand_bytes(300_000)
    calls = [{"fail", %{message: "no", kind: "KeyError"}}, {"echo", %{data: blob, n: 1}}]

    local = Enum.map(calls, fn {tool, args} -> Snakepit.execute(name, tool, args) end)

    holder = hold_local_slot!(name)
    remote = Enum.map(calls, fn {tool, args} -> Snakepit.execute(name, tool, args) end)
    unknown = Snakepit.execute(name, "no_such_tool", %{})
    Task.shutdown(holder, :brutal_kill)

    # all three ran on b
    assert remote_stats(b, name).calls == 3
    assert [{:error, %Snakepit.Error{} = local_error}, {:ok, local_echo}] = local
    assert [{:error, %Snakepit.Error{} = remote_error}, {:ok, remote_echo}] = remote
    assert remote_echo == local_echo
    assert remote_echo == %{"data" => blob, "n" => 1}

    fields = [:reason, :message, :python_type, :grpc_status, :tool]
    assert Map.take(remote_error, fields) == Map.take(local_error, fields)
    assert remote_error.reason == :tool_error and remote_error.python_type == "KeyError"
    assert {:error, %Snakepit.Error{reason: :not_found}} = unknown
  end

  test "the caller's timeout bounds a call run on the other node, whose slot comes back", %{b: b} do
    name = start_pools!(b, 1, 1)
    holder = hold_local_slot!(name)

    assert {:error, %Snakepit.Error{reason: :timeout}} =
             Snakepit.execute(name, "pid_after", %{seconds: 30}, timeout: 300)

    Task.shutdown(holder, :brutal_kill)
    assert remote_stats(b, name).calls == 1
    eventually(fn -> remote_stats(b, name).in_flight == 0 end)
  end

  test "a call run on the other node ends there when its caller dies", %{b: b} do
    name = start_pools!(b, 1, 1)
    holder = hold_local_slot!(name)
    caller = spawn(fn -> Snakepit.execute(name, "pid_after", %{seconds: 30}) end)
    eventually(fn -> remote_stats(b, name).in_flight == 1 end)

    Process.exit(caller, :kill)
    # b's pool saw its caller go: the slot is back long before the 30 s tool would end
    eventually(fn -> remote_stats(b, name).in_flight == 0 end)
    Task.shutdown(holder, :brutal_kill)
  end

  test "a pool that only the other node has serves the call; cluster: false keeps it local",
       %{b: b} do
    name = unique_name()
    start_remote_pool!(b, ClusterPeer.pool_config(name, 1))
    eventually(fn -> Cluster.remote_nodes(name) == [b.node] end)
    [%{os_pid: b_worker}] = ClusterPeer.call(b, :list_workers, [name])

    assert {:ok, %{"pid" => ^b_worker}} = Snakepit.execute(name, "pid_after", %{seconds: 0})

    assert {:ok, [{:ok, 3}, {:ok, 5}]} =
             Snakepit.execute_batch(name, "add", [%{a: 1, b: 2}, %{a: 2, b: 3}])

    assert {:error, %Snakepit.Error{reason: :pool_not_found}} =
             Snakepit.execute(name, "pid_after", %{seconds: 0}, cluster: false)
  end

  test "with cluster: false a call waits for the local pool instead of going elsewhere", %{b: b} do
    name = start_pools!(b, 1, 1)
    [%{os_pid: local_worker}] = Snakepit.list_workers(name)
    holder = Task.async(fn -> Snakepit.execute(name, "pid_after", %{seconds: 1}) end)
    eventually(fn -> Snakepit.Pool.stats(name).in_flight == 1 end)

    assert {:ok, %{"pid" => ^local_worker}} =
             Snakepit.execute(name, "pid_after", %{seconds: 0}, cluster: false)

    assert {:ok, %{"pid" => ^local_worker}} = Task.await(holder)
    assert remote_stats(b, name).calls == 0
  end

  test "a pool configured with cluster: false is not offered to other nodes", %{b: b} do
    name = unique_name()
    start_remote_pool!(b, ClusterPeer.pool_config(name, 1, %{cluster: false}))

    assert [] == :erpc.call(b.node, :pg, :get_local_members, [Cluster, Cluster.group(name)])

    assert {:error, %Snakepit.Error{reason: :pool_not_found}} =
             Snakepit.execute(name, "ping", %{})
  end

  test "a pool that is stopping is no longer offered to other nodes, while its calls finish",
       %{b: b} do
    name = start_pools!(b, 1, 1)
    # a call b's pool runs for b itself
    running =
      Task.async(fn ->
        ClusterPeer.call(b, :execute, [name, "pid_after", %{seconds: 2}, [cluster: false]])
      end)

    eventually(fn -> remote_stats(b, name).in_flight == 1 end)
    stopping = Task.async(fn -> ClusterPeer.call(b, :stop_pool, [name, [grace: 10_000]]) end)

    eventually(fn -> Cluster.remote_nodes(name) == [] end)
    assert is_pid(:erpc.call(b.node, Snakepit.Pool, :whereis, [name]))
    assert :ok = Task.await(stopping, 30_000)
    assert {:ok, %{"pid" => _}} = Task.await(running)
  end

  test "list_workers with cluster: true shows every node's workers", %{b: b} do
    name = start_pools!(b, 1, 2)
    [%{os_pid: b_worker}] = ClusterPeer.call(b, :list_workers, [name])
    [%{os_pid: a_worker}] = Snakepit.list_workers(name)

    assert [%{node: a_node, os_pid: ^a_worker}, %{node: b_node, os_pid: ^b_worker, capacity: 2}] =
             Snakepit.list_workers(name, cluster: true)

    assert {a_node, b_node} == {node(), b.node}
    assert [%{os_pid: ^a_worker}] = Snakepit.list_workers(name)
  end
end
