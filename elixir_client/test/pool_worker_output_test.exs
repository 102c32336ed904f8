Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.PoolWorkerOutputTest do
  # What an adapter prints while it starts must neither make its worker ready nor fill the BEAM.
  use ExUnit.Case, async: false
  import Snakepit.PoolHelpers
  import ExUnit.CaptureLog

  @moduletag :slow
  @moduletag timeout: 120_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit)
    :ok
  end

  for profile <- [:process, :thread] do
    test "a fake SNAKEPIT_READY line printed by a #{profile} adapter's setup does not make its worker ready" do
      pool =
        start_pool!(
          Map.merge(test_adapter("FakeReadyLineAdapter"), %{
            worker_profile: unquote(profile),
            pool_size: 1,
            startup_timeout: 20_000
          })
        )

      assert {:ok, 5} = Snakepit.execute(pool, "add", %{a: 2, b: 3})
      assert {:ok, %{crashes: 0, workers_started: 1}} = Snakepit.get_stats(pool)
      # the server's own line: its socket, not the fake port=1
      assert [%{port: nil, uds: "/" <> _ = uds}] = ready_workers(pool)
      assert File.exists?(uds)
    end
  end

  # Spawned, the worker's Port lines are cut here; forked, the fork server cuts them (at 16 KiB).
  for mode <- [:spawn, :fork_server] do
    @mode mode
    test "a 64 MiB line without newline and carriage-return progress bars are truncated: the worker gets ready in bounded memory (#{mode})" do
      sampler = start_binary_memory_sampler()

      log =
        capture_log(fn ->
          pool =
            start_pool!(
              Map.merge(test_adapter("FloodingOutputAdapter"), %{
                worker_profile: :process,
                pool_size: 1,
                startup_timeout: 60_000,
                start_mode: @mode
              })
            )

          assert {:ok, 5} = Snakepit.execute(pool, "add", %{a: 2, b: 3})
          [w] = Snakepit.list_workers(pool)

          retained =
            w.pid |> Process.info(:binary) |> elem(1) |> Enum.map(&elem(&1, 1)) |> Enum.sum()

          assert retained < 1_048_576, "the worker keeps #{retained} bytes of binaries"
        end)

      peak = stop_sampler(sampler)
      assert peak < 32 * 1_048_576, "binary memory grew by #{peak} bytes while the worker started"
      assert log =~ "output line truncated"
    end
  end

  # Samples :erlang.memory(:binary) every 5 ms; returns the largest growth over the first sample.
  defp start_binary_memory_sampler do
    parent = self()

    spawn_link(fn ->
      base = :erlang.memory(:binary)
      sample(parent, base, 0)
    end)
  end

  defp sample(parent, base, peak) do
    receive do
      :stop -> send(parent, {:peak, peak})
    after
      5 -> sample(parent, base, max(peak, :erlang.memory(:binary) - base))
    end
  end

  defp stop_sampler(pid) do
    send(pid, :stop)
    assert_receive {:peak, peak}, 5_000
    peak
  end
end
