defmodule Snakepit.HTTP2.Frame do
  @moduledoc """
  HTTP/2 frame encoding and decoding (RFC 9113 §4, §6). Pure functions; no connection state.

  Frames are tagged tuples:

    * `{:data, stream_id, data, flags}` — flags `%{end_stream: bool, padding: n}` (padding on
      encode only; decode strips it)
    * `{:headers, stream_id, fragment, flags}` — flags `%{end_stream, end_headers, priority, padding}`,
      `priority` is `nil` or `{exclusive?, dependency, weight}` (weight 1..256)
    * `{:priority, stream_id, {exclusive?, dependency, weight}}`
    * `{:rst_stream, stream_id, error_code}`
    * `{:settings, [{name, value}]}` and `:settings_ack`
    * `{:push_promise, stream_id, promised_stream_id, fragment, flags}` (decoded so the connection
      can reject it)
    * `{:ping, opaque8}` and `{:ping_ack, opaque8}`
    * `{:goaway, last_stream_id, error_code, debug_data}`
    * `{:window_update, stream_id, increment}`
    * `{:continuation, stream_id, fragment, flags}` — flags `%{end_headers: bool}`
    * `{:unknown, type, stream_id, flags_byte, payload}` (decode only; must be ignored, §4.1)

  Error codes are atoms (`:no_error`, `:protocol_error`, ...) or the raw integer when unknown.
  Settings names are atoms (`:header_table_size`, `:enable_push`, `:max_concurrent_streams`,
  `:initial_window_size`, `:max_frame_size`, `:max_header_list_size`); unknown ones are dropped.
  """

  import Bitwise

  @type error_code :: atom() | non_neg_integer()
  @type priority :: {boolean(), non_neg_integer(), 1..256}
  @type setting ::
          {:header_table_size
           | :enable_push
           | :max_concurrent_streams
           | :initial_window_size
           | :max_frame_size
           | :max_header_list_size, non_neg_integer()}
  @type t ::
          {:data, pos_integer(), iodata(), map()}
          | {:headers, pos_integer(), iodata(), map()}
          | {:priority, pos_integer(), priority()}
          | {:rst_stream, pos_integer(), error_code()}
          | {:settings, [setting()]}
          | :settings_ack
          | {:push_promise, pos_integer(), pos_integer(), iodata(), map()}
          | {:ping, <<_::64>>}
          | {:ping_ack, <<_::64>>}
          | {:goaway, non_neg_integer(), error_code(), binary()}
          | {:window_update, non_neg_integer(), pos_integer()}
          | {:continuation, pos_integer(), iodata(), map()}
          | {:unknown, byte(), non_neg_integer(), byte(), binary()}
  @type decode_error :: {:frame_size_error | :protocol_error | :flow_control_error, String.t()}

  @data 0x0
  @headers 0x1
  @priority 0x2
  @rst_stream 0x3
  @settings 0x4
  @push_promise 0x5
  @ping 0x6
  @goaway 0x7
  @window_update 0x8
  @continuation 0x9

  @end_stream 0x1
  @ack 0x1
  @end_headers 0x4
  @padded 0x8
  @priority_flag 0x20

  @default_max_frame_size 16_384
  @max_window 0x7FFFFFFF

  @error_codes [
    no_error: 0x0,
    protocol_error: 0x1,
    internal_error: 0x2,
    flow_control_error: 0x3,
    settings_timeout: 0x4,
    stream_closed: 0x5,
    frame_size_error: 0x6,
    refused_stream: 0x7,
    cancel: 0x8,
    compression_error: 0x9,
    connect_error: 0xA,
    enhance_your_calm: 0xB,
    inadequate_security: 0xC,
    http_1_1_required: 0xD
  ]

  @settings_ids [
    header_table_size: 0x1,
    enable_push: 0x2,
    max_concurrent_streams: 0x3,
    initial_window_size: 0x4,
    max_frame_size: 0x5,
    max_header_list_size: 0x6
  ]

  @doc "The connection preface a client sends before its first SETTINGS frame."
  @spec client_preface() :: binary()
  def client_preface, do: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

  @doc "Error code atom for an integer; unknown codes stay integers (§7: treat as INTERNAL_ERROR-ish)."
  @spec error_code_to_atom(non_neg_integer()) :: error_code()
  for {name, code} <- @error_codes do
    def error_code_to_atom(unquote(code)), do: unquote(name)
  end

  def error_code_to_atom(code) when is_integer(code), do: code

  @doc "Integer for an error code atom (integers pass through)."
  @spec error_code_to_integer(error_code()) :: non_neg_integer()
  for {name, code} <- @error_codes do
    def error_code_to_integer(unquote(name)), do: unquote(code)
  end

  def error_code_to_integer(code) when is_integer(code), do: code

  ## Encoding

  @doc "Encodes one frame as iodata. Callers keep payloads within the peer's max frame size."
  @spec encode(t()) :: iodata()
  def encode({:data, stream_id, data, flags}) do
    {payload, pad_flag} = pad(data, Map.get(flags, :padding, 0))
    frame(@data, flag(flags, :end_stream, @end_stream) ||| pad_flag, stream_id, payload)
  end

  def encode({:headers, stream_id, fragment, flags}) do
    {prio_bytes, prio_flag} =
      case Map.get(flags, :priority) do
        nil -> {[], 0}
        priority -> {priority_bytes(priority), @priority_flag}
      end

    {payload, pad_flag} = pad([prio_bytes | fragment], Map.get(flags, :padding, 0))

    bits =
      flag(flags, :end_stream, @end_stream) ||| flag(flags, :end_headers, @end_headers) |||
        pad_flag |||
        prio_flag

    frame(@headers, bits, stream_id, payload)
  end

  def encode({:priority, stream_id, priority}),
    do: frame(@priority, 0, stream_id, priority_bytes(priority))

  def encode({:rst_stream, stream_id, code}),
    do: frame(@rst_stream, 0, stream_id, <<error_code_to_integer(code)::32>>)

  def encode({:settings, settings}) do
    payload =
      for {name, value} <- settings, do: <<Keyword.fetch!(@settings_ids, name)::16, value::32>>

    frame(@settings, 0, 0, payload)
  end

  def encode(:settings_ack), do: frame(@settings, @ack, 0, [])

  def encode({:push_promise, stream_id, promised_id, fragment, flags}) do
    frame(@push_promise, flag(flags, :end_headers, @end_headers), stream_id, [
      <<0::1, promised_id::31>> | fragment
    ])
  end

  def encode({:ping, <<_::64>> = data}), do: frame(@ping, 0, 0, data)
  def encode({:ping_ack, <<_::64>> = data}), do: frame(@ping, @ack, 0, data)

  def encode({:goaway, last_stream_id, code, debug}),
    do:
      frame(@goaway, 0, 0, [<<0::1, last_stream_id::31, error_code_to_integer(code)::32>>, debug])

  def encode({:window_update, stream_id, increment}),
    do: frame(@window_update, 0, stream_id, <<0::1, increment::31>>)

  def encode({:continuation, stream_id, fragment, flags}),
    do: frame(@continuation, flag(flags, :end_headers, @end_headers), stream_id, fragment)

  defp frame(type, flags, stream_id, payload) do
    [<<IO.iodata_length(payload)::24, type::8, flags::8, 0::1, stream_id::31>> | payload]
  end

  defp flag(flags, key, bit), do: if(Map.get(flags, key, false), do: bit, else: 0)

  defp pad(payload, 0), do: {payload, 0}

  defp pad(payload, padding) when padding in 1..255 do
    # PADDED adds the pad-length byte itself, so `padding` counts the zero bytes after the payload.
    {[<<padding>>, payload, :binary.copy(<<0>>, padding)], @padded}
  end

  defp priority_bytes({exclusive, dependency, weight}),
    do: <<if(exclusive, do: 1, else: 0)::1, dependency::31, weight - 1::8>>

  ## Decoding

  @doc """
  Decodes the first frame in `buffer`.

  Returns `{:ok, frame, payload_length, rest}` (the length is what DATA flow control counts,
  padding included), `:more` when the buffer holds no complete frame yet, or
  `{:error, {error_code, message}}` for a connection error (§5.4.1).
  """
  @spec decode(binary(), pos_integer()) ::
          {:ok, t(), non_neg_integer(), binary()} | :more | {:error, decode_error()}
  def decode(buffer, max_frame_size \\ @default_max_frame_size)

  def decode(<<length::24, type::8, flags::8, _::1, stream_id::31, rest::binary>>, max_frame_size) do
    cond do
      length > max_frame_size ->
        {:error,
         {:frame_size_error, "frame of #{length} bytes exceeds max frame size #{max_frame_size}"}}

      byte_size(rest) < length ->
        :more

      true ->
        <<payload::binary-size(length), rest::binary>> = rest

        case decode_payload(type, flags, stream_id, payload) do
          {:ok, frame} -> {:ok, frame, length, rest}
          {:error, _} = error -> error
        end
    end
  end

  def decode(_partial, _max_frame_size), do: :more

  defp decode_payload(@data, _flags, 0, _), do: proto_error("DATA on stream 0")

  defp decode_payload(@data, flags, sid, payload) do
    with {:ok, data} <- unpad(flags, payload, "DATA") do
      {:ok, {:data, sid, data, %{end_stream: set?(flags, @end_stream)}}}
    end
  end

  defp decode_payload(@headers, _flags, 0, _), do: proto_error("HEADERS on stream 0")

  defp decode_payload(@headers, flags, sid, payload) do
    with {:ok, data} <- unpad(flags, payload, "HEADERS"),
         {:ok, priority, fragment} <- headers_priority(flags, data, sid) do
      {:ok,
       {:headers, sid, fragment,
        %{
          end_stream: set?(flags, @end_stream),
          end_headers: set?(flags, @end_headers),
          priority: priority
        }}}
    end
  end

  defp decode_payload(@priority, _flags, 0, _), do: proto_error("PRIORITY on stream 0")

  defp decode_payload(@priority, _flags, sid, <<e::1, dep::31, weight::8>>) do
    if dep == sid,
      do: proto_error("stream #{sid} depends on itself"),
      else: {:ok, {:priority, sid, {e == 1, dep, weight + 1}}}
  end

  defp decode_payload(@priority, _flags, _sid, _),
    do: size_error("PRIORITY payload must be 5 bytes")

  defp decode_payload(@rst_stream, _flags, 0, _), do: proto_error("RST_STREAM on stream 0")

  defp decode_payload(@rst_stream, _flags, sid, <<code::32>>),
    do: {:ok, {:rst_stream, sid, error_code_to_atom(code)}}

  defp decode_payload(@rst_stream, _flags, _sid, _),
    do: size_error("RST_STREAM payload must be 4 bytes")

  defp decode_payload(@settings, _flags, sid, _) when sid != 0,
    do: proto_error("SETTINGS on stream #{sid}")

  defp decode_payload(@settings, flags, 0, payload) do
    cond do
      set?(flags, @ack) and payload != <<>> -> size_error("SETTINGS ACK with a payload")
      set?(flags, @ack) -> {:ok, :settings_ack}
      rem(byte_size(payload), 6) != 0 -> size_error("SETTINGS payload not a multiple of 6 bytes")
      true -> decode_settings(payload, [])
    end
  end

  defp decode_payload(@push_promise, _flags, 0, _), do: proto_error("PUSH_PROMISE on stream 0")

  defp decode_payload(@push_promise, flags, sid, payload) do
    case unpad(flags, payload, "PUSH_PROMISE") do
      {:ok, <<_::1, promised::31, fragment::binary>>} ->
        {:ok, {:push_promise, sid, promised, fragment, %{end_headers: set?(flags, @end_headers)}}}

      {:ok, _} ->
        size_error("PUSH_PROMISE payload too short")

      error ->
        error
    end
  end

  defp decode_payload(@ping, _flags, sid, _) when sid != 0,
    do: proto_error("PING on stream #{sid}")

  defp decode_payload(@ping, flags, 0, <<data::binary-size(8)>>),
    do: {:ok, if(set?(flags, @ack), do: {:ping_ack, data}, else: {:ping, data})}

  defp decode_payload(@ping, _flags, 0, _), do: size_error("PING payload must be 8 bytes")

  defp decode_payload(@goaway, _flags, sid, _) when sid != 0,
    do: proto_error("GOAWAY on stream #{sid}")

  defp decode_payload(@goaway, _flags, 0, <<_::1, last::31, code::32, debug::binary>>),
    do: {:ok, {:goaway, last, error_code_to_atom(code), debug}}

  defp decode_payload(@goaway, _flags, 0, _),
    do: size_error("GOAWAY payload shorter than 8 bytes")

  defp decode_payload(@window_update, _flags, sid, <<_::1, increment::31>>) do
    # A zero increment on a stream is a stream error; the connection decides (it gets increment 0).
    if increment == 0 and sid == 0,
      do: proto_error("WINDOW_UPDATE with zero increment"),
      else: {:ok, {:window_update, sid, increment}}
  end

  defp decode_payload(@window_update, _flags, _sid, _),
    do: size_error("WINDOW_UPDATE payload must be 4 bytes")

  defp decode_payload(@continuation, _flags, 0, _), do: proto_error("CONTINUATION on stream 0")

  defp decode_payload(@continuation, flags, sid, payload),
    do: {:ok, {:continuation, sid, payload, %{end_headers: set?(flags, @end_headers)}}}

  defp decode_payload(type, flags, sid, payload), do: {:ok, {:unknown, type, sid, flags, payload}}

  defp decode_settings(<<>>, acc), do: {:ok, {:settings, Enum.reverse(acc)}}

  defp decode_settings(<<id::16, value::32, rest::binary>>, acc) do
    case List.keyfind(@settings_ids, id, 1) do
      nil ->
        # Unknown settings must be ignored (§6.5.2).
        decode_settings(rest, acc)

      {:enable_push, _} when value > 1 ->
        proto_error("SETTINGS_ENABLE_PUSH must be 0 or 1")

      {:initial_window_size, _} when value > @max_window ->
        {:error, {:flow_control_error, "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1"}}

      {:max_frame_size, _} when value < 16_384 or value > 16_777_215 ->
        proto_error("SETTINGS_MAX_FRAME_SIZE #{value} out of range")

      {name, _} ->
        decode_settings(rest, [{name, value} | acc])
    end
  end

  defp headers_priority(flags, data, sid) do
    if set?(flags, @priority_flag) do
      case data do
        <<_e::1, ^sid::31, _weight::8, _::binary>> ->
          proto_error("stream #{sid} depends on itself")

        <<e::1, dep::31, weight::8, fragment::binary>> ->
          {:ok, {e == 1, dep, weight + 1}, fragment}

        _ ->
          size_error("HEADERS too short for its PRIORITY fields")
      end
    else
      {:ok, nil, data}
    end
  end

  defp unpad(flags, payload, name) do
    if set?(flags, @padded) do
      case payload do
        <<pad_length, rest::binary>> when pad_length <= byte_size(rest) ->
          {:ok, binary_part(rest, 0, byte_size(rest) - pad_length)}

        <<_pad_length, _::binary>> ->
          proto_error("#{name} padding exceeds payload")

        <<>> ->
          size_error("#{name} PADDED without a pad length")
      end
    else
      {:ok, payload}
    end
  end

  defp set?(flags, bit), do: (flags &&& bit) != 0
  defp proto_error(message), do: {:error, {:protocol_error, message}}
  defp size_error(message), do: {:error, {:frame_size_error, message}}
end
