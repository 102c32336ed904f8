# The Elixir client's rows of bench/array_roundtrip.py (run there with --elixir; not meant to be
# run by hand, but it can be):
#
#     cd elixir_client && mix run ../bench/elixir_array_roundtrip.exs
#
# Starts two pools of one threaded worker each, one with shared memory (`shm: true`, the default)
# and one without (`shm: false`: every blob inline), prints `{"ready": true}`, then answers each
# line of stdin, `{"path": "inline" | "shm", "size_mb": 16}`, with one timed round trip of a
# float64 array of that size through `Snakepit.execute(pool, "echo", %{x: array})`:
# `{"path": ..., "size_mb": ..., "seconds": ...}` (the time of the call alone; the result is
# checked against the array after the clock stopped). One round trip per line lets the Python
# bench interleave these paths with its own, round by round. At end of input it prints
# `{"regions_left": n}`, the files left in the shared-memory pool's directory, and stops.

Logger.configure(level: :warning)
{:ok, _} = Application.ensure_all_started(:snakepit)

common = [worker_profile: :thread, pool_size: 1, threads_per_worker: 4, call_timeout: 300_000]
{:ok, _} = Snakepit.start_pool([name: :bench_inline, shm: false] ++ common)
{:ok, _} = Snakepit.start_pool([name: :bench_shm, shm: true] ++ common)

defmodule ArrayRoundTrip do
  @pools %{"inline" => :bench_inline, "shm" => :bench_shm}

  def serve(arrays) do
    case IO.read(:stdio, :line) do
      :eof ->
        :ok

      line ->
        %{"path" => path, "size_mb" => size_mb} = :jiffy.decode(line, [:return_maps])
        {array, arrays} = array(arrays, size_mb)
        pool = Map.fetch!(@pools, path)

        {micros, result} =
          :timer.tc(fn -> Snakepit.execute(pool, "echo", %{x: array}, timeout: 300_000) end)

        {:ok, %{"x" => back}} = result
        if back != array, do: raise("#{path}: the array came back different")
        reply = %{path: path, size_mb: size_mb, seconds: micros / 1.0e6}
        IO.puts(:jiffy.encode(reply))
        serve(arrays)
    end
  end

  # float64 arrays of `size_mb` MB, one per size (random bits: the echo copies them unchanged)
  defp array(arrays, size_mb) do
    case arrays do
      %{^size_mb => array} ->
        {array, arrays}

      _ ->
        n = trunc(size_mb * 1.0e6) |> div(8)

        array = %Snakepit.NDArray{
          data: :crypto.strong_rand_bytes(n * 8),
          dtype: "<f8",
          shape: [n]
        }

        {array, Map.put(arrays, size_mb, array)}
    end
  end
end

IO.puts(:jiffy.encode(%{ready: true}))
ArrayRoundTrip.serve(%{})
IO.puts(:jiffy.encode(%{regions_left: length(File.ls!(Snakepit.Pool.shm(:bench_shm).dir))}))
Snakepit.stop_pool(:bench_inline)
Snakepit.stop_pool(:bench_shm)
