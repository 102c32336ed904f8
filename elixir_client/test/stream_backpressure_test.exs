Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.StreamBackpressureTest do
  # execute_stream against a real threaded Python worker on 127.0.0.1, loaded with
  # test/support/stream_probe_adapter.py: a generator that records how far it got, readable from
  # another thread of the same worker while the stream runs.
  use ExUnit.Case, async: false
  import Snakepit.PoolHelpers

  @moduletag timeout: 120_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit)
    pool = :"backpressure_#{System.unique_integer([:positive])}"

    {:ok, _} =
      Snakepit.start_pool(
        name: pool,
        worker_profile: :thread,
        pool_size: 1,
        threads_per_worker: 4,
        python_adapter: "stream_probe_adapter.StreamProbeAdapter",
        adapter_env: [{"PYTHONPATH", Path.expand("support", __DIR__)}]
      )

    on_exit(fn -> Snakepit.stop_pool(pool) end)
    [worker] = Snakepit.list_workers(pool)
    %{pool: pool, channel: worker.channel}
  end

  defp key, do: "k#{System.unique_integer([:positive])}"

  defp progress(pool, key) do
    {:ok, record} = Snakepit.execute(pool, "progress_of", %{key: key})
    record
  end

  # Messages the BEAM holds that the consumer has not taken: those in this process's mailbox (a
  # channel keeps none: it forwards each message as soon as it is complete).
  defp buffered_in_beam(_channel) do
    {:message_queue_len, mailbox} = Process.info(self(), :message_queue_len)
    mailbox
  end

  test "a slow consumer of a lazy stream slows the generator and the BEAM buffers a bounded amount",
       %{pool: pool, channel: channel} do
    key = key()
    window = 64 * 1024
    size = 1_000

    observations =
      pool
      |> Snakepit.execute_stream("numbered", %{key: key, count: 100_000, size: size},
        window: window,
        timeout: 30_000
      )
      |> Stream.take(60)
      |> Enum.map(fn %{"seq" => seq} ->
        # The consumer's work: 10 ms per chunk, while the generator makes one in microseconds.
        Process.sleep(10)
        %{"produced" => produced} = progress(pool, key)
        %{lead: produced - (seq + 1), buffered: buffered_in_beam(channel)}
      end)

    assert_bounded(observations, window, size)
    refute_received {:snakepit_grpc, _, _}
  end

  test "a slow callback slows the generator the same way", %{pool: pool, channel: channel} do
    key = key()
    window = 64 * 1024
    size = 1_000
    # The callback runs in this process: it keeps its observations in the process dictionary,
    # where they do not count as mailbox messages.
    assert {:ok, %{"produced" => 2_000}} =
             Snakepit.execute_stream(
               pool,
               "numbered",
               %{key: key, count: 2_000, size: size},
               fn %{"seq" => seq} ->
                 if seq < 60 do
                   # the consumer's work
                   Process.sleep(10)
                   %{"produced" => produced} = progress(pool, key)

                   observation = %{
                     lead: produced - (seq + 1),
                     buffered: buffered_in_beam(channel)
                   }

                   Process.put(:observations, [observation | Process.get(:observations, [])])
                 end
               end,
               window: window,
               timeout: 30_000
             )

    observations = Process.delete(:observations)
    assert length(observations) == 60
    assert_bounded(observations, window, size)
  end

  # A chunk is a little over `size` bytes on the wire, so a window holds fewer than window / size
  # of them. The generator may also have a few in grpcio's write buffer (64 KiB) and one in hand.
  defp assert_bounded(observations, window, size) do
    max_lead = observations |> Enum.map(& &1.lead) |> Enum.max()
    max_buffered = observations |> Enum.map(& &1.buffered) |> Enum.max()
    seen = "producer lead up to #{max_lead} chunks, BEAM buffered up to #{max_buffered}"
    assert max_buffered <= div(window, size), seen
    assert max_lead <= div(window + 64 * 1024, size) + 8, seen
  end

  test "a message larger than the window still arrives whole", %{pool: pool} do
    args = %{key: key(), count: 4, size: 1_000_000}

    chunks =
      pool |> Snakepit.execute_stream("numbered", args, window: 64 * 1024) |> Enum.to_list()

    assert Enum.map(chunks, & &1["seq"]) == [0, 1, 2, 3]
    assert Enum.all?(chunks, &(byte_size(&1["pad"]) == 1_000_000))

    me = self()

    assert {:ok, %{"produced" => 4}} =
             Snakepit.execute_stream(
               pool,
               "numbered",
               %{args | key: key()},
               &send(me, {:chunk, byte_size(&1["pad"])}),
               window: 64 * 1024
             )

    for _ <- 1..4, do: assert_received({:chunk, 1_000_000})
  end

  test "an invalid :window is an ArgumentError before anything runs", %{pool: pool} do
    for window <- [0, -1, :big, 1.5] do
      assert_raise ArgumentError, ~r/:window/, fn ->
        Snakepit.execute_stream(pool, "numbered", %{key: key(), count: 1}, window: window)
      end

      assert_raise ArgumentError, ~r/:window/, fn ->
        Snakepit.execute_stream(pool, "numbered", %{key: key(), count: 1}, fn _ -> :ok end,
          window: window
        )
      end
    end

    assert {:ok, %{in_flight: 0}} = Snakepit.get_stats(pool)
  end

  describe "cleanup" do
    test "Enum.take/2 cancels the stream and leaves no message behind", %{
      pool: pool,
      channel: channel
    } do
      key = key()

      assert [%{"seq" => 0}, %{"seq" => 1}, %{"seq" => 2}] =
               pool
               |> Snakepit.execute_stream("numbered", %{key: key, count: 100_000, size: 1_000})
               |> Enum.take(3)

      refute_received {:snakepit_grpc, _, _}
      # Halting cancels synchronously: the channel forgot the call before take/2 returned.
      assert :sys.get_state(channel).calls == %{}
      assert_stream_gone(pool, channel, key)
    end

    test "a consumer that dies mid-stream gets its stream reset", %{
      pool: pool,
      channel: channel
    } do
      key = key()
      me = self()

      consumer =
        spawn(fn ->
          pool
          |> Snakepit.execute_stream("numbered", %{key: key, count: 100_000, size: 1_000})
          |> Enum.each(fn _ ->
            send(me, :took_one)
            receive do: (:never -> :ok)
          end)
        end)

      assert_receive :took_one, 5_000
      Process.exit(consumer, :kill)
      assert_stream_gone(pool, channel, key)
    end

    test "a stream past its deadline is reset and raises once the buffered chunks are taken", %{
      pool: pool,
      channel: channel
    } do
      key = key()

      # Long enough that the generator has surely started (and sent its first chunks) before the
      # deadline on a loaded machine; the consumer then stalls past it.
      stream =
        Snakepit.execute_stream(pool, "numbered", %{key: key, count: 100_000, size: 1_000},
          timeout: 2_000
        )

      error =
        assert_raise Snakepit.Error, fn ->
          Enum.each(stream, fn
            %{"seq" => 0} ->
              # Stall until the server has seen the call end (the deadline passed).
              eventually(fn -> progress(pool, key)["state"] == "closed" end, 5_000)

            _ ->
              :ok
          end)
        end

      assert error.reason == :timeout
      refute_received {:snakepit_grpc, _, _}
      assert_stream_gone(pool, channel, key)
    end
  end

  # The call is gone from the channel and from its HTTP/2 connection (reset), the pool slot is free
  # and the server closed the generator.
  defp assert_stream_gone(pool, channel, key) do
    eventually(fn ->
      state = :sys.get_state(channel)
      state.calls == %{} and Snakepit.HTTP2.Conn.open_streams(state.conn) == []
    end)

    eventually(fn -> progress(pool, key)["state"] == "closed" end, 5_000)
    eventually(fn -> Snakepit.get_stats(pool) |> elem(1) |> Map.get(:in_flight) == 0 end, 5_000)
  end

  test "stalled lazy streams do not block other calls on the same connection", %{
    pool: pool,
    channel: channel
  } do
    me = self()
    # Two streams whose windows together fill the 16 MiB connection window: if buffered stream
    # data held connection credit back, nothing else could arrive on the connection.
    stalled =
      for _ <- 1..2 do
        Task.async(fn ->
          pool
          |> Snakepit.execute_stream("numbered", %{key: key(), count: 10_000, size: 64 * 1024},
            window: 8 * 1024 * 1024,
            timeout: 60_000
          )
          |> Enum.reduce_while(nil, fn _, _ ->
            send(me, :took_one)
            receive do: (:stop -> {:halt, :stopped})
          end)
        end)
      end

    for _ <- stalled, do: assert_receive(:took_one, 10_000)

    # Stalled: the server has used up each stream's window.
    eventually(
      fn ->
        state = :sys.get_state(channel)

        credits =
          for {_, %{kind: :server_stream, sid: sid}} <- state.calls,
              do: Snakepit.HTTP2.Conn.receive_window(state.conn, sid)

        length(credits) == 2 and Enum.all?(credits, &(&1 < 64 * 1024))
      end,
      10_000
    )

    {micros, results} =
      :timer.tc(fn ->
        for _ <- 1..3, do: Snakepit.execute(pool, "blob", %{size: 5_000_000}, timeout: 10_000)
      end)

    assert Enum.all?(results, &match?({:ok, blob} when byte_size(blob) == 5_000_000, &1))
    assert micros < 5_000_000

    for task <- stalled, do: send(task.pid, :stop)
    assert Task.await_many(stalled, 10_000) == [:stopped, :stopped]
  end

  @tag :bench
  test "stream throughput (mix test --only bench)", %{pool: pool} do
    for {count, size} <- [{20_000, 1_000}, {200, 100_000}],
        window <- [64 * 1024, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024] do
      opts = [window: window, timeout: 60_000]
      mb = count * size / 1_000_000
      args = %{count: count, size: size}

      {us, {:ok, _}} =
        :timer.tc(fn ->
          Snakepit.execute_stream(
            pool,
            "numbered",
            Map.put(args, :key, key()),
            fn _ -> :ok end,
            opts
          )
        end)

      IO.puts(
        "\n#{count} x #{size} B, window #{inspect(window)}, callback: " <>
          "#{round(count / (us / 1_000_000))} chunks/s, #{Float.round(mb / (us / 1_000_000), 1)} MB/s"
      )

      {us, ^count} =
        :timer.tc(fn ->
          pool
          |> Snakepit.execute_stream("numbered", Map.put(args, :key, key()), opts)
          |> Enum.count()
        end)

      IO.puts(
        "#{count} x #{size} B, window #{inspect(window)}, lazy: " <>
          "#{round(count / (us / 1_000_000))} chunks/s, #{Float.round(mb / (us / 1_000_000), 1)} MB/s"
      )
    end
  end
end
