# Elixir client vs the Python gRPC client, same server, same no-op tool.
#
#     cd elixir_client && mix run ../bench/elixir_client.exs
#
# Starts one threaded worker (a pool of 1, 32 threads) and measures calls/s, p50 and p99 latency of
# `ping` through Snakepit.execute/4 at 1 and 32 concurrent callers; then runs
# bench/elixir_vs_python_client.py (grpc.insecure_channel + generated stubs, 32 threads) against the
# same server and prints both with the Elixir/Python ratio. Rounds alternate Elixir and Python and
# each figure is the median of BENCH_ROUNDS rounds (default 3) of BENCH_CALLS calls (default 3000).
# Other knobs: BENCH_TOOL (default "ping"), BENCH_CONCURRENCY (default "1,32").
#
# On a machine where the Python workers share few cores with the BEAM, the BEAM's scheduler
# busy-waiting takes CPU from them; compare with
#     ELIXIR_ERL_OPTIONS="+sbwt none +sbwtdcpu none +sbwtdio none" mix run ../bench/elixir_client.exs

Logger.configure(level: :warning)
{:ok, _} = Application.ensure_all_started(:snakepit)

calls = String.to_integer(System.get_env("BENCH_CALLS", "3000"))
rounds = String.to_integer(System.get_env("BENCH_ROUNDS", "3"))
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
    queue_size: 10_000
  )

[worker] = Snakepit.list_workers(:bench)

defmodule Bench do
  def percentile(sorted, q) do
    idx = min(length(sorted) - 1, max(0, round(q * (length(sorted) - 1))))
    Enum.at(sorted, idx)
  end

  def run(tool, calls, concurrency) do
    per =
      for i <- 0..(concurrency - 1),
          do: div(calls, concurrency) + if(i < rem(calls, concurrency), do: 1, else: 0)

    t0 = System.monotonic_time()

    lat =
      per
      |> Enum.map(fn n ->
        Task.async(fn ->
          for _ <- 1..n//1 do
            s = System.monotonic_time()
            {:ok, _} = Snakepit.execute(:bench, tool, %{})
            System.monotonic_time() - s
          end
        end)
      end)
      |> Task.await_many(:infinity)
      |> List.flatten()
      |> Enum.map(&(System.convert_time_unit(&1, :native, :nanosecond) / 1.0e6))
      |> Enum.sort()

    secs = System.convert_time_unit(System.monotonic_time() - t0, :native, :nanosecond) / 1.0e9

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

python = Snakepit.Config.default_python()
script = Path.join(Snakepit.Config.repo_root(), "bench/elixir_vs_python_client.py")

python_run = fn level ->
  {out, 0} =
    System.cmd(python, [
      script,
      "--port",
      Integer.to_string(worker.port),
      "--tool",
      tool,
      "--calls",
      Integer.to_string(calls),
      "--concurrency",
      Integer.to_string(level)
    ])

  out |> String.split("\n", trim: true) |> List.last() |> :jiffy.decode([:return_maps])
end

# Rounds alternate Elixir and Python so that load from other processes hits both alike; each
# metric is the median over the rounds.
median = fn runs, key ->
  sorted = runs |> Enum.map(& &1[key]) |> Enum.sort()
  Enum.at(sorted, div(length(sorted), 2))
end

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

busy_wait =
  case System.get_env("ELIXIR_ERL_OPTIONS", "") do
    "" -> "default"
    opts -> opts
  end

load =
  case File.read("/proc/loadavg") do
    {:ok, l} -> l |> String.split(" ") |> Enum.take(3) |> Enum.join(" ")
    _ -> "n/a"
  end

[%{python: pystats}] = stats.workers

IO.puts("""

snakepit client benchmark: tool #{inspect(tool)}, median of #{rounds} rounds of #{calls} calls per level, one threaded worker \
(#{pystats.max_workers} threads, Python #{pystats.python_version}, GIL #{if pystats.gil_enabled, do: "on", else: "off"}), \
#{System.schedulers_online()} schedulers, ELIXIR_ERL_OPTIONS: #{busy_wait}, \
load average #{load}
""")

header = ["client", "conc", "calls/s", "p50 ms", "p99 ms"]
fmt = fn v -> :erlang.float_to_binary(v * 1.0, decimals: 3) end

rows =
  Enum.zip(elixir, py)
  |> Enum.flat_map(fn {e, p} ->
    [
      ["elixir", e["concurrency"], fmt.(e["calls_per_s"]), fmt.(e["p50_ms"]), fmt.(e["p99_ms"])],
      ["python", p["concurrency"], fmt.(p["calls_per_s"]), fmt.(p["p50_ms"]), fmt.(p["p99_ms"])],
      [
        "ratio e/p",
        e["concurrency"],
        fmt.(e["calls_per_s"] / p["calls_per_s"]),
        fmt.(e["p50_ms"] / p["p50_ms"]),
        fmt.(e["p99_ms"] / p["p99_ms"])
      ]
    ]
  end)

for row <- [header | rows] do
  row |> Enum.map(&String.pad_leading(to_string(&1), 11)) |> Enum.join(" ") |> IO.puts()
end

IO.puts("""

ratio e/p: Elixir divided by Python (calls/s: higher is better for Elixir; latency: lower is better; \
target: Elixir latency within 1.3x of Python's).
""")

Snakepit.stop_pool(:bench)
