# Elixir client vs the Python gRPC client, same server, same no-op tool; and process workers with
# and without pipelining against plain Python processes.
#
#     cd elixir_client && mix run ../bench/elixir_client.exs
#     BENCH_PARTS=pipeline mix run ../bench/elixir_client.exs     # one part only (client, pipeline, transport, start, recycle)
#
# Part "client": starts one threaded worker (a pool of 1, 32 threads) and measures calls/s, p50 and
# p99 latency of `ping` through Snakepit.execute/4 at 1 and 32 concurrent callers; then runs
# bench/elixir_vs_python_client.py (grpc.insecure_channel + generated stubs, 32 threads) against the
# same server (on the pool's transport: its Unix socket, or with BENCH_TRANSPORT=tcp its port) and
# prints both with the Elixir/Python ratio. Rounds alternate Elixir and Python and each figure is
# the median of BENCH_ROUNDS rounds (default 3) of BENCH_CALLS calls (default 3000). Other knobs:
# BENCH_TOOL (default "ping"), BENCH_CONCURRENCY (default "1,32").
#
# Part "pipeline": two process workers calling a pure-Python tool of about 2 ms (the threaded
# showcase's `python_intensive`, n = BENCH_PIPE_N, default 55000) from BENCH_PIPE_CALLERS callers
# (default 8), with process_pipeline_depth 1 and 2, against two plain Python processes calling the
# same method in a loop (no RPC: what two cores allow, about 1000 calls/s for 2 ms calls). Each
# figure is the median of BENCH_ROUNDS rounds, alternating the three, of BENCH_PIPE_CALLS calls
# (default 1000; a round also stops issuing calls after BENCH_PIPE_SECONDS, default 10).
#
# Part "start": worker start-up with start_mode :spawn (a fresh interpreter per worker) vs
# :fork_server (workers forked from one fork server): the time a pool of BENCH_START_POOL process
# workers (default 8) takes to be ready (Snakepit.start_pool returning; for :fork_server this
# includes the fork server's own start), and the time from a worker's kill -9 to its replacement's
# [:snakepit, :worker, :start] event (BENCH_START_KILLS kills per round, default 5). Medians of
# BENCH_ROUNDS rounds alternating the modes. The replacement time includes the pool's restart
# backoff after a crash (100 ms, the same in both modes).
#
# Part "recycle": what recycling at worker_max_requests costs under load. BENCH_RECYCLE_CALLERS
# callers (default 16) call a pool of BENCH_RECYCLE_POOL process workers (default 4) for
# BENCH_RECYCLE_SECONDS (default 6) each round, with no recycling, and with worker_max_requests
# BENCH_RECYCLE_MAX (default 200) for start_mode :spawn and :fork_server. Per configuration: calls/s
# (median of BENCH_ROUNDS alternating rounds) and its ratio to no recycling, p99 latency, the longest
# gap during which no call completed, and the recycles done. Tool: BENCH_RECYCLE_TOOL, "ping"
# (default) or "python_intensive" (~2 ms of pure Python per call).
#
# On a machine where the Python workers share few cores with the BEAM, the BEAM's scheduler
# busy-waiting takes CPU from them; compare with
#     ELIXIR_ERL_OPTIONS="+sbwt none +sbwtdcpu none +sbwtdio none" mix run ../bench/elixir_client.exs

Logger.configure(level: :warning)
{:ok, _} = Application.ensure_all_started(:snakepit)

parts =
  System.get_env("BENCH_PARTS", "client,pipeline,transport,start,recycle")
  |> String.split(",", trim: true)

rounds = String.to_integer(System.get_env("BENCH_ROUNDS", "3"))

transport =
  case System.get_env("BENCH_TRANSPORT", "uds") do
    "tcp" -> :tcp
    "uds" -> :uds
  end

python = Snakepit.Config.default_python()
script = Path.join(Snakepit.Config.repo_root(), "bench/elixir_vs_python_client.py")

Code.require_file("bench_support.exs", __DIR__)
load_average = &BenchSupport.load_average/0

busy_wait =
  case System.get_env("ELIXIR_ERL_OPTIONS", "") do
    "" -> "default"
    opts -> opts
  end

defmodule TimedCalls do
  @moduledoc false
  # `calls` calls of `tool` (no arguments) through `pool`, split over `concurrency` callers: the
  # sorted latencies in ms and the wall-clock seconds of the whole run.
  def run(pool, tool, calls, concurrency) do
    per =
      for i <- 0..(concurrency - 1),
          do: div(calls, concurrency) + if(i < rem(calls, concurrency), do: 1, else: 0)

    t0 = System.monotonic_time()

    latencies =
      per
      |> Enum.map(fn n ->
        Task.async(fn ->
          for _ <- 1..n//1 do
            s = System.monotonic_time()
            {:ok, _} = Snakepit.execute(pool, tool, %{})
            System.monotonic_time() - s
          end
        end)
      end)
      |> Task.await_many(:infinity)
      |> List.flatten()
      |> Enum.map(&(System.convert_time_unit(&1, :native, :nanosecond) / 1.0e6))
      |> Enum.sort()

    secs = System.convert_time_unit(System.monotonic_time() - t0, :native, :nanosecond) / 1.0e9
    %{latencies_ms: latencies, seconds: secs}
  end
end

# the median of `key` over a list of result maps
median = fn runs, key ->
  sorted = runs |> Enum.map(& &1[key]) |> Enum.sort()
  Enum.at(sorted, div(length(sorted), 2))
end

fmt = fn v -> :erlang.float_to_binary(v * 1.0, decimals: 3) end

print_table = fn rows ->
  for row <- rows do
    row |> Enum.map(&String.pad_leading(to_string(&1), 11)) |> Enum.join(" ") |> IO.puts()
  end
end

if "client" in parts do
  calls = String.to_integer(System.get_env("BENCH_CALLS", "3000"))
  tool = System.get_env("BENCH_TOOL", "ping")

  levels =
    System.get_env("BENCH_CONCURRENCY", "1,32")
    |> String.split(",")
    |> Enum.map(&String.to_integer/1)

  max_level = Enum.max(levels)

  {:ok, _} =
    Snakepit.start_pool(
      name: :bench,
      worker_profile: :thread,
      pool_size: 1,
      threads_per_worker: max_level,
      queue_size: 10_000,
      transport: transport
    )

  [worker] = Snakepit.list_workers(:bench)

  defmodule Bench do
    def percentile(sorted, q) do
      idx = min(length(sorted) - 1, max(0, round(q * (length(sorted) - 1))))
      Enum.at(sorted, idx)
    end

    def run(tool, calls, concurrency) do
      %{latencies_ms: lat, seconds: secs} = TimedCalls.run(:bench, tool, calls, concurrency)

      %{
        "concurrency" => concurrency,
        "calls" => calls,
        "seconds" => secs,
        "calls_per_s" => calls / secs,
        "p50_ms" => percentile(lat, 0.5),
        "p99_ms" => percentile(lat, 0.99)
      }
    end
  end

  # warm-up
  for _ <- 1..500, do: {:ok, _} = Snakepit.execute(:bench, tool, %{})

  # the Python client dials the same socket or port as the pool
  target =
    if worker.uds, do: ["--uds", worker.uds], else: ["--port", Integer.to_string(worker.port)]

  python_run = fn level ->
    {out, 0} =
      System.cmd(
        python,
        [script | target] ++
          [
            "--tool",
            tool,
            "--calls",
            Integer.to_string(calls),
            "--concurrency",
            Integer.to_string(level)
          ]
      )

    out |> String.split("\n", trim: true) |> List.last() |> :jiffy.decode([:return_maps])
  end

  # Rounds alternate Elixir and Python so that load from other processes hits both alike; each
  # metric is the median over the rounds.

  summarize = fn runs, level ->
    %{
      "concurrency" => level,
      "calls_per_s" => median.(runs, "calls_per_s"),
      "p50_ms" => median.(runs, "p50_ms"),
      "p99_ms" => median.(runs, "p99_ms")
    }
  end

  {elixir, py} =
    levels
    |> Enum.map(fn level ->
      runs = for _ <- 1..rounds, do: {Bench.run(tool, calls, level), python_run.(level)}

      {summarize.(Enum.map(runs, &elem(&1, 0)), level),
       summarize.(Enum.map(runs, &elem(&1, 1)), level)}
    end)
    |> Enum.unzip()

  {:ok, stats} = Snakepit.get_stats(:bench)

  [%{python: pystats}] = stats.workers

  IO.puts("""

  snakepit client benchmark: tool #{inspect(tool)}, median of #{rounds} rounds of #{calls} calls per level, one threaded worker \
  (#{pystats.max_workers} threads, Python #{pystats.python_version}, GIL #{if pystats.gil_enabled, do: "on", else: "off"}), \
  #{System.schedulers_online()} schedulers, ELIXIR_ERL_OPTIONS: #{busy_wait}, transport #{transport}, \
  load average #{load_average.()}
  """)

  header = ["client", "conc", "calls/s", "p50 ms", "p99 ms"]

  rows =
    Enum.zip(elixir, py)
    |> Enum.flat_map(fn {e, p} ->
      [
        [
          "elixir",
          e["concurrency"],
          fmt.(e["calls_per_s"]),
          fmt.(e["p50_ms"]),
          fmt.(e["p99_ms"])
        ],
        [
          "python",
          p["concurrency"],
          fmt.(p["calls_per_s"]),
          fmt.(p["p50_ms"]),
          fmt.(p["p99_ms"])
        ],
        [
          "ratio e/p",
          e["concurrency"],
          fmt.(e["calls_per_s"] / p["calls_per_s"]),
          fmt.(e["p50_ms"] / p["p50_ms"]),
          fmt.(e["p99_ms"] / p["p99_ms"])
        ]
      ]
    end)

  print_table.([header | rows])

  IO.puts("""

  ratio e/p: Elixir divided by Python (calls/s: higher is better for Elixir; latency: lower is better; \
  target: Elixir latency within 1.3x of Python's).
  """)

  Snakepit.stop_pool(:bench)
end

if "pipeline" in parts do
  pipe_calls = String.to_integer(System.get_env("BENCH_PIPE_CALLS", "1000"))
  pipe_seconds = String.to_integer(System.get_env("BENCH_PIPE_SECONDS", "10"))
  pipe_callers = String.to_integer(System.get_env("BENCH_PIPE_CALLERS", "8"))
  n = String.to_integer(System.get_env("BENCH_PIPE_N", "55000"))
  adapter = "snakepit_bridge.adapters.threaded_showcase.ThreadedShowcaseAdapter"
  pipe_tool = "python_intensive"
  args = %{n: n}

  pools =
    for depth <- [1, 2], into: %{} do
      name = :"bench_pipeline_#{depth}"

      {:ok, _} =
        Snakepit.start_pool(
          name: name,
          worker_profile: :process,
          pool_size: 2,
          python_adapter: adapter,
          process_pipeline_depth: depth,
          queue_size: 10_000,
          queue_timeout: 60_000,
          transport: transport
        )

      for _ <- 1..20, do: {:ok, _} = Snakepit.execute(name, pipe_tool, args)
      {depth, name}
    end

  # `pipe_calls` calls from `pipe_callers` callers, each stopping early once `pipe_seconds` passed
  pool_run = fn name ->
    deadline = System.monotonic_time(:millisecond) + pipe_seconds * 1_000
    per = div(pipe_calls, pipe_callers)
    t0 = System.monotonic_time()

    done =
      1..pipe_callers
      |> Enum.map(fn _ ->
        Task.async(fn ->
          Enum.reduce_while(1..per, 0, fn _, k ->
            if System.monotonic_time(:millisecond) > deadline do
              {:halt, k}
            else
              {:ok, _} = Snakepit.execute(name, pipe_tool, args, timeout: 60_000)
              {:cont, k + 1}
            end
          end)
        end)
      end)
      |> Task.await_many(:infinity)
      |> Enum.sum()

    secs = System.convert_time_unit(System.monotonic_time() - t0, :native, :nanosecond) / 1.0e9
    %{"calls" => done, "seconds" => secs, "calls_per_s" => done / secs}
  end

  plain_run = fn ->
    {out, 0} =
      System.cmd(python, [
        script,
        "--plain",
        "2",
        "--adapter",
        adapter,
        "--tool",
        pipe_tool,
        "--args",
        :jiffy.encode(args),
        "--calls",
        Integer.to_string(pipe_calls)
      ])

    out |> String.split("\n", trim: true) |> List.last() |> :jiffy.decode([:return_maps])
  end

  runs =
    for _ <- 1..rounds do
      d1 = pool_run.(pools[1])
      d2 = pool_run.(pools[2])
      %{depth1: d1, depth2: d2, plain: plain_run.()}
    end

  pick = fn key -> Enum.map(runs, & &1[key]) end
  d1 = median.(pick.(:depth1), "calls_per_s")
  d2 = median.(pick.(:depth2), "calls_per_s")
  plain = median.(pick.(:plain), "calls_per_s")
  ms_per_call = median.(pick.(:plain), "ms_per_call")
  issued = (pick.(:depth1) ++ pick.(:depth2)) |> Enum.map(& &1["calls"]) |> Enum.min()

  IO.puts("""

  process pipelining: 2 process workers vs 2 plain Python processes, #{pipe_tool}(n=#{n}) \
  (#{fmt.(ms_per_call)} ms a call in a plain process), #{pipe_callers} callers, median of #{rounds} \
  rounds of #{pipe_calls} calls (fewest done in a round: #{issued}), #{System.schedulers_online()} schedulers, \
  ELIXIR_ERL_OPTIONS: #{busy_wait}, transport #{transport}, load average #{load_average.()}
  """)

  print_table.([
    ["run", "calls/s", "vs plain", "vs depth 1"],
    ["plain x2", fmt.(plain), fmt.(1.0), fmt.(plain / d1)],
    ["depth 1", fmt.(d1), fmt.(d1 / plain), fmt.(1.0)],
    ["depth 2", fmt.(d2), fmt.(d2 / plain), fmt.(d2 / d1)]
  ])

  IO.puts("""

  plain x2: two Python processes calling the method in a loop, no RPC (the ceiling); depth 1 / 2: \
  process_pipeline_depth of the pool's 2 process workers. vs plain: calls/s divided by plain's.
  """)

  for {_depth, name} <- pools, do: Snakepit.stop_pool(name)
end

if "transport" in parts do
  # Part "transport": the same threaded worker setup on a Unix socket and on TCP loopback, rounds
  # alternating, ping at 1 and 32 callers through Snakepit.execute/4.
  calls = String.to_integer(System.get_env("BENCH_CALLS", "3000"))

  for t <- [:uds, :tcp] do
    {:ok, _} =
      Snakepit.start_pool(
        name: :"bench_#{t}",
        worker_profile: :thread,
        pool_size: 1,
        threads_per_worker: 32,
        queue_size: 10_000,
        transport: t
      )

    for _ <- 1..500, do: {:ok, _} = Snakepit.execute(:"bench_#{t}", "ping", %{})
  end

  run = fn pool, level ->
    %{latencies_ms: lat, seconds: secs} = TimedCalls.run(pool, "ping", calls, level)
    %{"calls_per_s" => calls / secs, "p50_ms" => Enum.at(lat, div(length(lat), 2))}
  end

  rows =
    for level <- [1, 32] do
      runs = for _ <- 1..rounds, do: {run.(:bench_uds, level), run.(:bench_tcp, level)}
      uds = Enum.map(runs, &elem(&1, 0))
      tcp = Enum.map(runs, &elem(&1, 1))

      [
        level,
        fmt.(median.(uds, "p50_ms")),
        fmt.(median.(tcp, "p50_ms")),
        fmt.(median.(uds, "calls_per_s")),
        fmt.(median.(tcp, "calls_per_s")),
        fmt.(median.(uds, "calls_per_s") / median.(tcp, "calls_per_s"))
      ]
    end

  IO.puts("""

  Elixir client over a Unix socket vs TCP loopback: ping through Snakepit.execute/4, one threaded \
  worker (32 threads) per transport, median of #{rounds} alternating rounds of #{calls} calls, \
  #{System.schedulers_online()} schedulers, ELIXIR_ERL_OPTIONS: #{busy_wait}, load average #{load_average.()}
  """)

  print_table.([["callers", "UDS p50", "TCP p50", "UDS c/s", "TCP c/s", "UDS/TCP"] | rows])
  for t <- [:uds, :tcp], do: Snakepit.stop_pool(:"bench_#{t}")
end

if "start" in parts do
  # Part "start": pool ready time and replacement time after kill -9, :spawn vs :fork_server.
  size = String.to_integer(System.get_env("BENCH_START_POOL", "8"))
  kills = String.to_integer(System.get_env("BENCH_START_KILLS", "5"))
  # Worker start events to this process, through the telemetry handler module (snakepit has no
  # :telemetry dependency).
  defmodule BenchStartEvents do
    def handle_event([:snakepit, :worker, :start], _measurements, meta),
      do: send(:bench_start, {:worker_ready, meta.pool, meta.os_pid})

    def handle_event(_event, _measurements, _meta), do: :ok
  end

  Process.register(self(), :bench_start)
  Application.put_env(:snakepit, :telemetry_handler, BenchStartEvents)
  Snakepit.Telemetry.reset_cache()

  ms_since = fn t0 ->
    System.convert_time_unit(System.monotonic_time() - t0, :native, :microsecond) / 1000
  end

  round = fn mode ->
    name = :"bench_start_#{mode}"
    t0 = System.monotonic_time()

    {:ok, _} =
      Snakepit.start_pool(name: name, worker_profile: :process, pool_size: size, start_mode: mode)

    ready_ms = ms_since.(t0)
    # (the start events of the pool's first workers)
    for _ <- 1..size, do: receive(do: ({:worker_ready, ^name, _} -> :ok))

    replacements =
      for _ <- 1..kills do
        victim = hd(Snakepit.list_workers(name)).os_pid
        t0 = System.monotonic_time()
        System.cmd("kill", ["-9", Integer.to_string(victim)])

        receive do
          {:worker_ready, ^name, pid} when pid != victim -> ms_since.(t0)
        after
          30_000 -> raise "no replacement for #{victim} in 30 s"
        end
      end

    Snakepit.stop_pool(name)
    %{"ready_ms" => ready_ms, "replace_ms" => Enum.at(Enum.sort(replacements), div(kills, 2))}
  end

  runs = for _ <- 1..rounds, do: {round.(:spawn), round.(:fork_server)}
  Application.delete_env(:snakepit, :telemetry_handler)
  spawned = Enum.map(runs, &elem(&1, 0))
  forked = Enum.map(runs, &elem(&1, 1))

  IO.puts("""

  Worker start: a pool of #{size} process workers (showcase adapter) ready, and a worker's \
  replacement ready after kill -9 (median of #{kills} per round), median of #{rounds} alternating \
  rounds (a replacement includes the 100 ms restart backoff after a crash), \
  #{System.schedulers_online()} schedulers, load average #{load_average.()}
  """)

  print_table.([
    ["start_mode", "pool ready ms", "replacement ms"],
    ["spawn", fmt.(median.(spawned, "ready_ms")), fmt.(median.(spawned, "replace_ms"))],
    ["fork_server", fmt.(median.(forked, "ready_ms")), fmt.(median.(forked, "replace_ms"))],
    [
      "spawn/fork",
      fmt.(median.(spawned, "ready_ms") / median.(forked, "ready_ms")),
      fmt.(median.(spawned, "replace_ms") / median.(forked, "replace_ms"))
    ]
  ])
end

if "recycle" in parts do
  # Part "recycle": throughput, p99 and the longest completion gap with and without recycling.
  callers = String.to_integer(System.get_env("BENCH_RECYCLE_CALLERS", "16"))
  size = String.to_integer(System.get_env("BENCH_RECYCLE_POOL", "4"))
  seconds = String.to_integer(System.get_env("BENCH_RECYCLE_SECONDS", "6"))
  max_requests = String.to_integer(System.get_env("BENCH_RECYCLE_MAX", "200"))
  tool = System.get_env("BENCH_RECYCLE_TOOL", "ping")

  # "python_intensive" (the threaded showcase's ~2 ms pure-Python loop, n = BENCH_PIPE_N) stands for
  # a tool that does work; "ping" is the worst case, where a recycle is most of the work.
  {tool_args, adapter_opts} =
    case tool do
      "python_intensive" ->
        {%{n: String.to_integer(System.get_env("BENCH_PIPE_N", "55000"))},
         [python_adapter: "snakepit_bridge.adapters.threaded_showcase.ThreadedShowcaseAdapter"]}

      _ ->
        {%{}, []}
    end

  configs = [
    {"no recycling", [worker_max_requests: :infinity, start_mode: :spawn]},
    {"spawn", [worker_max_requests: max_requests, start_mode: :spawn]},
    {"fork_server", [worker_max_requests: max_requests, start_mode: :fork_server]}
  ]

  # Replacement start times (from the pool starting a replacement to its server being ready) come
  # to this process through the telemetry handler module.
  defmodule BenchRecycleEvents do
    def handle_event(
          [:snakepit, :worker, :start],
          %{duration: d},
          %{reason: :replacement} = meta
        ),
        do: send(:bench_recycle, {:replacement, meta.pool, d})

    def handle_event(_event, _measurements, _meta), do: :ok

    # the replacement times (ms) of `pool` received so far
    def drain(pool, acc) do
      receive do
        {:replacement, ^pool, d} ->
          drain(pool, [System.convert_time_unit(d, :native, :microsecond) / 1000 | acc])
      after
        0 -> acc
      end
    end
  end

  Process.register(self(), :bench_recycle)
  Application.put_env(:snakepit, :telemetry_handler, BenchRecycleEvents)
  Snakepit.Telemetry.reset_cache()

  # One round: `callers` callers for `seconds`; every completion's monotonic time (µs) and latency.
  round = fn {label, opts} ->
    name = :"bench_recycle_#{System.unique_integer([:positive])}"

    {:ok, _} =
      Snakepit.start_pool(
        [
          name: name,
          worker_profile: :process,
          pool_size: size,
          queue_size: 10_000,
          queue_timeout: 60_000,
          transport: transport
        ] ++ adapter_opts ++ opts
      )

    :ok = Snakepit.await_ready(name, 30_000)
    for _ <- 1..20, do: {:ok, _} = Snakepit.execute(name, tool, tool_args)
    recycled_before = Snakepit.Pool.stats(name).recycles
    deadline = System.monotonic_time(:microsecond) + seconds * 1_000_000
    t0 = System.monotonic_time(:microsecond)

    samples =
      1..callers
      |> Enum.map(fn _ ->
        Task.async(fn ->
          Stream.repeatedly(fn -> :call end)
          |> Enum.reduce_while([], fn _, acc ->
            started = System.monotonic_time(:microsecond)

            if started > deadline do
              {:halt, acc}
            else
              {:ok, _} = Snakepit.execute(name, tool, tool_args, timeout: 60_000)
              ended = System.monotonic_time(:microsecond)
              {:cont, [{ended, ended - started} | acc]}
            end
          end)
        end)
      end)
      |> Task.await_many(:infinity)
      |> List.flatten()

    elapsed = (System.monotonic_time(:microsecond) - t0) / 1.0e6
    recycled = Snakepit.Pool.stats(name).recycles - recycled_before
    Snakepit.stop_pool(name)
    replacements = BenchRecycleEvents.drain(name, [])
    ends = samples |> Enum.map(&elem(&1, 0)) |> Enum.sort()

    gap_ms =
      [t0 | ends]
      |> Enum.chunk_every(2, 1, :discard)
      |> Enum.map(fn [a, b] -> b - a end)
      |> Enum.max(fn -> 0 end)
      |> Kernel./(1000)

    latencies = samples |> Enum.map(&elem(&1, 1)) |> Enum.sort()
    p99 = Enum.at(latencies, min(length(latencies) - 1, trunc(length(latencies) * 0.99))) / 1000

    %{
      "label" => label,
      "calls_per_s" => length(samples) / elapsed,
      "p99_ms" => p99,
      "gap_ms" => gap_ms,
      "recycled" => recycled,
      "replacements" => replacements
    }
  end

  runs = for _ <- 1..rounds, config <- configs, do: round.(config)
  Application.delete_env(:snakepit, :telemetry_handler)

  IO.puts("""

  Recycling: #{callers} callers, a pool of #{size} process workers, `#{tool}`, #{seconds} s per round, \
  worker_max_requests #{max_requests} (jitter default), median of #{rounds} alternating rounds \
  (gap: the longest time in a round with no call completing; the worst round), \
  #{System.schedulers_online()} schedulers, load average #{load_average.()}
  """)

  base = runs |> Enum.filter(&(&1["label"] == "no recycling")) |> median.("calls_per_s")

  rows =
    for {label, _} <- configs do
      mine = Enum.filter(runs, &(&1["label"] == label))
      rate = median.(mine, "calls_per_s")

      [
        label,
        fmt.(rate),
        fmt.(rate / base),
        fmt.(median.(mine, "p99_ms")),
        fmt.(mine |> Enum.map(& &1["gap_ms"]) |> Enum.max()),
        mine |> Enum.map(& &1["recycled"]) |> Enum.sum() |> Kernel.div(rounds),
        case mine |> Enum.flat_map(& &1["replacements"]) |> Enum.sort() do
          [] -> "-"
          all -> fmt.(Enum.at(all, div(length(all), 2)))
        end
      ]
    end

  print_table.([
    ["config", "calls/s", "vs none", "p99 ms", "max gap ms", "recycles", "replace ms"] | rows
  ])
end
