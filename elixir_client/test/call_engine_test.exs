Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.CallEngineTest do
  # How a failed call's :unavailable is told apart from a worker crash, on a scripted HTTP/2
  # server with a stand-in worker process (the pool's worker is linked to its channel and goes
  # down with it).
  use ExUnit.Case, async: true

  alias Snakepit.{CallEngine, Error, FakeH2Server, Proto}
  alias Snakepit.GRPC.Message

  @ok_headers [{":status", "200"}, {"content-type", "application/grpc"}]

  # A lease on a channel to a server running `handler`, owned like a pool worker's: by a process
  # that exits when the channel does.
  defp lease(handler) do
    port = FakeH2Server.start(handler)
    me = self()

    worker =
      spawn(fn ->
        {:ok, channel} = Snakepit.GRPC.Channel.start_link(host: "127.0.0.1", port: port)
        send(me, {:channel, channel})
        receive do: (:never -> :ok)
      end)

    assert_receive {:channel, channel}, 5_000

    %{
      channel: channel,
      worker: worker,
      worker_id: 7,
      call_timeout: 60_000,
      # A call that wrongly waited for the worker would take 30 s: far past any "at once" bound
      # below, however slowly a loaded machine runs the test.
      worker_exit_wait: 30_000,
      fates: :ets.new(:fates, [:set, :public])
    }
  end

  defp execute(lease) do
    timed(fn ->
      CallEngine.unary(
        lease,
        "ExecuteTool",
        :execute_tool_request,
        %{tool_name: "t", args_json: "{}"},
        :execute_tool_response,
        "t",
        []
      )
    end)
  end

  defp timed(fun) do
    t0 = System.monotonic_time(:millisecond)
    result = fun.()
    {System.monotonic_time(:millisecond) - t0, result}
  end

  test "a server's UNAVAILABLE on a live connection is :unavailable at once, without waiting on the worker" do
    lease = lease(fn _, _, _ -> [{:headers, @ok_headers ++ [{"grpc-status", "14"}], true}] end)
    {ms, result} = execute(lease)
    assert {:error, %Error{reason: :unavailable, grpc_status: :unavailable}} = result
    assert Process.alive?(lease.worker)
    assert ms < 10_000
  end

  test "a stream the server refused with GOAWAY is :unavailable at once (safe to retry elsewhere)" do
    lease = lease(fn _, _, _ -> [{:goaway, 0, :no_error}, :hold] end)
    {ms, result} = execute(lease)
    assert {:error, %Error{reason: :unavailable, message: message}} = result
    assert message =~ "GOAWAY"
    assert ms < 10_000
  end

  test "a call whose connection drops is :worker_crashed as soon as the worker exits" do
    lease = lease(fn _, _, _ -> [{:headers, @ok_headers, false}, :close] end)
    {ms, result} = execute(lease)
    assert {:error, %Error{reason: :worker_crashed, message: message}} = result
    assert message =~ "worker 7 crashed during the call (connection closed by the server)"
    refute Process.alive?(lease.worker)
    assert ms < 10_000
  end

  test "on a worker the pool stopped on purpose, the failure has the pool's reason" do
    lease = lease(fn _, _, _ -> [{:headers, @ok_headers, false}, :close] end)
    :ets.insert(lease.fates, {lease.worker, :pool_stopped, "pool stopped"})
    {_ms, result} = execute(lease)
    assert {:error, %Error{reason: :pool_stopped, message: "pool stopped (" <> _}} = result
  end

  test "a stream's chunks, then its final value; a chunk that cannot be decoded cancels it" do
    chunk = fn fields ->
      IO.iodata_to_binary(Message.encode(Proto.encode(:tool_chunk, fields)))
    end

    lease =
      lease(fn
        1, _, _ ->
          [
            {:headers, @ok_headers, false},
            {:data, chunk.(%{data_json: "1"}) <> chunk.(%{data_json: "2"}), false},
            {:data, chunk.(%{data_json: "3", is_final: true}), false},
            {:headers, [{"grpc-status", "0"}], true}
          ]

        3, _, _ ->
          [{:headers, @ok_headers, false}, {:data, chunk.(%{data_json: "{bad"}), false}, :hold]
      end)

    me = self()
    {:ok, call} = CallEngine.start_stream(lease, "t", %{tool_name: "t"}, [])
    assert {:ok, 3} = CallEngine.run_stream(lease, call, "t", [], &send(me, {:chunk, &1}))
    assert_received {:chunk, 1}
    assert_received {:chunk, 2}
    refute_received {:chunk, 3}

    {:ok, call} = CallEngine.start_stream(lease, "t", %{tool_name: "t"}, [])

    assert {:error, %Error{reason: :invalid_response}} =
             CallEngine.next_chunk(lease, call, "t", [])

    assert :sys.get_state(lease.channel).calls == %{}
  end
end

defmodule Snakepit.CallEngineWorkerTest do
  # The same with real Python workers.
  use ExUnit.Case, async: false
  import Snakepit.PoolHelpers
  alias Snakepit.Error

  @moduletag :slow
  @moduletag timeout: 120_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit)
    :ok
  end

  test "kill -9 of a worker mid-call: :worker_crashed well under 2 s after the kill" do
    pool = start_pool!(worker_profile: :process, pool_size: 1)
    [w] = Snakepit.list_workers(pool)
    task = Task.async(fn -> Snakepit.execute(pool, "sleep", %{seconds: 10}) end)
    eventually(fn -> match?({:ok, %{in_flight: 1}}, Snakepit.get_stats(pool)) end)

    {ms, result} =
      timed(fn ->
        kill9(w.os_pid)
        Task.await(task, 5_000)
      end)

    assert {:error, %Error{reason: :worker_crashed}} = result
    assert ms < 1_000
  end

  test "a worker SIGTERMed from outside finishes its call in flight: the channel drains on the server's GOAWAY" do
    pool = start_pool!(worker_profile: :thread, pool_size: 1, threads_per_worker: 2)
    [w] = Snakepit.list_workers(pool)
    task = Task.async(fn -> Snakepit.execute(pool, "sleep", %{seconds: 1}) end)
    eventually(fn -> match?({:ok, %{in_flight: 1}}, Snakepit.get_stats(pool)) end)
    signal(w.os_pid, "TERM")

    assert {:ok, _} = Task.await(task, 10_000)
    # the worker then goes, and the pool replaces it
    eventually(fn -> match?([%{os_pid: p}] when p != w.os_pid, ready_workers(pool)) end, 20_000)
    assert {:ok, 3} = Snakepit.execute(pool, "add", %{a: 1, b: 2})
  end
end
