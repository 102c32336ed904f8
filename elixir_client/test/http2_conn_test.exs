defmodule Snakepit.HTTP2.ConnTest do
  use ExUnit.Case, async: true

  alias Snakepit.HPACK
  alias Snakepit.HTTP2.{Conn, Frame}

  @preface "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
  @req_headers [
    {":method", "POST"},
    {":scheme", "http"},
    {":path", "/svc/M"},
    {":authority", "x"}
  ]

  # Parses everything the client sent into frames.
  defp frames(iodata) do
    data = IO.iodata_to_binary(iodata)

    data =
      if String.starts_with?(data, @preface),
        do: binary_part(data, 24, byte_size(data) - 24),
        else: data

    parse(data, [])
  end

  defp parse(<<>>, acc), do: Enum.reverse(acc)

  defp parse(data, acc) do
    {:ok, frame, _len, rest} = Frame.decode(data, 16_777_215)
    parse(rest, [frame | acc])
  end

  defp enc(frames), do: frames |> Enum.map(&Frame.encode/1) |> IO.iodata_to_binary()

  # A connection that has finished the SETTINGS exchange with a server using `settings`.
  defp connected(opts \\ [], settings \\ []) do
    {conn, _} = Conn.new(opts)
    {:ok, conn, [], out} = Conn.handle_data(conn, enc([{:settings, settings}, :settings_ack]))
    assert frames(out) == [:settings_ack]
    conn
  end

  defp response_block(hpack, headers) do
    {block, hpack} = HPACK.encode(hpack, headers)
    {IO.iodata_to_binary(block), hpack}
  end

  describe "new/1" do
    test "sends the preface, SETTINGS and a connection WINDOW_UPDATE" do
      {_conn, out} = Conn.new(initial_window_size: 1_000_000, connection_window_size: 2_000_000)
      out = IO.iodata_to_binary(out)
      assert String.starts_with?(out, @preface)

      assert [{:settings, settings}, {:window_update, 0, increment}] = frames(out)
      assert settings[:enable_push] == 0
      assert settings[:initial_window_size] == 1_000_000
      assert increment == 2_000_000 - 65_535
    end
  end

  describe "connection setup" do
    test "the server's first frame must be SETTINGS" do
      {conn, _} = Conn.new()

      assert {:error, conn, {:protocol_error, _}, out} =
               Conn.handle_data(conn, enc([{:ping, "12345678"}]))

      assert [{:goaway, 0, :protocol_error, _}] = frames(out)
      assert {:error, _, :closed} = Conn.request(conn, @req_headers, "", [])
    end

    test "SETTINGS is acknowledged, PING answered with the same payload" do
      conn = connected()

      assert {:ok, _conn, [], out} =
               Conn.handle_data(conn, enc([{:ping, "pingdata"}, {:settings, []}]))

      assert frames(out) == [{:ping_ack, "pingdata"}, :settings_ack]
    end

    test "a PING ack is reported as a pong" do
      conn = connected()
      {conn, out} = Conn.ping(conn, "abcdefgh")
      assert frames(out) == [{:ping, "abcdefgh"}]

      assert {:ok, _, [{:pong, "abcdefgh"}], []} =
               Conn.handle_data(conn, enc([{:ping_ack, "abcdefgh"}])) |> flat()
    end
  end

  defp flat({:ok, conn, events, out}), do: {:ok, conn, events, frames(out)}

  describe "requests" do
    test "HEADERS with END_STREAM when there is no body; decodable by HPACK" do
      conn = connected()
      assert {:ok, conn, 1, out} = Conn.request(conn, @req_headers, "", [])
      assert [{:headers, 1, block, %{end_stream: true, end_headers: true}}] = frames(out)
      assert {:ok, @req_headers, _} = HPACK.decode(HPACK.new_decoder(), block)

      assert {:ok, _conn, 3, out} = Conn.request(conn, @req_headers, "body", [])

      assert [{:headers, 3, _, %{end_stream: false}}, {:data, 3, "body", %{end_stream: true}}] =
               frames(out)
    end

    test "a header block larger than the max frame size goes out as HEADERS + CONTINUATION" do
      conn = connected()
      big = :crypto.strong_rand_bytes(60_000) |> Base.encode64()
      headers = @req_headers ++ [{"x-big", big}]
      assert {:ok, _conn, 1, out} = Conn.request(conn, headers, "", [])

      assert [{:headers, 1, first, %{end_headers: false, end_stream: true}} | continuations] =
               frames(out)

      assert byte_size(first) == 16_384
      assert length(continuations) >= 2
      {middle, [last]} = Enum.split(continuations, -1)

      assert Enum.all?(
               middle,
               &match?(
                 {:continuation, 1, f, %{end_headers: false}} when byte_size(f) == 16_384,
                 &1
               )
             )

      assert {:continuation, 1, _, %{end_headers: true}} = last
      block = first <> Enum.map_join(continuations, fn {:continuation, 1, f, _} -> f end)
      assert {:ok, ^headers, _} = HPACK.decode(HPACK.new_decoder(), block)
    end

    test "honours the server's MAX_CONCURRENT_STREAMS" do
      conn = connected([], max_concurrent_streams: 1)
      assert {:ok, conn, 1, _} = Conn.request(conn, @req_headers, "", [])
      assert {:error, conn, :too_many_streams} = Conn.request(conn, @req_headers, "", [])
      {conn, _} = Conn.cancel(conn, 1)
      assert {:ok, _conn, 3, _} = Conn.request(conn, @req_headers, "", [])
    end

    test "a smaller server HPACK table makes the next header block start with a size update" do
      conn = connected([], header_table_size: 0)
      assert {:ok, _, 1, out} = Conn.request(conn, @req_headers, "", [])
      assert [{:headers, 1, <<0x20, _::binary>> = block, _}] = frames(out)
      assert {:ok, @req_headers, dec} = HPACK.decode(HPACK.new_decoder(), block)
      assert dec.table.entries == []
    end
  end

  describe "responses" do
    setup do
      conn = connected()
      {:ok, conn, 1, _} = Conn.request(conn, @req_headers, "req", [])
      %{conn: conn, hpack: HPACK.new_encoder()}
    end

    test "headers, data and trailers become events; the stream closes", %{
      conn: conn,
      hpack: hpack
    } do
      {b1, hpack} =
        response_block(hpack, [{":status", "200"}, {"content-type", "application/grpc"}])

      {b2, _} = response_block(hpack, [{"grpc-status", "0"}])

      bytes =
        enc([
          {:headers, 1, b1, %{end_headers: true}},
          {:data, 1, "part1", %{}},
          {:data, 1, "part2", %{padding: 7}},
          {:headers, 1, b2, %{end_headers: true, end_stream: true}}
        ])

      expected = [
        {:headers, 1, [{":status", "200"}, {"content-type", "application/grpc"}], false},
        {:data, 1, "part1", false},
        {:data, 1, "part2", false},
        {:headers, 1, [{"grpc-status", "0"}], true}
      ]

      assert {:ok, conn2, ^expected, _} = Conn.handle_data(conn, bytes)
      assert Conn.open_streams(conn2) == []

      # The same bytes fed one at a time give the same events.
      {conn3, events} =
        for <<byte <- bytes>>, reduce: {conn, []} do
          {c, acc} ->
            {:ok, c, events, _} = Conn.handle_data(c, <<byte>>)
            {c, acc ++ events}
        end

      assert events == expected
      assert Conn.open_streams(conn3) == []
    end

    test "CONTINUATION frames are joined into one header block", %{conn: conn, hpack: hpack} do
      headers = [{":status", "200"}, {"x-long", String.duplicate("v", 100)}]
      {block, _} = response_block(hpack, headers)
      <<a::binary-size(10), b::binary-size(20), c::binary>> = block

      bytes =
        enc([
          {:headers, 1, a, %{end_stream: true}},
          {:continuation, 1, b, %{}},
          {:continuation, 1, c, %{end_headers: true}}
        ])

      assert {:ok, _, [{:headers, 1, ^headers, true}], _} = Conn.handle_data(conn, bytes)
    end

    test "any other frame inside a header block is a protocol error", %{conn: conn, hpack: hpack} do
      {block, _} = response_block(hpack, [{":status", "200"}])
      bytes = enc([{:headers, 1, block, %{}}, {:ping, "12345678"}])
      assert {:error, _, {:protocol_error, _}, out} = Conn.handle_data(conn, bytes)
      assert [{:goaway, _, :protocol_error, _}] = frames(out)

      assert {:error, _, {:protocol_error, _}, _} =
               Conn.handle_data(conn, enc([{:continuation, 1, block, %{end_headers: true}}]))
    end

    test "an endless CONTINUATION run is cut off", %{conn: conn} do
      piece = :binary.copy(<<0>>, 16_000)
      frames = [{:headers, 1, piece, %{}} | List.duplicate({:continuation, 1, piece, %{}}, 200)]
      assert {:error, _, {:enhance_your_calm, _}, out} = Conn.handle_data(conn, enc(frames))
      assert [{:goaway, _, :enhance_your_calm, _}] = frames(out)
    end

    test "an HPACK failure is a COMPRESSION_ERROR", %{conn: conn} do
      assert {:error, _, {:compression_error, _}, out} =
               Conn.handle_data(
                 conn,
                 enc([{:headers, 1, <<0xFF, 0xFF, 0xFF>>, %{end_headers: true}}])
               )

      assert [{:goaway, _, :compression_error, _}] = frames(out)
    end

    test "RST_STREAM ends the stream; later frames for it are ignored", %{conn: conn} do
      assert {:ok, conn, [{:reset, 1, :cancel}], _} =
               Conn.handle_data(conn, enc([{:rst_stream, 1, :cancel}]))

      assert Conn.open_streams(conn) == []
      assert {:ok, _, [], _} = Conn.handle_data(conn, enc([{:data, 1, "late", %{}}]))
    end

    test "cancel/2 sends RST_STREAM CANCEL and drops later frames", %{conn: conn, hpack: hpack} do
      {conn, out} = Conn.cancel(conn, 1)
      assert frames(out) == [{:rst_stream, 1, :cancel}]
      {block, _} = response_block(hpack, [{":status", "200"}])

      assert {:ok, conn, [], _} =
               Conn.handle_data(conn, enc([{:headers, 1, block, %{end_headers: true}}]))

      # Cancelling twice is a no-op.
      assert {_conn, []} = Conn.cancel(conn, 1)
    end

    test "PUSH_PROMISE is refused (push is disabled)", %{conn: conn} do
      assert {:error, _, {:protocol_error, _}, _} =
               Conn.handle_data(conn, enc([{:push_promise, 1, 2, "", %{end_headers: true}}]))
    end

    test "frames on streams we never opened, or server-initiated ones", %{conn: conn} do
      assert {:error, _, {:protocol_error, _}, _} =
               Conn.handle_data(conn, enc([{:data, 5, "x", %{}}]))

      assert {:error, _, {:protocol_error, _}, _} =
               Conn.handle_data(conn, enc([{:headers, 2, <<0x88>>, %{end_headers: true}}]))

      assert {:error, _, {:protocol_error, _}, _} =
               Conn.handle_data(conn, enc([{:rst_stream, 7, :cancel}]))
    end

    test "GOAWAY refuses streams above last_stream_id and blocks new requests", %{conn: conn} do
      {:ok, conn, 3, _} = Conn.request(conn, @req_headers, "", [])

      assert {:ok, conn, events, _} =
               Conn.handle_data(conn, enc([{:goaway, 1, :no_error, "bye"}]))

      assert events == [{:reset, 3, :refused_stream}, {:goaway, 1, :no_error, "bye"}]
      assert Conn.open_streams(conn) == [1]
      assert {:error, _, :goaway} = Conn.request(conn, @req_headers, "", [])
    end
  end

  describe "send flow control" do
    test "body beyond the windows is buffered and sent as WINDOW_UPDATEs arrive" do
      conn = connected()
      body = :crypto.strong_rand_bytes(100_000)
      assert {:ok, conn, 1, out} = Conn.request(conn, @req_headers, body, [])
      [{:headers, 1, _, %{end_stream: false}} | data] = frames(out)

      # Initial windows are 65_535: 3 full frames and one of 16_383 bytes.
      assert Enum.map(data, fn {:data, 1, d, _} -> byte_size(d) end) == [
               16_384,
               16_384,
               16_384,
               16_383
             ]

      refute Enum.any?(data, fn {:data, _, _, f} -> f.end_stream end)

      # A stream update alone is not enough: the connection window is empty.
      assert {:ok, conn, [], out} = Conn.handle_data(conn, enc([{:window_update, 1, 100_000}]))
      assert frames(out) == []

      # 10_000 on the connection lets 10_000 more bytes out.
      assert {:ok, conn, [], out} = Conn.handle_data(conn, enc([{:window_update, 0, 10_000}]))
      assert [{:data, 1, d, %{end_stream: false}}] = frames(out)
      assert byte_size(d) == 10_000

      assert {:ok, conn, [], out} = Conn.handle_data(conn, enc([{:window_update, 0, 1_000_000}]))
      sent = frames(out)
      assert List.last(sent) |> elem(3) == %{end_stream: true}
      rest = Enum.map_join(sent, fn {:data, 1, d, _} -> d end)

      all = Enum.map_join(data, fn {:data, 1, d, _} -> d end) <> d <> rest
      assert all == body
      assert conn.send_window == 65_535 + 10_000 + 1_000_000 - 100_000
    end

    test "a response that ends before the body is sent drops the rest and resets the stream" do
      conn = connected()
      {:ok, conn, 1, _} = Conn.request(conn, @req_headers, :binary.copy("a", 100_000), [])
      {block, _} = response_block(HPACK.new_encoder(), [{":status", "200"}, {"grpc-status", "0"}])

      assert {:ok, conn, [{:headers, 1, _, true}], out} =
               Conn.handle_data(
                 conn,
                 enc([{:headers, 1, block, %{end_headers: true, end_stream: true}}])
               )

      assert frames(out) == [{:rst_stream, 1, :cancel}]
      assert {:ok, _, [], out} = Conn.handle_data(conn, enc([{:window_update, 0, 100_000}]))
      assert frames(out) == []
    end

    test "a larger SETTINGS_INITIAL_WINDOW_SIZE and max frame size release buffered body" do
      conn = connected()
      {:ok, conn, 1, _} = Conn.request(conn, @req_headers, :binary.copy("a", 70_000), [])
      {:ok, conn, [], _} = Conn.handle_data(conn, enc([{:window_update, 0, 100_000}]))

      assert {:ok, _conn, [], out} =
               Conn.handle_data(
                 conn,
                 enc([{:settings, [initial_window_size: 200_000, max_frame_size: 32_768]}])
               )

      assert [:settings_ack, {:data, 1, d, %{end_stream: true}}] = frames(out)
      assert byte_size(d) == 70_000 - 65_535
    end

    test "a negative stream window after SETTINGS waits for WINDOW_UPDATE" do
      conn = connected()
      {:ok, conn, 1, _} = Conn.request(conn, @req_headers, :binary.copy("a", 70_000), [])
      {:ok, conn, [], _} = Conn.handle_data(conn, enc([{:settings, [initial_window_size: 1000]}]))

      {:ok, conn, [], out} =
        Conn.handle_data(conn, enc([{:window_update, 0, 100_000}, {:window_update, 1, 64_535}]))

      assert frames(out) == []
      {:ok, _conn, [], out} = Conn.handle_data(conn, enc([{:window_update, 1, 10}]))
      assert [{:data, 1, d, _}] = frames(out)
      assert byte_size(d) == 10
    end

    test "window overflow: connection error on stream 0, stream reset otherwise" do
      conn = connected()
      {:ok, conn, 1, _} = Conn.request(conn, @req_headers, "", end_stream: false)

      assert {:ok, _, [{:reset, 1, :flow_control_error}], out} =
               Conn.handle_data(conn, enc([{:window_update, 1, 0x7FFFFFFF}]))

      assert frames(out) == [{:rst_stream, 1, :flow_control_error}]

      assert {:error, _, {:flow_control_error, _}, _} =
               Conn.handle_data(conn, enc([{:window_update, 0, 0x7FFFFFFF}]))
    end

    test "send_data/4 streams more body on an open request" do
      conn = connected()
      {:ok, conn, 1, out} = Conn.request(conn, @req_headers, "a", end_stream: false)
      assert [{:headers, 1, _, _}, {:data, 1, "a", %{end_stream: false}}] = frames(out)
      {:ok, conn, out} = Conn.send_data(conn, 1, "b", true)
      assert frames(out) == [{:data, 1, "b", %{end_stream: true}}]
      assert {:error, _, :unknown_stream} = Conn.send_data(conn, 1, "c", true)
    end
  end

  describe "receive flow control" do
    setup do
      conn = connected(initial_window_size: 40_000, connection_window_size: 100_000)
      {:ok, conn, 1, _} = Conn.request(conn, @req_headers, "", [])
      {:ok, conn, 3, _} = Conn.request(conn, @req_headers, "", [])
      %{conn: conn}
    end

    test "DATA is credited back once half a window is used", %{conn: conn} do
      chunk = :binary.copy("x", 10_000)
      {:ok, conn, _, out} = Conn.handle_data(conn, enc([{:data, 1, chunk, %{}}]))
      assert frames(out) == []

      {:ok, conn, _, out} = Conn.handle_data(conn, enc([{:data, 1, chunk, %{}}]))
      assert frames(out) == [{:window_update, 1, 20_000}]

      # The fifth 10_000-byte chunk brings the connection to half of its 100_000 window.
      data3 = List.duplicate({:data, 3, chunk, %{}}, 3)
      {:ok, _conn, _, out} = Conn.handle_data(conn, enc(data3))
      assert frames(out) == [{:window_update, 3, 20_000}, {:window_update, 0, 50_000}]
    end

    test "a long stream never stalls: the windows keep being refilled", %{conn: conn} do
      chunk = :binary.copy("y", 16_384)

      {conn, total} =
        Enum.reduce(1..200, {conn, 0}, fn _, {conn, total} ->
          {:ok, conn, [{:data, 1, ^chunk, false}], _} =
            Conn.handle_data(conn, enc([{:data, 1, chunk, %{}}]))

          {conn, total + byte_size(chunk)}
        end)

      assert total > 3_000_000
      assert Conn.open_streams(conn) == [1, 3]
    end

    test "DATA beyond the stream window resets the stream", %{conn: conn} do
      big = :binary.copy("z", 16_384)
      {:ok, conn, _, _} = Conn.handle_data(conn, enc([{:data, 1, big, %{}}]))
      # Without our WINDOW_UPDATE being honoured, a server could only send 40_000 - 16_384 more.
      conn = put_in(conn.streams[1].recv_window, 100)

      assert {:ok, _, [{:reset, 1, :flow_control_error}], out} =
               Conn.handle_data(conn, enc([{:data, 1, big, %{}}]))

      assert {:rst_stream, 1, :flow_control_error} in frames(out)
    end

    test "DATA beyond the connection window is a connection error", %{conn: conn} do
      conn = %{conn | recv_window: 10}

      assert {:error, _, {:flow_control_error, _}, out} =
               Conn.handle_data(conn, enc([{:data, 1, "more than ten", %{}}]))

      assert [{:goaway, _, :flow_control_error, _}] = frames(out)
    end

    test "DATA for a cancelled stream still refills the connection window", %{conn: conn} do
      {conn, _} = Conn.cancel(conn, 1)
      chunk = :binary.copy("x", 16_000)

      {:ok, _conn, [], out} =
        Conn.handle_data(conn, enc(List.duplicate({:data, 1, chunk, %{}}, 4)))

      assert [{:window_update, 0, 64_000}] = frames(out)
    end
  end

  describe "per-stream receive windows and manual credit" do
    setup do
      conn = connected(initial_window_size: 65_535, connection_window_size: 200_000)

      {:ok, conn, 1, out} =
        Conn.request(conn, @req_headers, "", receive_window: 100_000, credit: :manual)

      %{conn: conn, out: out}
    end

    defp data_frames(sid, count, size, flags \\ %{}),
      do: enc(List.duplicate({:data, sid, :binary.copy("d", size), flags}, count))

    test "a window above the initial one is granted right after the HEADERS", %{out: out} do
      assert [{:headers, 1, _, %{end_stream: true}}, {:window_update, 1, 34_465}] = frames(out)
    end

    test "a window below the initial one is raised to it (a stream cannot start lower)", %{
      conn: conn
    } do
      {:ok, conn, 3, out} = Conn.request(conn, @req_headers, "", receive_window: 1_000)
      assert [{:headers, 3, _, _}] = frames(out)
      assert Conn.receive_window(conn, 3) == 65_535
      assert Conn.receive_window(conn, 1) == 100_000
      assert Conn.receive_window(conn, 5) == nil
    end

    test "a manual stream is credited only for what the owner returns, once half its window is due",
         %{conn: conn} do
      {:ok, conn, events, out} = Conn.handle_data(conn, data_frames(1, 4, 16_000))
      assert length(events) == 4
      # An :auto stream would have been credited after 50_000 bytes.
      assert frames(out) == []
      assert Conn.receive_window(conn, 1) == 36_000

      {conn, out} = Conn.return_credit(conn, 1, 30_000)
      assert out == []
      {conn, out} = Conn.return_credit(conn, 1, 20_000)
      assert frames(out) == [{:window_update, 1, 50_000}]
      assert Conn.receive_window(conn, 1) == 86_000

      # Credit beyond what was received is ignored: the peer never gets more than the window.
      {:ok, conn, _, _} = Conn.handle_data(conn, data_frames(1, 3, 16_000))
      {conn, out} = Conn.return_credit(conn, 1, 1_000_000)
      assert frames(out) == [{:window_update, 1, 62_000}]
      assert Conn.receive_window(conn, 1) == 100_000
    end

    test "a peer that sends past a withheld window gets the stream reset", %{conn: conn} do
      {:ok, conn, _, _} = Conn.handle_data(conn, data_frames(1, 6, 16_000))
      assert Conn.receive_window(conn, 1) == 4_000

      assert {:ok, conn, [{:reset, 1, :flow_control_error}], out} =
               Conn.handle_data(conn, data_frames(1, 1, 16_000))

      assert {:rst_stream, 1, :flow_control_error} in frames(out)
      assert Conn.open_streams(conn) == []
    end

    test "padding counts as consumed at once", %{conn: conn} do
      # 50 frames of 1_000 data bytes + 200 padding (+ 1 pad length byte): 60_050 bytes.
      {:ok, conn, _, out} = Conn.handle_data(conn, data_frames(1, 50, 1_000, %{padding: 200}))
      assert frames(out) == []
      {conn, out} = Conn.return_credit(conn, 1, 50_000)
      assert frames(out) == [{:window_update, 1, 60_050}]
      assert Conn.receive_window(conn, 1) == 100_000
    end

    test "while a manual stream waits, the connection window and other streams keep flowing", %{
      conn: conn
    } do
      {:ok, conn, _, _} =
        Conn.handle_data(conn, data_frames(1, 6, 16_000) <> data_frames(1, 1, 4_000))

      assert Conn.receive_window(conn, 1) == 0
      {:ok, conn, 3, _} = Conn.request(conn, @req_headers, "", [])

      # 2 MB on stream 3, ten times the connection window, in 20_000-byte frames.
      {conn, updates} =
        Enum.reduce(1..100, {conn, []}, fn _, {conn, updates} ->
          {:ok, conn, [{:data, 3, _, false}], out} =
            Conn.handle_data(conn, data_frames(3, 1, 16_000))

          {conn, updates ++ frames(out)}
        end)

      connection_credit = for {:window_update, 0, n} <- updates, do: n
      assert Enum.sum(connection_credit) >= 1_600_000 - 100_000
      refute Enum.any?(updates, &match?({:window_update, 1, _}, &1))
      assert Conn.receive_window(conn, 1) == 0
      assert Conn.open_streams(conn) == [1, 3]
    end

    test "return_credit/3 is a no-op for :auto, closed and unknown streams", %{conn: conn} do
      {:ok, conn, 3, _} = Conn.request(conn, @req_headers, "", [])
      {:ok, conn, _, _} = Conn.handle_data(conn, data_frames(3, 1, 16_000))
      assert {^conn, []} = Conn.return_credit(conn, 3, 16_000)
      assert {^conn, []} = Conn.return_credit(conn, 99, 16_000)
      {conn, _} = Conn.cancel(conn, 1)
      assert {^conn, []} = Conn.return_credit(conn, 1, 16_000)
    end
  end

  test "close/3 sends GOAWAY and closes" do
    conn = connected()
    {conn, out} = Conn.close(conn)
    assert [{:goaway, 0, :no_error, ""}] = frames(out)
    assert {:error, _, :closed} = Conn.request(conn, @req_headers, "", [])
  end
end
