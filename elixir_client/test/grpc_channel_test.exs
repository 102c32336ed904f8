defmodule Snakepit.GRPC.ChannelTest do
  # Runs against test/support/bridge_test_server.py (grpcio) on 127.0.0.1.
  use ExUnit.Case, async: false

  alias Snakepit.GRPC.{Channel, Error}
  alias Snakepit.Proto

  @svc "/snakepit.bridge.BridgeService/"

  setup_all do
    server = Snakepit.TestServer.start()
    on_exit(fn -> Snakepit.TestServer.stop(server) end)
    %{server: server}
  end

  setup %{server: server} do
    {:ok, channel} =
      Channel.start_link(
        host: "127.0.0.1",
        port: server.port,
        metadata: [{"authorization", "Bearer x"}]
      )

    on_exit(fn -> Channel.close(channel) end)
    %{channel: channel}
  end

  defp tool(channel, name, args, opts \\ []) do
    request =
      Proto.encode(
        :execute_tool_request,
        %{tool_name: name, args_json: :jiffy.encode(args)}
        |> Map.merge(Map.new(opts[:fields] || []))
      )

    case Channel.unary(channel, @svc <> "ExecuteTool", request, Keyword.delete(opts, :fields)) do
      {:ok, bytes, trailers} ->
        {:ok, response} = Proto.decode(:execute_tool_response, bytes)
        {:ok, response, trailers}

      error ->
        error
    end
  end

  defp result(response), do: :jiffy.decode(response.result_json, [:return_maps])

  # Whether the server saw the call with this request id end before its handler finished.
  defp cancelled?(channel, request_id) do
    {:ok, response, _} = tool(channel, "was_cancelled", %{"request_id" => request_id})
    result(response)
  end

  defp request_id, do: "req-#{System.unique_integer([:positive])}"

  defp collect(ref, acc \\ []) do
    receive do
      {:snakepit_grpc, ^ref, {:message, bytes}} -> collect(ref, [bytes | acc])
      {:snakepit_grpc, ^ref, {:done, _trailers}} -> {:done, Enum.reverse(acc)}
      {:snakepit_grpc, ^ref, {:error, error}} -> {:error, Enum.reverse(acc), error}
    after
      10_000 -> flunk("stream did not finish")
    end
  end

  defp wait_until(fun, deadline_ms \\ 3000) do
    deadline = System.monotonic_time(:millisecond) + deadline_ms

    Stream.repeatedly(fn ->
      if fun.(),
        do: true,
        else:
          (
            Process.sleep(20)
            System.monotonic_time(:millisecond) > deadline && :timeout
          )
    end)
    |> Enum.find(& &1)
  end

  test "unary Ping round trip", %{channel: channel, server: server} do
    request = Proto.encode(:ping_request, %{message: "hello"})
    assert {:ok, bytes, trailers} = Channel.unary(channel, @svc <> "Ping", request)

    assert {:ok, %{message: "hello", pid: pid, worker_mode: "test"}} =
             Proto.decode(:ping_response, bytes)

    assert pid == server.os_pid
    assert {"grpc-status", "0"} in trailers
  end

  test "channel and call metadata reach the server; -bin values are base64-coded", %{
    channel: channel
  } do
    opts = [metadata: [{"x-call", "one"}, {"x-data-bin", <<0, 1, 2, 255>>}]]
    assert {:ok, response, _} = tool(channel, "metadata", %{}, opts)
    md = result(response)
    assert md["authorization"] == "Bearer x"
    assert md["x-call"] == "one"
    assert md["x-data-bin"] == "000102ff"
  end

  test "the timeout is sent as grpc-timeout", %{channel: channel} do
    assert {:ok, response, _} = tool(channel, "time_remaining", %{}, timeout: 5000)
    remaining = result(response)
    assert remaining > 3.0 and remaining <= 5.0
  end

  test "blobs and a request id survive the round trip", %{channel: channel} do
    blobs = [<<>>, <<0, 255>>, :crypto.strong_rand_bytes(1000)]

    assert {:ok, response, _} =
             tool(channel, "echo", %{"a" => 1}, fields: [blobs: blobs, request_id: "r-1"])

    assert response.blobs == blobs
    assert response.request_id == "r-1"
    assert result(response) == %{"a" => 1}
  end

  describe "errors" do
    test "status, percent-decoded message and binary trailers", %{channel: channel} do
      message = "bad thing: 100% ünïcode\nline2"

      assert {:error, %Error{} = error} =
               tool(channel, "fail", %{"code" => 5, "message" => message})

      assert error.status == :not_found
      assert error.code == 5
      assert error.message == message
      assert {"x-plain", "plain-value"} in error.trailers
      {_, bin} = List.keyfind(error.trailers, "snakepit-error-bin", 0)

      assert {:ok, %{type: "ValueError", message: ^message, code: 5, tool_name: "fail"}} =
               Proto.decode(:tool_error, bin)
    end

    test "an unknown method is UNIMPLEMENTED (a Trailers-Only response)", %{channel: channel} do
      assert {:error, %Error{status: :unimplemented, code: 12}} =
               Channel.unary(channel, @svc <> "Nope", "")
    end

    test "every status code the server can raise maps to its atom", %{channel: channel} do
      for {atom, code} <- Snakepit.GRPC.Status.all(), code != 0 do
        assert {:error, %Error{status: ^atom, code: ^code}} =
                 tool(channel, "fail", %{"code" => code})
      end
    end
  end

  describe "deadlines and cancellation" do
    test "a call past its deadline fails with DEADLINE_EXCEEDED, locally and promptly", %{
      channel: channel
    } do
      started = System.monotonic_time(:millisecond)

      assert {:error, %Error{status: :deadline_exceeded}} =
               tool(channel, "sleep", %{"ms" => 3000}, timeout: 200)

      elapsed = System.monotonic_time(:millisecond) - started
      assert elapsed >= 200 and elapsed < 1500
      # The channel is still usable.
      assert {:ok, _, _} = tool(channel, "echo", %{})
    end

    test "a caller that dies mid-call gets its stream cancelled on the server", %{
      channel: channel
    } do
      id = request_id()

      caller =
        spawn(fn ->
          tool(channel, "sleep", %{"ms" => 5000}, timeout: 20_000, fields: [request_id: id])
        end)

      Process.sleep(200)
      refute cancelled?(channel, id)
      Process.exit(caller, :kill)
      assert wait_until(fn -> cancelled?(channel, id) end) == true
    end

    test "a call that completes is not seen as cancelled (control)", %{channel: channel} do
      id = request_id()
      assert {:ok, _, _} = tool(channel, "sleep", %{"ms" => 10}, fields: [request_id: id])
      Process.sleep(100)
      refute cancelled?(channel, id)
    end

    test "cancel/2 stops a server stream and no more messages arrive", %{channel: channel} do
      id = request_id()

      request =
        Proto.encode(:execute_tool_request, %{
          tool_name: "count",
          args_json: ~s({"n": 1000, "delay_ms": 20}),
          request_id: id
        })

      assert {:ok, ref} = Channel.server_stream(channel, @svc <> "ExecuteStreamingTool", request)
      assert_receive {:snakepit_grpc, ^ref, {:message, _}}, 5000
      assert :ok = Channel.cancel(channel, ref)
      refute_receive {:snakepit_grpc, ^ref, _}, 300
      assert wait_until(fn -> cancelled?(channel, id) end) == true
    end

    test "a server stream's deadline covers the whole stream", %{channel: channel} do
      request =
        Proto.encode(:execute_tool_request, %{
          tool_name: "count",
          args_json: ~s({"n": 1000, "delay_ms": 20})
        })

      assert {:ok, ref} =
               Channel.server_stream(channel, @svc <> "ExecuteStreamingTool", request,
                 timeout: 300
               )

      assert {:error, messages, %Error{status: :deadline_exceeded}} = collect(ref)
      assert length(messages) > 0
    end
  end

  describe "server streaming" do
    test "N chunks then the final one, in order, then :done", %{channel: channel} do
      request =
        Proto.encode(:execute_tool_request, %{tool_name: "count", args_json: ~s({"n": 25})})

      assert {:ok, ref} = Channel.server_stream(channel, @svc <> "ExecuteStreamingTool", request)
      assert {:done, messages} = collect(ref)

      chunks =
        Enum.map(messages, fn m ->
          {:ok, c} = Proto.decode(:tool_chunk, m)
          c
        end)

      assert Enum.map(chunks, & &1.sequence) == Enum.to_list(0..25)
      assert List.last(chunks).is_final
      refute Enum.any?(Enum.drop(chunks, -1), & &1.is_final)
    end

    test "an error mid-stream arrives after the messages before it", %{channel: channel} do
      request =
        Proto.encode(:execute_tool_request, %{
          tool_name: "fail_midway",
          args_json: ~s({"n": 5, "fail_at": 2})
        })

      assert {:ok, ref} = Channel.server_stream(channel, @svc <> "ExecuteStreamingTool", request)
      assert {:error, messages, %Error{status: :internal, message: "failed at 2"}} = collect(ref)
      assert length(messages) == 2
    end

    test "a long stream of large messages does not stall on flow control", %{channel: channel} do
      request =
        Proto.encode(:execute_tool_request, %{
          tool_name: "count",
          args_json: ~s({"n": 200, "size": 100000})
        })

      assert {:ok, ref} =
               Channel.server_stream(channel, @svc <> "ExecuteStreamingTool", request,
                 timeout: 20_000
               )

      assert {:done, messages} = collect(ref)
      assert length(messages) == 201
    end
  end

  describe "server streams with a window (backpressure)" do
    defp count_request(args),
      do:
        Proto.encode(:execute_tool_request, %{tool_name: "count", args_json: :jiffy.encode(args)})

    # Takes the stream's messages, acknowledging each one.
    defp collect_acking(channel, ref, acc \\ []) do
      receive do
        {:snakepit_grpc, ^ref, {:message, bytes}} ->
          Channel.ack(channel, ref)
          collect_acking(channel, ref, [bytes | acc])

        {:snakepit_grpc, ^ref, {:done, _trailers}} ->
          {:done, Enum.reverse(acc)}

        {:snakepit_grpc, ^ref, {:error, error}} ->
          {:error, Enum.reverse(acc), error}
      after
        10_000 -> flunk("stream did not finish")
      end
    end

    defp stream_id(channel, ref), do: :sys.get_state(channel).calls[ref].sid

    defp server_credit(channel, ref),
      do:
        Snakepit.HTTP2.Conn.receive_window(:sys.get_state(channel).conn, stream_id(channel, ref))

    test "the server is held after a window of unacknowledged messages, and resumes on ack/3", %{
      channel: channel
    } do
      request = count_request(%{"n" => 500, "size" => 10_000})

      assert {:ok, ref} =
               Channel.server_stream(channel, @svc <> "ExecuteStreamingTool", request,
                 window: 100_000
               )

      # The server used up the window: less than one more message fits.
      assert wait_until(fn -> server_credit(channel, ref) < 10_000 end) == true
      {:messages, messages} = Process.info(self(), :messages)
      held = Enum.count(messages, &match?({:snakepit_grpc, ^ref, {:message, _}}, &1))
      assert held in 9..10

      # Acknowledgements for other calls change nothing, and the connection keeps serving calls.
      Channel.ack(channel, make_ref())
      assert {:ok, _, _} = tool(channel, "echo", %{})
      assert server_credit(channel, ref) < 10_000

      assert {:done, messages} = collect_acking(channel, ref)
      assert length(messages) == 501
    end

    test "a message larger than the window arrives without acknowledgements", %{
      channel: channel
    } do
      request = count_request(%{"n" => 3, "size" => 300_000})

      assert {:ok, ref} =
               Channel.server_stream(channel, @svc <> "ExecuteStreamingTool", request,
                 window: 65_535
               )

      assert_receive {:snakepit_grpc, ^ref, {:message, first}}, 5_000
      assert byte_size(first) > 300_000
      Channel.ack(channel, ref)
      assert {:done, rest} = collect_acking(channel, ref)
      assert length(rest) == 3
    end
  end

  describe "flow control with large messages" do
    test "a 5 MiB response", %{channel: channel} do
      size = 5 * 1024 * 1024
      assert {:ok, response, _} = tool(channel, "big", %{"size" => size}, timeout: 20_000)
      assert [blob] = response.blobs
      assert byte_size(blob) == size

      assert blob ==
               binary_part(
                 :binary.copy(:binary.list_to_bin(Enum.to_list(0..255)), div(size, 256) + 1),
                 0,
                 size
               )
    end

    test "a 3 MiB request", %{channel: channel} do
      blob = :crypto.strong_rand_bytes(3 * 1024 * 1024)

      assert {:ok, response, _} =
               tool(channel, "digest", %{}, fields: [blobs: [blob, "x"]], timeout: 20_000)

      digest = Base.encode16(:crypto.hash(:sha256, blob), case: :lower)

      assert result(response) == [
               [byte_size(blob), digest],
               [1, Base.encode16(:crypto.hash(:sha256, "x"), case: :lower)]
             ]
    end

    test "large requests and responses concurrently", %{channel: channel} do
      tasks =
        for i <- 1..6 do
          Task.async(fn ->
            blob = :crypto.strong_rand_bytes(1_500_000 + i)

            {:ok, response, _} =
              tool(channel, "echo", %{"i" => i}, fields: [blobs: [blob]], timeout: 30_000)

            response.blobs == [blob] and result(response) == %{"i" => i}
          end)
        end

      assert Task.await_many(tasks, 40_000) |> Enum.all?()
    end
  end

  @tag :bench
  @tag timeout: 300_000
  test "throughput (mix test --only bench)", %{channel: channel} do
    ping = Proto.encode(:ping_request, %{message: "x"})
    for _ <- 1..200, do: {:ok, _, _} = Channel.unary(channel, @svc <> "Ping", ping)

    {us, _} =
      :timer.tc(fn ->
        for _ <- 1..2000, do: {:ok, _, _} = Channel.unary(channel, @svc <> "Ping", ping)
      end)

    IO.puts("\nsequential Ping: #{Float.round(us / 2000, 1)} us/call")

    {us, _} =
      :timer.tc(fn ->
        1..5000
        |> Task.async_stream(
          fn _ -> {:ok, _, _} = Channel.unary(channel, @svc <> "Ping", ping) end,
          max_concurrency: 50
        )
        |> Stream.run()
      end)

    IO.puts("Ping with 50 concurrent callers: #{round(5000 / (us / 1_000_000))} calls/s")

    {us, _} =
      :timer.tc(fn ->
        for _ <- 1..5,
            do: {:ok, _, _} = tool(channel, "big", %{"size" => 20_000_000}, timeout: 60_000)
      end)

    IO.puts("20 MB responses: #{round(100 / (us / 1_000_000))} MB/s")

    blob = :crypto.strong_rand_bytes(20_000_000)

    {us, _} =
      :timer.tc(fn ->
        for _ <- 1..5,
            do:
              {:ok, _, _} = tool(channel, "digest", %{}, fields: [blobs: [blob]], timeout: 60_000)
      end)

    IO.puts("20 MB requests: #{round(100 / (us / 1_000_000))} MB/s")
  end

  test "100 concurrent callers over one channel", %{channel: channel} do
    results =
      1..100
      |> Task.async_stream(
        fn i ->
          payload = :crypto.strong_rand_bytes(rem(i * 997, 20_000))

          {:ok, response, _} =
            tool(channel, if(rem(i, 10) == 0, do: "sleep", else: "echo"), %{"i" => i, "ms" => 50},
              fields: [blobs: [payload]]
            )

          if rem(i, 10) == 0,
            do: response.result_json == ~s("slept"),
            else: response.blobs == [payload] and result(response)["i"] == i
        end,
        max_concurrency: 100,
        timeout: 30_000
      )
      |> Enum.map(fn {:ok, ok?} -> ok? end)

    assert length(results) == 100
    assert Enum.all?(results)
  end

  describe "connection lifecycle" do
    test "a refused connection returns {:error, reason} without killing the caller" do
      {:ok, listen} = :gen_tcp.listen(0, ip: {127, 0, 0, 1})
      {:ok, port} = :inet.port(listen)
      :gen_tcp.close(listen)
      assert {:error, :econnrefused} = Channel.start_link(host: "127.0.0.1", port: port)
      assert Process.alive?(self())
    end

    test "close/1 fails open calls and stops the channel", %{server: server} do
      {:ok, channel} = Channel.start_link(host: "127.0.0.1", port: server.port)
      ref = Process.monitor(channel)
      task = Task.async(fn -> tool(channel, "sleep", %{"ms" => 3000}) end)
      Process.sleep(100)
      assert :ok = Channel.close(channel)
      assert {:error, %Error{status: :unavailable, message: "channel closed"}} = Task.await(task)
      assert_receive {:DOWN, ^ref, :process, ^channel, :normal}
      assert {:error, %Error{status: :unavailable}} = tool(channel, "echo", %{})
      assert :ok = Channel.close(channel)
    end

    test "when the server goes away, open calls fail UNAVAILABLE and the channel stops" do
      Process.flag(:trap_exit, true)
      server = Snakepit.TestServer.start()
      {:ok, channel} = Channel.start_link(host: "127.0.0.1", port: server.port)
      task = Task.async(fn -> tool(channel, "sleep", %{"ms" => 5000}) end)

      {:ok, ref} =
        Channel.server_stream(
          channel,
          @svc <> "ExecuteStreamingTool",
          Proto.encode(:execute_tool_request, %{
            tool_name: "count",
            args_json: ~s({"n": 1000, "delay_ms": 50})
          })
        )

      Process.sleep(200)
      System.cmd("kill", ["-KILL", to_string(server.os_pid)])

      assert {:error, %Error{status: :unavailable, message: message}} = Task.await(task, 5000)
      assert message =~ "closed"
      assert {:error, _, %Error{status: :unavailable}} = collect(ref)
      assert_receive {:EXIT, ^channel, {:shutdown, _}}, 5000
      Snakepit.TestServer.stop(server)
    end

    test "works over a Unix domain socket" do
      path =
        Path.join(
          System.tmp_dir!(),
          "snakepit_grpc_test_#{System.unique_integer([:positive])}.sock"
        )

      server = Snakepit.TestServer.start(["--unix", path])

      try do
        {:ok, channel} = Channel.start_link(host: {:local, path})

        assert {:ok, bytes, _} =
                 Channel.unary(
                   channel,
                   @svc <> "Ping",
                   Proto.encode(:ping_request, %{message: "unix"})
                 )

        assert {:ok, %{message: "unix"}} = Proto.decode(:ping_response, bytes)
        Channel.close(channel)
      after
        Snakepit.TestServer.stop(server)
        File.rm(path)
      end
    end
  end
end

defmodule Snakepit.GRPC.ChannelFailureTest do
  # HTTP-level failures a grpcio server never produces, from a scripted HTTP/2 server.
  use ExUnit.Case, async: true

  alias Snakepit.FakeH2Server
  alias Snakepit.GRPC.{Channel, Error, Message}

  @ok_headers [{":status", "200"}, {"content-type", "application/grpc"}]

  defp call(handler, opts \\ []) do
    port = FakeH2Server.start(handler)
    {:ok, channel} = Channel.start_link(host: "127.0.0.1", port: port)
    Channel.unary(channel, "/svc/Method", "request", opts)
  end

  defp framed(message), do: IO.iodata_to_binary(Message.encode(message))

  test "a normal response: headers, one message, trailers; the request arrives framed" do
    me = self()

    handler = fn _sid, headers, body ->
      send(me, {:request, headers, body})

      [
        {:headers, @ok_headers, false},
        {:data, framed("reply"), false},
        {:headers, [{"grpc-status", "0"}, {"x-t", "1"}], true}
      ]
    end

    assert {:ok, "reply", trailers} = call(handler)
    assert {"x-t", "1"} in trailers
    assert_receive {:request, headers, body}
    assert body == framed("request")
    assert {":method", "POST"} in headers
    assert {":path", "/svc/Method"} in headers
    assert {"te", "trailers"} in headers
    assert {"content-type", "application/grpc"} in headers
    assert {"grpc-timeout", "30000m"} in headers
  end

  test "a message split over many DATA frames, several messages in one frame" do
    big = :crypto.strong_rand_bytes(50_000)
    <<a::binary-size(7), b::binary-size(30_000), c::binary>> = framed(big)

    handler = fn _, _, _ ->
      [
        {:headers, @ok_headers, false},
        {:data, a, false},
        {:data, b, false},
        {:data, c, false},
        {:headers, [{"grpc-status", "0"}], true}
      ]
    end

    assert {:ok, ^big, _} = call(handler)

    two = fn _, _, _ ->
      [
        {:headers, @ok_headers, false},
        {:data, framed("a") <> framed("b"), false},
        {:headers, [{"grpc-status", "0"}], true}
      ]
    end

    assert {:error,
            %Error{status: :internal, message: "unary response carried 2 messages, expected 1"}} =
             call(two)
  end

  test "non-200 HTTP status maps to a gRPC status with a clear message" do
    for {http, status} <- [
          {503, :unavailable},
          {404, :unimplemented},
          {401, :unauthenticated},
          {500, :unknown},
          {400, :internal}
        ] do
      handler = fn _, _, _ ->
        [
          {:headers, [{":status", "#{http}"}, {"content-type", "text/plain"}], false},
          {:data, "oops", true}
        ]
      end

      assert {:error, %Error{status: ^status, message: message}} = call(handler)
      assert message =~ "HTTP status #{http}"
    end
  end

  test "missing grpc-status, missing trailers, non-gRPC content type" do
    no_status = fn _, _, _ ->
      [
        {:headers, @ok_headers, false},
        {:data, framed("x"), false},
        {:headers, [{"x", "y"}], true}
      ]
    end

    assert {:error, %Error{status: :internal, message: "response has no grpc-status"}} =
             call(no_status)

    no_trailers = fn _, _, _ -> [{:headers, @ok_headers, false}, {:data, framed("x"), true}] end
    assert {:error, %Error{status: :internal, message: message}} = call(no_trailers)
    assert message =~ "without trailers"

    html = fn _, _, _ ->
      [
        {:headers, [{":status", "200"}, {"content-type", "text/html"}], false},
        {:data, "<html>", true}
      ]
    end

    assert {:error, %Error{status: :unknown, message: message}} = call(html)
    assert message =~ "content-type"
  end

  test "Trailers-Only error with a percent-encoded message and a -bin trailer" do
    handler = fn _, _, _ ->
      [
        {:headers,
         @ok_headers ++
           [
             {"grpc-status", "3"},
             {"grpc-message", "bad %E2%9C%93 arg%"},
             {"d-bin", Base.encode64(<<1, 2, 3>>, padding: false)}
           ], true}
      ]
    end

    assert {:error,
            %Error{status: :invalid_argument, code: 3, message: "bad ✓ arg%", trailers: trailers}} =
             call(handler)

    assert {"d-bin", <<1, 2, 3>>} in trailers
  end

  test "compressed messages, truncated messages and resets" do
    compressed = fn _, _, _ ->
      [
        {:headers, @ok_headers, false},
        {:data, <<1, 0, 0, 0, 1, 0>>, false},
        {:headers, [{"grpc-status", "0"}], true}
      ]
    end

    assert {:error, %Error{status: :internal, message: message}} = call(compressed)
    assert message =~ "compressed"

    truncated = fn _, _, _ ->
      [
        {:headers, @ok_headers, false},
        {:data, <<0, 0, 0, 0, 9, 1>>, false},
        {:headers, [{"grpc-status", "0"}], true}
      ]
    end

    assert {:error, %Error{status: :internal}} = call(truncated)

    reset = fn _, _, _ -> [{:headers, @ok_headers, false}, {:rst, :cancel}] end
    assert {:error, %Error{status: :cancelled}} = call(reset)

    refused = fn _, _, _ -> [{:rst, :refused_stream}] end
    assert {:error, %Error{status: :unavailable}} = call(refused)
  end

  test "GOAWAY: a stream above last_stream_id fails UNAVAILABLE at once, and the idle channel stops" do
    Process.flag(:trap_exit, true)
    port = FakeH2Server.start(fn _, _, _ -> [{:goaway, 0, :no_error}, :hold] end)
    {:ok, channel} = Channel.start_link(host: "127.0.0.1", port: port)

    assert {:error, %Error{status: :unavailable, message: message}} =
             Channel.unary(channel, "/svc/M", "x")

    assert message =~ "GOAWAY"
    assert message =~ "without processing this call"
    assert_receive {:EXIT, ^channel, {:shutdown, {:goaway, :no_error}}}, 2000
  end

  describe "GOAWAY drain" do
    @trailers_ok [{"grpc-status", "0"}]

    test "a call open when GOAWAY arrives still completes; a call after fails fast with UNAVAILABLE; the owner is told; the channel stops after the last call" do
      Process.flag(:trap_exit, true)
      me = self()

      handler = fn 1, _, _ ->
        [
          {:headers, @ok_headers, false},
          {:goaway, 1, :no_error},
          {:run,
           fn ->
             send(me, {:goaway_sent, self()})
             receive do: (:finish -> :ok)
           end},
          {:data, framed("finished"), false},
          {:headers, @trailers_ok, true}
        ]
      end

      {:ok, channel} = Channel.start_link(host: "127.0.0.1", port: FakeH2Server.start(handler))
      open = Task.async(fn -> Channel.unary(channel, "/svc/M", "long", timeout: 10_000) end)
      assert_receive {:goaway_sent, server}, 5_000
      assert_receive {:snakepit_grpc_draining, ^channel, {:goaway, :no_error}}, 2_000
      assert Channel.connection_state(channel) == :draining

      {ms, refused} = timed(fn -> Channel.unary(channel, "/svc/M", "late", timeout: 10_000) end)
      assert {:error, %Error{status: :unavailable, message: message}} = refused
      assert message =~ "GOAWAY"
      assert ms < 500
      assert {:error, %Error{status: :unavailable}} = Channel.start_call(channel, "/svc/M", "x")

      # the open call was not failed: it ends as the server finishes it, and the channel with it
      refute_received {:EXIT, ^channel, _}
      send(server, :finish)
      assert {:ok, "finished", _trailers} = Task.await(open)
      assert_receive {:EXIT, ^channel, {:shutdown, {:goaway, :no_error}}}, 2_000
    end

    test "a stream above last_stream_id fails with UNAVAILABLE while the one below it completes" do
      Process.flag(:trap_exit, true)
      me = self()

      handler = fn
        1, _, _ ->
          send(me, :first_open)
          [:hold]

        3, _, _ ->
          [
            {:goaway, 1, :no_error},
            {:stream, 1,
             [
               {:headers, @ok_headers, false},
               {:data, framed("first"), false},
               {:headers, @trailers_ok, true}
             ]}
          ]
      end

      {:ok, channel} = Channel.start_link(host: "127.0.0.1", port: FakeH2Server.start(handler))
      first = Task.async(fn -> Channel.unary(channel, "/svc/M", "a", timeout: 10_000) end)
      assert_receive :first_open, 5_000
      second = Task.async(fn -> Channel.unary(channel, "/svc/M", "b", timeout: 10_000) end)

      assert {:error, %Error{status: :unavailable, message: message}} = Task.await(second)
      assert message =~ "without processing this call (stream 3 > last stream id 1)"
      assert {:ok, "first", _} = Task.await(first)
      assert_receive {:EXIT, ^channel, {:shutdown, {:goaway, :no_error}}}, 2_000
    end

    test "calls still open at the drain timeout fail with UNAVAILABLE and the channel stops" do
      Process.flag(:trap_exit, true)
      handler = fn _, _, _ -> [{:headers, @ok_headers, false}, {:goaway, 1, :no_error}, :hold] end
      port = FakeH2Server.start(handler)
      {:ok, channel} = Channel.start_link(host: "127.0.0.1", port: port, drain_timeout: 200)

      assert {:error, %Error{status: :unavailable, message: message}} =
               Channel.unary(channel, "/svc/M", "x", timeout: 10_000)

      assert message =~ "drain timeout (200 ms)"
      assert_receive {:EXIT, ^channel, {:shutdown, {:goaway, :no_error}}}, 2_000
    end
  end

  defp timed(fun) do
    t0 = System.monotonic_time(:millisecond)
    result = fun.()
    {System.monotonic_time(:millisecond) - t0, result}
  end

  test "a dropped connection fails open calls with UNAVAILABLE" do
    Process.flag(:trap_exit, true)
    port = FakeH2Server.start(fn _, _, _ -> [{:headers, @ok_headers, false}, :close] end)
    {:ok, channel} = Channel.start_link(host: "127.0.0.1", port: port)

    assert {:error, %Error{status: :unavailable, message: "connection closed by the server"}} =
             Channel.unary(channel, "/svc/M", "x")

    assert_receive {:EXIT, ^channel, {:shutdown, :closed}}, 2000
  end

  test "calls beyond the server's MAX_CONCURRENT_STREAMS wait in order, with their deadlines running" do
    me = self()

    handler = fn sid, _headers, body ->
      send(me, {:opened, sid, body})
      # The "hold" call never gets an answer: it keeps the only slot until its deadline.
      if body == IO.iodata_to_binary(Message.encode("hold")),
        do: [:hold],
        else: [
          {:headers, @ok_headers, false},
          {:data, body, false},
          {:headers, [{"grpc-status", "0"}], true}
        ]
    end

    port = FakeH2Server.start(handler, max_concurrent_streams: 1)
    {:ok, channel} = Channel.start_link(host: "127.0.0.1", port: port)
    # The first call also lets the server's SETTINGS arrive before the rest.
    assert {:ok, _, _} = Channel.unary(channel, "/svc/M", "warmup")
    assert_receive {:opened, 1, _}

    holder = Task.async(fn -> Channel.unary(channel, "/svc/M", "hold", timeout: 500) end)
    assert_receive {:opened, 3, _}

    # Started one after another so their arrival order at the channel is known.
    waiters =
      for i <- 1..5 do
        task = Task.async(fn -> Channel.unary(channel, "/svc/M", "w#{i}", timeout: 5000) end)
        Process.sleep(20)
        task
      end

    # One that gives up while queued.
    quitter = Task.async(fn -> Channel.unary(channel, "/svc/M", "quit", timeout: 100) end)

    assert {:error, %Error{status: :deadline_exceeded}} = Task.await(quitter)
    refute_received {:opened, _, _}
    assert {:error, %Error{status: :deadline_exceeded}} = Task.await(holder)

    for {task, i} <- Enum.with_index(waiters, 1) do
      expected = "w#{i}"
      assert {:ok, ^expected, _} = Task.await(task)
    end

    opened = for _ <- 1..5, do: assert_receive({:opened, _sid, body}) && body
    assert opened == Enum.map(1..5, &IO.iodata_to_binary(Message.encode("w#{&1}")))
    refute_received {:opened, _, _}
    Channel.close(channel)
  end

  test "a local deadline on a server that never answers" do
    port = FakeH2Server.start(fn _, _, _ -> [:hold] end)
    {:ok, channel} = Channel.start_link(host: "127.0.0.1", port: port)

    assert {:error, %Error{status: :deadline_exceeded}} =
             Channel.unary(channel, "/svc/M", "x", timeout: 100)

    assert {:error, %Error{status: :deadline_exceeded}} =
             Channel.unary(channel, "/svc/M", "x", timeout: 0)

    Channel.close(channel)
  end
end

defmodule Snakepit.GRPC.MetadataTest do
  use ExUnit.Case, async: true

  alias Snakepit.GRPC.{Message, Metadata, Status}

  test "grpc-timeout encoding keeps at most 8 digits and never shortens the deadline" do
    assert Metadata.encode_timeout(0) == "0m"
    assert Metadata.encode_timeout(30_000) == "30000m"
    assert Metadata.encode_timeout(99_999_999) == "99999999m"
    assert Metadata.encode_timeout(100_000_000) == "100000S"
    assert Metadata.encode_timeout(100_000_001) == "100001S"

    for ms <- [0, 1, 999, 99_999_999, 100_000_000, 123_456_789_012, 10_000_000_000_000] do
      value = Metadata.encode_timeout(ms)
      assert byte_size(value) <= 9
      assert {:ok, decoded} = Metadata.decode_timeout(value)
      assert decoded >= ms
    end
  end

  test "grpc-message percent coding" do
    assert Metadata.decode_message("a%20b%25c%E2%9C%93") == "a b%c✓"
    assert Metadata.decode_message("50%") == "50%"
    assert Metadata.decode_message("%zz%4") == "%zz%4"
    assert Metadata.encode_message("a%b ✓\n") == "a%25b %E2%9C%93%0A"
    assert Metadata.decode_message(Metadata.encode_message("ünïcode 100%")) == "ünïcode 100%"
  end

  test "-bin metadata is base64, padded or not" do
    assert Metadata.decode_metadata([
             {"a-bin", "AQID"},
             {"b-bin", "AQ=="},
             {"c-bin", "AQ"},
             {"plain", "AQ"}
           ]) ==
             [{"a-bin", <<1, 2, 3>>}, {"b-bin", <<1>>}, {"c-bin", <<1>>}, {"plain", "AQ"}]

    assert Metadata.encode_metadata([{"X-Key-bin", <<1>>}, {"k", "v"}]) == [
             {"x-key-bin", "AQ"},
             {"k", "v"}
           ]
  end

  test "message framing" do
    assert IO.iodata_to_binary(Message.encode("abc")) == <<0, 0, 0, 0, 3, "abc">>
    assert {:ok, ["abc", ""], <<0, 0>>} = Message.decode(<<0, 3::32, "abc", 0, 0::32, 0, 0>>)
    assert {:error, :compressed} = Message.decode(<<1, 3::32, "abc">>)
    assert {:error, {:too_large, 100}} = Message.decode(<<0, 100::32>>, 10)
  end

  test "the incremental decoder gives the same messages for any split of the input" do
    messages = [
      <<>>,
      "a",
      :crypto.strong_rand_bytes(70_000),
      "bc",
      :crypto.strong_rand_bytes(300)
    ]

    stream = IO.iodata_to_binary(Enum.map(messages, &Message.encode/1))

    for split <- [1, 2, 5, 7, 4096, 16_384, byte_size(stream)] do
      pieces = for <<piece::binary-size(split) <- stream>>, do: piece

      tail =
        binary_part(stream, length(pieces) * split, byte_size(stream) - length(pieces) * split)

      {got, decoder} =
        Enum.reduce(pieces ++ [tail], {[], Message.new_decoder()}, fn piece, {acc, dec} ->
          {:ok, out, dec} = Message.feed(dec, piece)
          {acc ++ out, dec}
        end)

      assert got == messages, "split #{split}"
      assert Message.buffered(decoder) == 0
    end

    # A big message in many small pieces is joined once (this was quadratic once: minutes, not ms).
    big = IO.iodata_to_binary(Message.encode(:binary.copy(<<1>>, 32 * 1024 * 1024)))
    pieces = for <<piece::binary-size(16_384) <- big>>, do: piece
    rest = binary_part(big, length(pieces) * 16_384, byte_size(big) - length(pieces) * 16_384)

    {micros, {[message], _}} =
      :timer.tc(fn ->
        Enum.reduce(pieces ++ [rest], {[], Message.new_decoder()}, fn piece, {acc, dec} ->
          {:ok, out, dec} = Message.feed(dec, piece)
          {acc ++ out, dec}
        end)
      end)

    assert byte_size(message) == 32 * 1024 * 1024
    assert micros < 3_000_000

    assert {:ok, [], dec} = Message.feed(Message.new_decoder(10), <<0, 0, 0>>)
    assert {:error, {:too_large, 11}} = Message.feed(dec, <<0, 11>>)
    assert {:error, :compressed} = Message.feed(Message.new_decoder(), <<1, 0, 0, 0, 0>>)
  end

  test "status codes map both ways" do
    assert length(Status.all()) == 17

    for {atom, code} <- Status.all() do
      assert Status.to_atom(code) == atom
      assert Status.to_code(atom) == code
    end

    assert Status.to_atom(99) == :unknown
  end
end
