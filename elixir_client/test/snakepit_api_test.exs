Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.ApiTest do
  # Every public call against real Python workers (process and thread profiles).
  use ExUnit.Case, async: false
  import Snakepit.PoolHelpers
  import Bitwise
  alias Snakepit.{Error, NDArray}

  @moduletag timeout: 120_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit)
    proc = :"api_process_#{System.unique_integer([:positive])}"
    thr = :"api_thread_#{System.unique_integer([:positive])}"
    {:ok, _} = Snakepit.start_pool(name: proc, worker_profile: :process, pool_size: 2)

    {:ok, _} =
      Snakepit.start_pool(name: thr, worker_profile: :thread, pool_size: 1, threads_per_worker: 4)

    on_exit(fn ->
      Snakepit.stop_pool(proc)
      Snakepit.stop_pool(thr)
    end)

    %{pools: [proc, thr], proc: proc, thr: thr}
  end

  test "execute returns decoded results on both profiles", %{pools: pools} do
    for pool <- pools do
      assert {:ok, 5} = Snakepit.execute(pool, "add", %{a: 2, b: 3})
      assert {:ok, 2.5} = Snakepit.execute(pool, :add, %{"a" => 1.0, "b" => 1.5})

      assert {:ok, %{"message" => "hi", "pid" => pid}} =
               Snakepit.execute(pool, "ping", %{message: "hi"}, [])

      assert is_integer(pid)
    end
  end

  test "execute/3 with options and execute/2 use the default pool", %{proc: proc} do
    Application.put_env(:snakepit, :default_pool, proc)

    try do
      assert Snakepit.default_pool() == proc
      assert {:ok, 7} = Snakepit.execute("add", %{a: 3, b: 4})
      assert {:ok, 7} = Snakepit.execute(:add, %{a: 3, b: 4}, timeout: 5_000)
    after
      Application.delete_env(:snakepit, :default_pool)
    end
  end

  test "values round-trip through the Python echo tool with their types", %{pools: pools} do
    value = %{
      "int" => 3,
      "float_one" => 1.0,
      "big" => 2 ** 70,
      "neg" => -17,
      "nil" => nil,
      "bools" => [true, false],
      "text" => "héllo ✓",
      "empty" => "",
      "nested" => %{"list" => [1, [2, [3.5]]], "map" => %{"k" => "v"}},
      "bytes" => <<0, 1, 255, 128>>,
      "inf" => :infinity,
      "ninf" => :neg_infinity,
      "nan" => :nan,
      "tagged_like" => %{"__snakepit__" => "not a tag", "x" => 1},
      "array" => NDArray.from_list([[1.0, 2.0], [3.0, 4.0]], "<f8"),
      "int_array" => NDArray.from_list([1, 2, 3], "<i8")
    }

    for pool <- pools do
      assert {:ok, ^value} = Snakepit.execute(pool, "echo", value)
    end
  end

  defp random_value(0), do: random_leaf()

  defp random_value(depth) do
    case :rand.uniform(4) do
      1 ->
        for _ <- 1..:rand.uniform(4), do: random_value(depth - 1)

      2 ->
        Map.new(1..:rand.uniform(4), fn i ->
          {"k#{i}_#{:rand.uniform(99)}", random_value(depth - 1)}
        end)

      _ ->
        random_leaf()
    end
  end

  defp random_leaf do
    case :rand.uniform(9) do
      1 ->
        :rand.uniform(1 <<< 62) - (1 <<< 61)

      2 ->
        (:rand.uniform(1 <<< 100) - (1 <<< 99)) * 7

      3 ->
        (:rand.uniform() - 0.5) * :math.pow(10, :rand.uniform(40) - 20)

      4 ->
        Enum.random([0.0, 1.0, -2.0, 1.0e300, 1.0e-320, 2.2250738585072014e-308])

      5 ->
        for(
          _ <- 1..:rand.uniform(12),
          into: "",
          do: <<Enum.random([?a, ?Z, ?\n, ?", 0x2713, 0x1F40D, 0xE9])::utf8>>
        )

      6 ->
        :crypto.strong_rand_bytes(:rand.uniform(40))
        |> then(&if String.valid?(&1), do: <<255, &1::binary>>, else: &1)

      7 ->
        Enum.random([nil, true, false])

      8 ->
        Enum.random([:nan, :infinity, :neg_infinity])

      9 ->
        NDArray.from_list(
          Enum.map(1..:rand.uniform(6), fn _ -> :rand.uniform(1000) - 500 end),
          Enum.random(["<i8", "<i4", "<f8", "<f4", "|u1"])
          |> then(&if &1 == "|u1", do: "<i2", else: &1)
        )
    end
  end

  test "random value trees round-trip through the Python echo tool", %{pools: pools} do
    :rand.seed(:exsss, {1, 2, 3})

    for pool <- pools, i <- 1..60 do
      value = %{"v" => random_value(3)}
      assert {:ok, ^value} = Snakepit.execute(pool, "echo", value), "case #{i}: #{inspect(value)}"
    end
  end

  test "{:bytes, bin} sends valid UTF-8 as Python bytes", %{proc: proc} do
    assert {:ok, %{"b" => "abc"}} = Snakepit.execute(proc, "echo", %{b: {:bytes, "abc"}})

    assert {:ok, %{"b" => {:bytes, "abc"}}} =
             Snakepit.execute(proc, "echo", %{b: {:bytes, "abc"}}, bytes: :tagged)

    assert {:ok, %{"s" => "abc"}} = Snakepit.execute(proc, "echo", %{s: "abc"}, bytes: :tagged)
  end

  test "numpy array results decode to NDArray", %{thr: thr} do
    a = NDArray.from_list([[1.0, 2.0], [3.0, 4.0]])
    b = NDArray.from_list([[1.0, 0.0], [0.0, 1.0]])

    assert {:ok, %NDArray{dtype: "<f8", shape: [2, 2]} = m} =
             Snakepit.execute(thr, "matmul", %{a: a, b: b})

    assert NDArray.to_list(m) == [[1.0, 2.0], [3.0, 4.0]]

    assert {:ok, %{"mean" => 2.5, "normalized" => %NDArray{shape: [4]}}} =
             Snakepit.execute(thr, "array_stats", %{
               values: NDArray.from_list([1.0, 2.0, 3.0, 4.0])
             })
  end

  test "unknown tool is :not_found", %{pools: pools} do
    for pool <- pools do
      assert {:error, %Error{reason: :not_found, grpc_status: :not_found, message: msg}} =
               Snakepit.execute(pool, "no_such_tool", %{})

      assert msg =~ "no_such_tool"
    end
  end

  test "bad arguments are :invalid_argument naming the parameter", %{pools: pools} do
    for pool <- pools do
      assert {:error, %Error{reason: :invalid_argument, message: msg}} =
               Snakepit.execute(pool, "add", %{a: 1})

      assert msg =~ "'b'"

      assert {:error, %Error{reason: :invalid_argument, message: msg2}} =
               Snakepit.execute(pool, "add", %{a: 1, b: 2, c: 3})

      assert msg2 =~ "c"
    end
  end

  test "arguments with no wire form are :invalid_argument before any call", %{proc: proc} do
    assert {:error, %Error{reason: :invalid_argument, message: msg}} =
             Snakepit.execute(proc, "echo", %{p: self()})

    assert msg =~ "cannot encode"
  end

  test "a raising tool is :tool_error with python type and traceback", %{pools: pools} do
    for pool <- pools do
      assert {:error, %Error{} = e} =
               Snakepit.execute(pool, "fail", %{message: "boom", kind: "RuntimeError"})

      assert e.reason == :tool_error
      assert e.python_type == "RuntimeError"
      assert e.message =~ "boom"
      assert e.traceback =~ "Traceback"
      assert e.tool == "fail"
      assert Exception.message(e) =~ "RuntimeError"
    end
  end

  test "a call past its timeout is :timeout", %{thr: thr} do
    assert {:error, %Error{reason: :timeout}} =
             Snakepit.execute(thr, "sleep", %{seconds: 2}, timeout: 200)

    # the slot is released: the pool still serves
    assert {:ok, 2} = Snakepit.execute(thr, "add", %{a: 1, b: 1})
  end

  test "execute_stream with a callback delivers chunks in order and returns the final value", %{
    pools: pools
  } do
    for pool <- pools do
      parent = self()

      assert {:ok, final} =
               Snakepit.execute_stream(pool, "progress", %{steps: 3}, &send(parent, {:chunk, &1}))

      assert final == %{"completed" => 3, "cancelled" => false}

      for step <- 1..3 do
        assert_received {:chunk, %{"step" => ^step, "total" => 3}}
      end
    end
  end

  test "execute_stream without a callback is a lazy Stream", %{thr: thr} do
    stream = Snakepit.execute_stream(thr, "progress", %{steps: 4})
    assert Enum.map(stream, & &1["step"]) == [1, 2, 3, 4]
    # halting early cancels the call and frees the slot
    assert [%{"step" => 1}] =
             thr |> Snakepit.execute_stream(:progress, %{steps: 50, delay: 0.05}) |> Enum.take(1)

    eventually(fn -> Snakepit.get_stats(thr) |> elem(1) |> Map.get(:in_flight) == 0 end, 5_000)
  end

  test "a failing stream raises Snakepit.Error when enumerated", %{thr: thr} do
    assert_raise Error, ~r/not_found/, fn ->
      thr |> Snakepit.execute_stream("nope", %{}) |> Enum.to_list()
    end

    # The showcase refuses bad input with a ToolError of code INVALID_ARGUMENT (3) naming the argument.
    assert {:error, %Error{reason: :tool_error, python_type: "ToolError", message: message}} =
             Snakepit.execute_stream(thr, "progress", %{steps: -1}, fn _ -> :ok end)

    assert message =~ "steps"
  end

  test "execute_batch returns one result per item, in order", %{pools: pools} do
    for pool <- pools do
      assert {:ok, [{:ok, 3}, {:error, %Error{} = e}, {:ok, 30}]} =
               Snakepit.execute_batch(pool, "add", [%{a: 1, b: 2}, %{a: 1}, %{a: 10, b: 20}])

      assert e.reason in [:invalid_argument]
      assert e.message =~ "b"

      assert {:ok, [{:error, %Error{reason: :tool_error, python_type: "ValueError"}}]} =
               Snakepit.execute_batch(pool, "fail", [%{message: "x"}])
    end
  end

  test "sessions keep state on their worker", %{pools: pools} do
    for pool <- pools do
      sid = "sess-#{System.unique_integer([:positive])}"
      assert {:ok, 1} = Snakepit.execute_in_session(pool, sid, "session_counter", %{})
      assert {:ok, 3} = Snakepit.execute_in_session(pool, sid, "session_counter", %{increment: 2})

      assert {:ok, 4} =
               Snakepit.execute_in_session(pool, sid, :session_counter, %{}, timeout: 5_000)

      assert {:ok, %{state: %{"count" => 4}}} = Snakepit.get_session(pool, sid)
      assert {:ok, true} = Snakepit.cleanup_session(pool, sid)

      assert {:error, %Error{reason: :not_found}} =
               Snakepit.get_session(pool, "never-used-#{sid}")

      # a new session with the same id starts over
      assert {:ok, 1} = Snakepit.execute_in_session(pool, sid, "session_counter", %{})
    end
  end

  # state that is not a JSON object: the server refuses the session's InitializeSession
  @bad_session_state [1, 2]

  test "a session whose initialisation failed is initialised on its next call, after an eager stream and after a lazy one",
       %{thr: thr} do
    eager = fn sid ->
      Snakepit.execute_stream(thr, "progress", %{steps: 1}, fn _ -> :ok end,
        session_id: sid,
        session_state: @bad_session_state
      )
    end

    lazy = fn sid ->
      try do
        thr
        |> Snakepit.execute_stream("progress", %{steps: 1},
          session_id: sid,
          session_state: @bad_session_state
        )
        |> Enum.to_list()
      rescue
        e in Error -> {:error, e}
      end
    end

    for {how, run} <- [eager: eager, lazy: lazy] do
      sid = "init-fails-#{how}-#{System.unique_integer([:positive])}"
      assert {:error, %Error{reason: :session_init_failed} = e} = run.(sid), "#{how}"
      assert e.message =~ "InitializeSession #{sid}"

      # the session was not created: its next call creates it (state 0) and counts 1
      assert {:ok, 1} = Snakepit.execute_in_session(thr, sid, "session_counter", %{}), "#{how}"
      assert {:ok, true} = Snakepit.cleanup_session(thr, sid)
    end
  end

  test "concurrent calls of a new session all run on its worker, none before it is created", %{
    thr: thr,
    proc: proc
  } do
    for pool <- [thr, proc] do
      sid = "pinned-#{System.unique_integer([:positive])}"

      pids =
        1..8
        |> Enum.map(fn _ ->
          Task.async(fn -> Snakepit.execute_in_session(pool, sid, "ping", %{}) end)
        end)
        |> Task.await_many(20_000)
        |> Enum.map(fn {:ok, %{"pid" => pid}} -> pid end)

      assert [_one] = Enum.uniq(pids)
    end
  end

  test "execute_in_session on the default pool", %{thr: thr} do
    Application.put_env(:snakepit, :default_pool, thr)

    try do
      assert {:ok, 1} = Snakepit.execute_in_session("default-sess", "session_counter", %{})
      assert {:ok, 2} = Snakepit.execute_in_session("default-sess", "session_counter", %{}, [])
    after
      Application.delete_env(:snakepit, :default_pool)
    end
  end

  test "get_stats has pool counters and each worker's GetStats", %{thr: thr, proc: proc} do
    {:ok, _} = Snakepit.execute(thr, "add", %{a: 1, b: 1})
    {:error, _} = Snakepit.execute(thr, "no_such_tool", %{})
    assert {:ok, stats} = Snakepit.get_stats(thr)
    assert stats.calls >= 2
    assert stats.failures >= 1
    assert stats.queued == 0
    assert stats.recycles == 0
    assert stats.capacity == 4
    assert [w] = stats.workers
    assert w.in_flight == 0
    assert w.python.worker_mode == "threaded"
    assert w.python.max_workers >= 4
    assert w.python.requests_total >= 1
    assert w.python.pid == w.os_pid

    # two process workers, each given two calls at once (process_pipeline_depth)
    assert {:ok, %{workers: [p1, p2], capacity: 4}} = Snakepit.get_stats(proc)
    assert p1.python.worker_mode == "process" and p2.python.worker_mode == "process"
  end

  test "list_workers describes each worker", %{proc: proc} do
    workers = Snakepit.list_workers(proc)
    assert length(workers) == 2

    for w <- workers do
      assert w.status == :ready
      assert is_integer(w.os_pid) and os_alive?(w.os_pid)
      assert w.capacity == 2
      assert is_binary(w.uds) and w.port == nil
    end
  end

  test "unknown pool is :pool_not_found" do
    assert {:error, %Error{reason: :pool_not_found}} =
             Snakepit.execute(:no_such_pool, "ping", %{})
  end
end
