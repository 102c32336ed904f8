# calls/s through a remote pool of 3 endpoints vs a local pool of 3 workers, on this machine.
#
#     cd elixir_client && mix run ../bench/remote_pool.exs
#
# Remote: three grpc_server_threaded.py servers this script starts on 127.0.0.2, .3 and .4 (TCP,
# --max-workers BENCH_THREADS), in a `worker_profile: :remote` pool (capacity read from GetStats).
# Local: a `worker_profile: :thread` pool of 3 workers, BENCH_THREADS threads each, the pool's own
# servers, on TCP too (transport: :tcp; the local default, :uds, is measured in bench/uds_vs_tcp.py).
# Same adapter (the threaded showcase), same tool (BENCH_TOOL, default "ping"; BENCH_ARGS as JSON),
# same callers (BENCH_CONCURRENCY, default "1,16"). Each figure is the median of BENCH_ROUNDS
# rounds (default 3, alternating the two pools) of BENCH_CALLS calls (default 3000).
#
# Not measured: other hosts (here every endpoint is on loopback, so no network latency), TLS,
# DNS discovery (the remote pool here has static endpoints; discovery runs outside the call path).

Logger.configure(level: :warning)
{:ok, _} = Application.ensure_all_started(:snakepit)

rounds = String.to_integer(System.get_env("BENCH_ROUNDS", "3"))
calls = String.to_integer(System.get_env("BENCH_CALLS", "3000"))
threads = String.to_integer(System.get_env("BENCH_THREADS", "4"))
tool = System.get_env("BENCH_TOOL", "ping")
args = :jiffy.decode(System.get_env("BENCH_ARGS", "{}"), [:return_maps])

concurrency =
  System.get_env("BENCH_CONCURRENCY", "1,16")
  |> String.split(",")
  |> Enum.map(&String.to_integer/1)

python = Snakepit.Config.default_python()
repo = Snakepit.Config.repo_root()

Code.require_file("bench_support.exs", __DIR__)
load_average = &BenchSupport.load_average/0

# One server on `host`, owned by this process (its stdin is the Port: it exits with the script).
start_server = fn host ->
  port =
    Port.open({:spawn_executable, python}, [
      :binary,
      :exit_status,
      :stderr_to_stdout,
      {:line, 16_384},
      {:cd, repo},
      {:args,
       [
         Path.join(repo, "grpc_server_threaded.py"),
         "--host",
         host,
         "--port",
         "0",
         "--max-workers",
         Integer.to_string(threads),
         "--adapter",
         "snakepit_bridge.adapters.threaded_showcase.ThreadedShowcaseAdapter",
         "--exit-on-stdin-eof"
       ]}
    ])

  wait = fn wait ->
    receive do
      {^port, {:data, {:eol, "SNAKEPIT_READY port=" <> rest}}} ->
        "#{host}:#{rest |> String.split(" ") |> hd()}"

      {^port, {:data, _}} ->
        wait.(wait)

      {^port, {:exit_status, s}} ->
        raise "server on #{host} exited with #{s}"
    after
      30_000 -> raise "server on #{host} not ready"
    end
  end

  wait.(wait)
end

endpoints = Enum.map(["127.0.0.2", "127.0.0.3", "127.0.0.4"], start_server)

{:ok, _} =
  Snakepit.start_pool(%{
    name: :bench_remote,
    worker_profile: :remote,
    endpoints: endpoints,
    health_check_interval: :infinity
  })

{:ok, _} =
  Snakepit.start_pool(%{
    name: :bench_local,
    worker_profile: :thread,
    pool_size: 3,
    threads_per_worker: threads,
    transport: :tcp,
    health_check_interval: :infinity
  })

# {calls/s, p50 ms, p99 ms} of `calls` calls from `callers` processes.
run = fn pool, callers ->
  per = div(calls, callers)
  t0 = System.monotonic_time()

  latencies =
    1..callers
    |> Task.async_stream(
      fn _ ->
        for _ <- 1..per do
          s = System.monotonic_time()
          {:ok, _} = Snakepit.execute(pool, tool, args)
          System.monotonic_time() - s
        end
      end,
      max_concurrency: callers,
      timeout: :infinity
    )
    |> Enum.flat_map(fn {:ok, l} -> l end)
    |> Enum.sort()

  secs = System.convert_time_unit(System.monotonic_time() - t0, :native, :microsecond) / 1.0e6

  ms = fn q ->
    System.convert_time_unit(
      Enum.at(latencies, round(q * (length(latencies) - 1))),
      :native,
      :microsecond
    ) / 1000
  end

  {length(latencies) / secs, ms.(0.5), ms.(0.99)}
end

median = fn xs -> xs |> Enum.sort() |> Enum.at(div(length(xs), 2)) end

# warm-up: every connection and thread
for pool <- [:bench_remote, :bench_local], do: run.(pool, 16)

IO.puts(
  "\nremote pool (3 endpoints on 127.0.0.2-4) vs local pool (3 thread workers), tool #{tool}, " <>
    "#{threads} threads each, #{calls} calls x #{rounds} rounds (median); load average before: #{load_average.()}"
)

IO.puts(
  String.pad_trailing("callers", 9) <>
    Enum.map_join(
      [
        "remote c/s",
        "local c/s",
        "remote/local",
        "remote p50",
        "local p50",
        "remote p99",
        "local p99"
      ],
      &String.pad_leading(&1, 13)
    )
)

for c <- concurrency do
  results = for _ <- 1..rounds, pool <- [:bench_remote, :bench_local], do: {pool, run.(pool, c)}

  pick = fn pool, i ->
    median.(for {^pool, r} <- results, do: elem(r, i))
  end

  [rr, lr] = [pick.(:bench_remote, 0), pick.(:bench_local, 0)]

  IO.puts(
    String.pad_trailing(Integer.to_string(c), 9) <>
      Enum.map_join(
        [
          :erlang.float_to_binary(rr, decimals: 0),
          :erlang.float_to_binary(lr, decimals: 0),
          :erlang.float_to_binary(rr / lr, decimals: 2),
          :erlang.float_to_binary(pick.(:bench_remote, 1), decimals: 2) <> " ms",
          :erlang.float_to_binary(pick.(:bench_local, 1), decimals: 2) <> " ms",
          :erlang.float_to_binary(pick.(:bench_remote, 2), decimals: 2) <> " ms",
          :erlang.float_to_binary(pick.(:bench_local, 2), decimals: 2) <> " ms"
        ],
        &String.pad_leading(&1, 13)
      )
  )
end

IO.puts("load average after: #{load_average.()}")
