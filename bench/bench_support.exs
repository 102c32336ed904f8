# What the Elixir benches share (`Code.require_file("bench_support.exs", __DIR__)`).
defmodule BenchSupport do
  @moduledoc false

  @doc "The 1, 5 and 15 minute load averages, as /proc/loadavg has them (\"n/a\" without it)."
  def load_average do
    case File.read("/proc/loadavg") do
      {:ok, line} -> line |> String.split(" ") |> Enum.take(3) |> Enum.join(" ")
      _ -> "n/a"
    end
  end
end
