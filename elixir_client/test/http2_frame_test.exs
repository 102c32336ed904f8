defmodule Snakepit.HTTP2.FrameTest do
  use ExUnit.Case, async: true

  alias Snakepit.HTTP2.Frame

  defp bin(frame), do: IO.iodata_to_binary(Frame.encode(frame))

  defp roundtrip(frame) do
    encoded = bin(frame)
    assert {:ok, decoded, length, "rest"} = Frame.decode(encoded <> "rest")
    assert length == byte_size(encoded) - 9
    decoded
  end

  describe "encoding layout" do
    test "9-byte header: length, type, flags, reserved bit + stream id" do
      assert bin({:data, 3, "hello", %{end_stream: true}}) ==
               <<5::24, 0, 1, 0::1, 3::31, "hello">>

      assert bin(:settings_ack) == <<0::24, 4, 1, 0::32>>
      assert bin({:window_update, 0, 1000}) == <<4::24, 8, 0, 0::32, 0::1, 1000::31>>
      assert bin({:rst_stream, 5, :cancel}) == <<4::24, 3, 0, 5::32, 8::32>>

      assert bin({:goaway, 7, :protocol_error, "bye"}) ==
               <<11::24, 7, 0, 0::32, 7::32, 1::32, "bye">>

      assert bin({:ping, "12345678"}) == <<8::24, 6, 0, 0::32, "12345678">>
      assert bin({:ping_ack, "12345678"}) == <<8::24, 6, 1, 0::32, "12345678">>
    end

    test "settings payload" do
      assert bin({:settings, [enable_push: 0, initial_window_size: 65_536]}) ==
               <<12::24, 4, 0, 0::32, 2::16, 0::32, 4::16, 65_536::32>>
    end

    test "headers flags: END_STREAM 0x1, END_HEADERS 0x4, PADDED 0x8, PRIORITY 0x20" do
      assert <<_::24, 1, 0x05, _::32, "blk">> =
               bin({:headers, 1, "blk", %{end_stream: true, end_headers: true}})

      assert <<11::24, 1, 0x2C, 1::32, 2, 0::1, 3::31, 15, "blk", 0, 0>> =
               bin(
                 {:headers, 1, "blk", %{end_headers: true, priority: {false, 3, 16}, padding: 2}}
               )
    end
  end

  describe "round trips" do
    test "DATA, plain and padded" do
      assert {:data, 1, "abc", %{end_stream: false}} = roundtrip({:data, 1, "abc", %{}})

      assert {:data, 9, "abc", %{end_stream: true}} =
               roundtrip({:data, 9, "abc", %{end_stream: true, padding: 10}})

      # Flow control counts the padding: the payload length includes it.
      assert {:ok, _, 14, ""} = Frame.decode(bin({:data, 9, "abc", %{padding: 10}}))
    end

    test "HEADERS with PADDED and PRIORITY" do
      assert {:headers, 3, "frag",
              %{end_stream: true, end_headers: false, priority: {true, 1, 256}}} =
               roundtrip(
                 {:headers, 3, "frag", %{end_stream: true, priority: {true, 1, 256}, padding: 4}}
               )

      assert {:headers, 3, "frag", %{priority: nil, end_headers: true}} =
               roundtrip({:headers, 3, "frag", %{end_headers: true}})
    end

    test "PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION, PUSH_PROMISE" do
      assert {:priority, 5, {false, 3, 200}} = roundtrip({:priority, 5, {false, 3, 200}})
      assert {:rst_stream, 5, :refused_stream} = roundtrip({:rst_stream, 5, :refused_stream})
      assert {:rst_stream, 5, 0x1234} = roundtrip({:rst_stream, 5, 0x1234})

      settings = [
        header_table_size: 0,
        enable_push: 1,
        max_concurrent_streams: 100,
        initial_window_size: 0x7FFFFFFF,
        max_frame_size: 16_777_215,
        max_header_list_size: 8192
      ]

      assert {:settings, ^settings} = roundtrip({:settings, settings})
      assert :settings_ack = roundtrip(:settings_ack)
      assert {:ping, "abcdefgh"} = roundtrip({:ping, "abcdefgh"})
      assert {:ping_ack, "abcdefgh"} = roundtrip({:ping_ack, "abcdefgh"})

      assert {:goaway, 0x7FFFFFFF, :no_error, "debug"} =
               roundtrip({:goaway, 0x7FFFFFFF, :no_error, "debug"})

      assert {:window_update, 7, 0x7FFFFFFF} = roundtrip({:window_update, 7, 0x7FFFFFFF})

      assert {:continuation, 7, "more", %{end_headers: true}} =
               roundtrip({:continuation, 7, "more", %{end_headers: true}})

      assert {:push_promise, 1, 2, "blk", %{end_headers: true}} =
               roundtrip({:push_promise, 1, 2, "blk", %{end_headers: true}})
    end

    test "unknown frame types and settings are passed over" do
      assert {:ok, {:unknown, 0xFA, 1, 0x3, "xyz"}, 3, ""} =
               Frame.decode(<<3::24, 0xFA, 0x3, 1::32, "xyz">>)

      assert {:ok, {:settings, [max_frame_size: 20_000]}, 12, ""} =
               Frame.decode(<<12::24, 4, 0, 0::32, 0x99::16, 7::32, 5::16, 20_000::32>>)
    end

    test "the reserved bit of the stream id is ignored" do
      assert {:ok, {:data, 1, "", _}, 0, ""} = Frame.decode(<<0::24, 0, 0, 1::1, 1::31>>)
    end
  end

  describe "partial input" do
    test "needs the whole header and payload" do
      full = bin({:data, 1, "hello", %{}})

      for n <- 0..(byte_size(full) - 1) do
        assert :more == Frame.decode(binary_part(full, 0, n))
      end
    end
  end

  describe "errors" do
    test "frame larger than the max frame size" do
      assert {:error, {:frame_size_error, _}} = Frame.decode(<<16_385::24, 0, 0, 1::32>>, 16_384)

      assert {:ok, _, _, _} =
               Frame.decode(bin({:data, 1, :binary.copy("a", 16_385), %{}}), 20_000)
    end

    test "stream 0 where a stream is required, and vice versa" do
      assert {:error, {:protocol_error, _}} = Frame.decode(bin({:data, 0, "x", %{}}))
      assert {:error, {:protocol_error, _}} = Frame.decode(bin({:headers, 0, "x", %{}}))
      assert {:error, {:protocol_error, _}} = Frame.decode(bin({:rst_stream, 0, :cancel}))
      assert {:error, {:protocol_error, _}} = Frame.decode(bin({:continuation, 0, "x", %{}}))
      assert {:error, {:protocol_error, _}} = Frame.decode(<<0::24, 4, 0, 1::32>>)
      assert {:error, {:protocol_error, _}} = Frame.decode(<<8::24, 6, 0, 1::32, "12345678">>)
      assert {:error, {:protocol_error, _}} = Frame.decode(<<8::24, 7, 0, 1::32, 0::64>>)
    end

    test "wrong payload sizes" do
      assert {:error, {:frame_size_error, _}} = Frame.decode(<<4::24, 2, 0, 1::32, 0::32>>)
      assert {:error, {:frame_size_error, _}} = Frame.decode(<<3::24, 3, 0, 1::32, 0::24>>)
      assert {:error, {:frame_size_error, _}} = Frame.decode(<<5::24, 4, 0, 0::32, 0::40>>)
      assert {:error, {:frame_size_error, _}} = Frame.decode(<<6::24, 4, 1, 0::32, 0::48>>)
      assert {:error, {:frame_size_error, _}} = Frame.decode(<<7::24, 6, 0, 0::32, 0::56>>)
      assert {:error, {:frame_size_error, _}} = Frame.decode(<<7::24, 7, 0, 0::32, 0::56>>)
      assert {:error, {:frame_size_error, _}} = Frame.decode(<<3::24, 8, 0, 0::32, 0::24>>)
    end

    test "padding longer than the payload" do
      assert {:error, {:protocol_error, _}} = Frame.decode(<<3::24, 0, 0x8, 1::32, 5, "ab">>)
      assert {:error, {:protocol_error, _}} = Frame.decode(<<3::24, 1, 0xC, 1::32, 3, "ab">>)
    end

    test "invalid settings values" do
      assert {:error, {:protocol_error, _}} = Frame.decode(bin({:settings, [enable_push: 2]}))

      assert {:error, {:flow_control_error, _}} =
               Frame.decode(bin({:settings, [initial_window_size: 0x80000000]}))

      assert {:error, {:protocol_error, _}} =
               Frame.decode(bin({:settings, [max_frame_size: 16_383]}))

      assert {:error, {:protocol_error, _}} =
               Frame.decode(bin({:settings, [max_frame_size: 16_777_216]}))
    end

    test "zero window increment on the connection; a stream's is left to the connection" do
      assert {:error, {:protocol_error, _}} = Frame.decode(<<4::24, 8, 0, 0::32, 0::32>>)
      assert {:ok, {:window_update, 1, 0}, 4, ""} = Frame.decode(<<4::24, 8, 0, 1::32, 0::32>>)
    end

    test "a stream depending on itself" do
      assert {:error, {:protocol_error, _}} = Frame.decode(bin({:priority, 3, {false, 3, 16}}))

      assert {:error, {:protocol_error, _}} =
               Frame.decode(bin({:headers, 3, "x", %{priority: {false, 3, 16}}}))
    end
  end

  test "error codes map both ways" do
    for {atom, int} <- [no_error: 0, protocol_error: 1, cancel: 8, http_1_1_required: 13] do
      assert Frame.error_code_to_atom(int) == atom
      assert Frame.error_code_to_integer(atom) == int
    end

    assert Frame.error_code_to_atom(99) == 99
  end
end
