Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.TelemetryTest.Forwarder do
  # The handler-module path of Snakepit.Telemetry: every event goes to the test process registered
  # as the sink (events of pools stopping after a test find no sink and are dropped).
  @behaviour Snakepit.Telemetry

  @impl true
  def handle_event(event, measurements, metadata) do
    case Process.whereis(:snakepit_telemetry_sink) do
      nil -> :ok
      pid -> send(pid, {:handler, event, measurements, metadata})
    end
  end
end

defmodule Snakepit.TelemetryTest.Raising do
  @behaviour Snakepit.Telemetry

  @impl true
  def handle_event(_event, _measurements, _metadata), do: raise("telemetry handler bug")
end

defmodule Snakepit.TelemetryTest do
  # Snakepit.Telemetry's events and the traceparent a call sends, with real Python workers.
  # Events reach the test through the handler module (Forwarder) unless a test loads a fake
  # :telemetry module, which it unloads again.
  use ExUnit.Case, async: false
  import ExUnit.CaptureLog
  import Snakepit.PoolHelpers

  alias Snakepit.{Error, Telemetry}
  alias Snakepit.TelemetryTest.{Forwarder, Raising}

  @moduletag :slow
  @moduletag timeout: 120_000

  @trace_id "4bf92f3577b34da6a3ce929d0e0e4736"
  @traceparent "00-#{@trace_id}-00f067aa0ba902b7-01"

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit)
    :ok
  end

  setup do
    Process.register(self(), :snakepit_telemetry_sink)
    Application.put_env(:snakepit, :telemetry_handler, Forwarder)
    Telemetry.reset_cache()

    on_exit(fn ->
      Application.delete_env(:snakepit, :telemetry_handler)
      Telemetry.reset_cache()
    end)
  end

  # The next event `event` of `pool` (and matching `match`), from the handler module.
  defmacrop assert_event(event, pool, match \\ quote(do: _), timeout \\ 5_000) do
    quote do
      assert_receive {:handler, unquote(event), measurements,
                      %{pool: unquote(pool)} = metadata = unquote(match)},
                     unquote(timeout)

      {measurements, metadata}
    end
  end

  defp ms(native), do: System.convert_time_unit(native, :native, :millisecond)

  ## call events

  test "a successful call emits call start and stop with pool, tool and worker, and a positive duration" do
    pool = start_pool!(worker_profile: :process, pool_size: 1)
    [w] = Snakepit.list_workers(pool)
    worker_id = w.id

    assert {:ok, 5} = Snakepit.execute(pool, "add", %{a: 2, b: 3}, request_id: "req-1")

    {start, start_md} = assert_event([:snakepit, :call, :start], ^pool)
    assert is_integer(start.system_time) and is_integer(start.monotonic_time)

    assert %{tool: "add", operation: :execute, request_id: "req-1", trace_id: nil} = start_md
    refute Map.has_key?(start_md, :worker)

    {stop, stop_md} = assert_event([:snakepit, :call, :stop], ^pool)
    assert stop.duration > 0
    assert stop.monotonic_time - stop.duration == start.monotonic_time

    assert %{tool: "add", operation: :execute, result: :ok, error: nil, worker: ^worker_id} =
             stop_md

    assert {stop_md.worker_pid, stop_md.os_pid, stop_md.port, stop_md.uds} ==
             {w.pid, w.os_pid, w.port, w.uds}

    assert is_binary(w.uds)
    refute_received {:handler, [:snakepit, :call, :exception], _, _}
  end

  test "a tool error ends the call with a stop event whose result is :error and whose error is the tool's" do
    pool = start_pool!(worker_profile: :process, pool_size: 1)

    assert {:error, %Error{reason: :tool_error}} =
             Snakepit.execute(pool, "fail", %{message: "boom", kind: "KeyError"})

    {stop, md} = assert_event([:snakepit, :call, :stop], ^pool)
    assert stop.duration > 0

    assert %{tool: "fail", result: :error, error_reason: :tool_error} = md
    assert %Error{python_type: "KeyError"} = md.error
    assert is_integer(md.worker)
    refute_received {:handler, [:snakepit, :call, :exception], _, _}
  end

  test "a call that gets no slot ends with a stop event without a worker" do
    assert {:error, %Error{reason: :pool_not_found}} =
             Snakepit.execute(:no_such_pool, "add", %{a: 1, b: 2})

    assert_event([:snakepit, :call, :start], :no_such_pool)

    {_, md} = assert_event([:snakepit, :call, :stop], :no_such_pool)
    assert %{result: :error, error_reason: :pool_not_found, worker: nil, os_pid: nil} = md

    {_, md} = assert_event([:snakepit, :queue, :wait], :no_such_pool)
    assert %{result: :error, error_reason: :pool_not_found, queued: false} = md
  end

  test "a stream callback that raises ends the call with an exception event; the pool serves on" do
    pool = start_pool!(worker_profile: :thread, pool_size: 1, threads_per_worker: 2)

    assert_raise RuntimeError, "consumer bug", fn ->
      Snakepit.execute_stream(pool, "progress", %{steps: 3}, fn _ -> raise "consumer bug" end)
    end

    {m, md} = assert_event([:snakepit, :call, :exception], ^pool)
    assert m.duration > 0

    assert %{kind: :error, reason: %RuntimeError{message: "consumer bug"}, operation: :stream} =
             md

    assert [_ | _] = md.stacktrace
    assert is_integer(md.worker)
    refute_received {:handler, [:snakepit, :call, :stop], _, %{pool: ^pool}}

    assert {:ok, %{"completed" => 2}} =
             Snakepit.execute_stream(pool, "progress", %{steps: 2}, fn _ -> :ok end)

    assert_event([:snakepit, :call, :stop], ^pool, %{operation: :stream, result: :ok})
  end

  test "a lazy stream's span ends when it ends: read to the end, halted early, or failed" do
    pool = start_pool!(worker_profile: :thread, pool_size: 1, threads_per_worker: 2)

    assert [_, _, _] = pool |> Snakepit.execute_stream("progress", %{steps: 3}) |> Enum.to_list()
    assert_event([:snakepit, :call, :start], ^pool, %{operation: :stream, tool: "progress"})
    assert_event([:snakepit, :call, :stop], ^pool, %{result: :ok, operation: :stream})

    assert [_] = pool |> Snakepit.execute_stream("progress", %{steps: 50}) |> Enum.take(1)
    assert_event([:snakepit, :call, :stop], ^pool, %{result: :halted})

    # the generator refuses `steps` once it runs: the failure comes with the stream
    error =
      assert_raise Error, ~r/steps/, fn ->
        pool |> Snakepit.execute_stream("progress", %{steps: -1}) |> Enum.to_list()
      end

    {_, md} = assert_event([:snakepit, :call, :stop], ^pool, %{result: :error})
    assert {md.error, md.error_reason} == {error, error.reason}
    refute_received {:handler, [:snakepit, :call, :exception], _, _}
    # every slot was given back
    eventually(fn -> match?({:ok, %{in_flight: 0, calls: 3}}, Snakepit.get_stats(pool)) end)
  end

  test "a batch is one call span with its number of items" do
    pool = start_pool!(worker_profile: :thread, pool_size: 1, threads_per_worker: 2)

    assert {:ok, [{:ok, 3}, {:error, %Error{}}]} =
             Snakepit.execute_batch(pool, "add", [%{a: 1, b: 2}, %{a: 1}])

    assert_event([:snakepit, :call, :start], ^pool, %{operation: :batch, items: 2})
    assert_event([:snakepit, :call, :stop], ^pool, %{operation: :batch, items: 2, result: :ok})
  end

  ## worker events

  test "starting a pool emits a worker start event per worker, with its startup time" do
    pool = start_pool!(worker_profile: :process, pool_size: 2)
    workers = Snakepit.list_workers(pool)

    events =
      for _ <- 1..2 do
        {m, md} = assert_event([:snakepit, :worker, :start], ^pool, %{reason: :initial})
        assert m.duration > 0 and is_integer(m.system_time)
        Map.take(md, [:worker, :slot, :worker_pid, :os_pid, :port, :uds])
      end

    expected =
      for w <- workers,
          do: %{
            worker: w.id,
            slot: w.slot,
            worker_pid: w.pid,
            os_pid: w.os_pid,
            port: w.port,
            uds: w.uds
          }

    assert Enum.sort(events) == Enum.sort(expected)
  end

  test "a worker killed with kill -9 emits a worker crash event, counted for its slot, then its replacement's start" do
    pool = start_pool!(worker_profile: :process, pool_size: 1)
    [w] = Snakepit.list_workers(pool)
    worker_id = w.id
    kill9(w.os_pid)

    {m, md} = assert_event([:snakepit, :worker, :crash], ^pool, %{worker: ^worker_id}, 10_000)
    assert m.uptime > 0

    assert %{slot: 1, status: :ready, requests: 0} = md
    assert {md.os_pid, md.port, md.uds, md.worker_pid} == {w.os_pid, w.port, w.uds, w.pid}
    # the Python process' exit (status 137 = SIGKILL) or its connection dropping, whichever the
    # worker saw first
    assert md.reason == {:shutdown, {:python_exited, 137}} or
             match?({:shutdown, {:channel_down, _}}, md.reason)

    if md.exit_status != nil, do: assert(md.exit_status == 137)

    {_, md} = assert_event([:snakepit, :worker, :start], ^pool, %{reason: :restart}, 20_000)
    assert %{slot: 1} = md
    assert md.worker != worker_id

    {:ok, stats} = Snakepit.get_stats(pool)
    assert %{crashes: 1, slots: [%{slot: 1, crashes: 1, recycles: 0}]} = stats
    assert [%{slot_crashes: 1, slot_recycles: 0}] = stats.workers
  end

  test "a pool with worker_max_requests emits a recycle event with reason :max_requests" do
    pool = start_pool!(worker_profile: :process, pool_size: 1, worker_max_requests: 2)
    [w] = Snakepit.list_workers(pool)
    worker_id = w.id

    assert {:ok, 2} = Snakepit.execute(pool, "add", %{a: 1, b: 1})
    refute_received {:handler, [:snakepit, :worker, :recycle], _, _}
    assert {:ok, 3} = Snakepit.execute(pool, "add", %{a: 1, b: 2})

    {m, md} = assert_event([:snakepit, :worker, :recycle], ^pool)
    assert m.uptime > 0 and is_integer(m.system_time)
    assert %{worker: ^worker_id, reason: :max_requests, requests: 2, slot: 1} = md

    {_, md} = assert_event([:snakepit, :worker, :start], ^pool, %{reason: :replacement}, 20_000)
    replacement = md.worker

    # the recycled worker stops: that is no crash
    eventually(fn -> match?([%{id: ^replacement}], Snakepit.list_workers(pool)) end, 20_000)
    refute_received {:handler, [:snakepit, :worker, :crash], _, _}

    {:ok, stats} = Snakepit.get_stats(pool)
    assert %{recycles: 1, crashes: 0, slots: [%{slot: 1, recycles: 1, crashes: 0}]} = stats
    assert [%{id: ^replacement, slot_recycles: 1, requests: 0}] = stats.workers
  end

  ## queue wait

  test "a saturated pool reports a queue wait as long as the caller waited" do
    pool =
      start_pool!(
        worker_profile: :process,
        pool_size: 1,
        queue_timeout: 20_000,
        process_pipeline_depth: 1
      )

    first = Task.async(fn -> Snakepit.execute(pool, "sleep", %{seconds: 0.4}) end)

    {m, md} = assert_event([:snakepit, :queue, :wait], ^pool)
    assert %{queued: false, result: :ok, tool: "sleep", operation: :execute} = md
    assert ms(m.duration) < 250

    # the first call holds the only slot for 0.4 s from now on
    second = Task.async(fn -> Snakepit.execute(pool, "add", %{a: 1, b: 1}) end)

    {m, md} = assert_event([:snakepit, :queue, :wait], ^pool)
    assert %{queued: true, result: :ok, tool: "add"} = md
    assert is_integer(md.worker)
    assert ms(m.duration) >= 250, "waited #{ms(m.duration)} ms"

    assert {:ok, %{"cancelled" => false}} = Task.await(first, 10_000)
    assert {:ok, 2} = Task.await(second, 10_000)

    {:ok, stats} = Snakepit.get_stats(pool)
    assert %{checkouts: 2, queued_total: 1} = stats
    assert stats.queue_wait_max_ms >= 250
    assert stats.queue_wait_total_ms >= stats.queue_wait_max_ms
  end

  ## traceparent

  defp trace_pool!,
    do:
      start_pool!(
        Map.merge(test_adapter("TraceContextAdapter"), %{
          worker_profile: :thread,
          pool_size: 1,
          threads_per_worker: 2
        })
      )

  test "a call's traceparent option reaches the Python tool and the call's telemetry" do
    pool = trace_pool!()

    assert {:ok, %{"traceparent" => @traceparent, "trace_id" => @trace_id}} =
             Snakepit.execute(pool, "trace_context", %{}, traceparent: @traceparent)

    assert_event([:snakepit, :call, :start], ^pool, %{trace_id: @trace_id})

    assert_event([:snakepit, :call, :stop], ^pool, %{
      trace_id: @trace_id,
      traceparent: @traceparent
    })

    assert_event([:snakepit, :queue, :wait], ^pool, %{trace_id: @trace_id})

    assert {:ok, %{"traceparent" => "", "trace_id" => ""}} =
             Snakepit.execute(pool, "trace_context", %{})
  end

  test "without the option the process dictionary's traceparent is sent; the option wins" do
    pool = trace_pool!()
    other = "00-#{String.duplicate("a", 32)}-#{String.duplicate("b", 16)}-00"
    Process.put(:snakepit_traceparent, @traceparent)

    assert {:ok, %{"traceparent" => @traceparent}} = Snakepit.execute(pool, "trace_context", %{})

    assert {:ok, %{"traceparent" => ^other}} =
             Snakepit.execute(pool, "trace_context", %{}, traceparent: other)
  end

  test "an invalid traceparent is not sent and the call is served untraced" do
    pool = trace_pool!()

    assert {:ok, %{"traceparent" => "", "trace_id" => ""}} =
             Snakepit.execute(pool, "trace_context", %{}, traceparent: String.upcase(@traceparent))

    assert_event([:snakepit, :call, :stop], ^pool, %{result: :ok, trace_id: nil, traceparent: nil})
  end

  test "streams, batches and session calls send the traceparent too" do
    pool = trace_pool!()
    Process.put(:snakepit_traceparent, @traceparent)

    assert [%{"trace_id" => @trace_id}] =
             pool |> Snakepit.execute_stream("trace_context_stream", %{}) |> Enum.to_list()

    me = self()

    assert {:ok, nil} =
             Snakepit.execute_stream(pool, "trace_context_stream", %{}, &send(me, {:chunk, &1}))

    assert_received {:chunk, %{"trace_id" => @trace_id}}

    assert {:ok, [{:ok, %{"trace_id" => @trace_id}}, {:ok, %{"trace_id" => @trace_id}}]} =
             Snakepit.execute_batch(pool, "trace_context", [%{}, %{}])

    assert {:ok, %{"trace_id" => @trace_id}} =
             Snakepit.execute_in_session(pool, "traced-session", "trace_context", %{}, [])
  end

  ## dispatch

  test "a handler that raises is logged once and fails neither the calls nor the pool" do
    Application.put_env(:snakepit, :telemetry_handler, Raising)

    log =
      capture_log(fn ->
        pool = start_pool!(worker_profile: :process, pool_size: 1)
        pool_pid = Snakepit.Pool.whereis(pool)

        for i <- 1..3, do: assert({:ok, ^i} = Snakepit.execute(pool, "add", %{a: i, b: 0}))

        assert Snakepit.Pool.whereis(pool) == pool_pid
      end)

    assert [_] = Regex.scan(~r/telemetry handler .*Raising failed/, log)
    assert log =~ "telemetry handler bug"
  end

  test "with a :telemetry module loaded, events go to :telemetry.execute/3 instead of the handler module" do
    # whether :telemetry is loaded is asked once and kept until reset_cache/0
    refute Telemetry.telemetry_loaded?()
    load_fake_telemetry()
    Telemetry.execute([:snakepit, :test], %{n: 1}, %{pool: :none})
    assert_received {:handler, [:snakepit, :test], %{n: 1}, _}

    Telemetry.reset_cache()
    assert Telemetry.telemetry_loaded?()
    Telemetry.execute([:snakepit, :test], %{n: 2}, %{pool: :none})
    assert_received {:telemetry, [:snakepit, :test], %{n: 2}, %{pool: :none}}

    pool = start_pool!(worker_profile: :process, pool_size: 1)
    assert {:ok, 3} = Snakepit.execute(pool, "add", %{a: 1, b: 2})
    assert_receive {:telemetry, [:snakepit, :worker, :start], _, %{pool: ^pool}}
    assert_receive {:telemetry, [:snakepit, :call, :stop], %{duration: _}, %{pool: ^pool}}
    refute_received {:handler, _, _, _}

    unload_fake_telemetry()
    refute Telemetry.telemetry_loaded?()
  end

  # A stand-in :telemetry, compiled here (not under test/support) so that only this test sees it.
  defp load_fake_telemetry do
    on_exit(&unload_fake_telemetry/0)

    Code.compile_string("""
    defmodule :telemetry do
      def execute(event, measurements, metadata) do
        case Process.whereis(:snakepit_telemetry_sink) do
          nil -> :ok
          pid -> send(pid, {:telemetry, event, measurements, metadata})
        end
      end
    end
    """)
  end

  defp unload_fake_telemetry do
    # soft: a purge that would kill a process still running the module's code does nothing
    :code.delete(:telemetry)
    :code.soft_purge(:telemetry)
    Telemetry.reset_cache()
  end
end
