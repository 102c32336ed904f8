# What cluster routing (Snakepit.Cluster) costs a call: latency of `ping` at 1 caller through
# Snakepit.execute/4 on three pools of one thread worker (4 threads) each:
#
#   * solo:   a pool no other node has (the path of a node without a cluster)
#   * shared: a pool a peer node also has, with a free local slot (the fast path: the checkout
#             asks the local pool without queueing)
#   * remote: a pool only the peer node has (every call: one load query to the peer, then the
#             call through :erpc, run by the peer's pool)
#
#     cd elixir_client && MIX_ENV=test mix run ../bench/elixir_cluster.exs
#
# (MIX_ENV=test: the peer node is started by test/support/cluster_peer.ex, an `elixir --sname`
# BEAM on this machine, epmd on 127.0.0.1.) Rounds alternate the three pools; each figure is the
# median over BENCH_ROUNDS rounds (default 5) of BENCH_CALLS sequential calls (default 2000).
# Not measured: a saturated local pool under load (then a call waits for the peer's load anyway),
# nodes on different machines (here distribution is loopback TCP).

alias Snakepit.Test.ClusterPeer

Logger.configure(level: :warning)
{:ok, _} = Application.ensure_all_started(:snakepit)
rounds = String.to_integer(System.get_env("BENCH_ROUNDS", "5"))
calls = String.to_integer(System.get_env("BENCH_CALLS", "2000"))

Code.require_file("bench_support.exs", __DIR__)
load_average = &BenchSupport.load_average/0

IO.puts("load average before: #{load_average.()}")
started = ClusterPeer.ensure_distributed!()
peer = ClusterPeer.start!("bench_peer")

config = fn name ->
  %{name: name, worker_profile: :thread, pool_size: 1, threads_per_worker: 4}
end

{:ok, _} = Snakepit.start_pool(config.(:bench_solo))
{:ok, _} = Snakepit.start_pool(config.(:bench_shared))
{:ok, _} = ClusterPeer.call(peer, :start_pool, [config.(:bench_shared)])
{:ok, _} = ClusterPeer.call(peer, :start_pool, [config.(:bench_remote)])

wait = fn wait, name ->
  if Snakepit.Cluster.remote_nodes(name) == [peer.node],
    do: :ok,
    else: Process.sleep(50) && wait.(wait, name)
end

wait.(wait, :bench_shared)
wait.(wait, :bench_remote)

# µs of each of `calls` sequential calls, sorted
run = fn pool ->
  for _ <- 1..calls do
    t0 = System.monotonic_time()
    {:ok, _} = Snakepit.execute(pool, "ping", %{})
    System.convert_time_unit(System.monotonic_time() - t0, :native, :microsecond)
  end
  |> Enum.sort()
end

pools = [:bench_solo, :bench_shared, :bench_remote]
# warm-up
Enum.each(pools, fn p -> run.(p) end)

median = fn xs -> xs |> Enum.sort() |> Enum.at(div(length(xs), 2)) end

results =
  for _ <- 1..rounds, pool <- pools, reduce: %{} do
    acc ->
      us = run.(pool)
      p50 = Enum.at(us, div(calls, 2))
      p99 = Enum.at(us, div(calls * 99, 100))
      mean = Enum.sum(us) / calls
      Map.update(acc, pool, [{p50, p99, mean}], &[{p50, p99, mean} | &1])
  end

summary =
  Map.new(results, fn {pool, rs} ->
    {pool,
     {median.(Enum.map(rs, &elem(&1, 0))), median.(Enum.map(rs, &elem(&1, 1))),
      median.(Enum.map(rs, &elem(&1, 2)))}}
  end)

{solo_p50, _, solo_mean} = summary[:bench_solo]

IO.write("""

cluster routing: ping at 1 caller, #{calls} calls x #{rounds} rounds (medians)

| pool | p50 µs | p50 / solo | p99 µs | mean µs | mean / solo |
|---|---:|---:|---:|---:|---:|
""")

for pool <- pools do
  {p50, p99, mean} = summary[pool]

  IO.puts(
    "| #{pool} | #{p50} | #{Float.round(p50 / solo_p50, 2)} | #{p99} | #{Float.round(mean, 1)} | #{Float.round(mean / solo_mean, 2)} |"
  )
end

IO.puts("\nload average after: #{load_average.()}")
ClusterPeer.stop(peer)
if started, do: ClusterPeer.stop_distribution()
