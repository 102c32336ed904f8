defmodule Snakepit.HTTP2.Conn do
  @moduledoc """
  A sans-I/O HTTP/2 client connection (RFC 9113): a plain struct that turns calls and received
  bytes into events and bytes to send. The owner does all socket I/O.

      {conn, preface} = Conn.new()
      # send preface
      {:ok, conn, stream_id, out} = Conn.request(conn, headers, body, [])
      # send out; on every received chunk:
      {:ok, conn, events, out} = Conn.handle_data(conn, bytes)

  Events (in arrival order):

    * `{:headers, stream_id, headers, end_stream?}` — a complete header block (CONTINUATIONs joined)
    * `{:data, stream_id, binary, end_stream?}`
    * `{:reset, stream_id, error_code}` — the peer reset the stream (or, when the stream violated
      flow control, we did); the stream is closed
    * `{:goaway, last_stream_id, error_code, debug_data}` — no new requests; streams above
      `last_stream_id` were not processed and are reported as `{:reset, id, :refused_stream}` first
    * `{:pong, opaque8}` — the peer acknowledged our PING

  A connection error (bad frame, HPACK failure, flow-control violation) ends the connection:
  `handle_data/2` returns `{:error, conn, {error_code, message}, out}` where `out` holds the GOAWAY
  to send before closing the socket.

  Flow control: request bodies are split to the peer's max frame size and to both the connection
  and the stream send windows; what does not fit stays buffered in the stream and goes out as the
  peer's WINDOW_UPDATEs (or a larger SETTINGS_INITIAL_WINDOW_SIZE) arrive.

  Received DATA is counted against the connection window and the stream's window (§6.9). Credit
  goes back in one WINDOW_UPDATE once half a window is due, so a peer whose data is consumed as it
  arrives never waits. The connection window is always credited as DATA arrives. A stream's window
  is credited the same way by default (`credit: :auto`); a stream opened with `credit: :manual` is
  credited only for the bytes its owner reports consumed with `return_credit/3`, so a slow consumer
  stops the peer after at most one window of unconsumed data (backpressure), while the connection
  and its other streams keep flowing.
  """

  alias Snakepit.HPACK
  alias Snakepit.HTTP2.Frame

  @max_window 0x7FFFFFFF
  @max_stream_id 0x7FFFFFFF
  @default_window 65_535

  defstruct state: :open,
            buffer: <<>>,
            settings_received: false,
            encoder: nil,
            decoder: nil,
            max_frame_size: 16_384,
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            recv_window: 0,
            unacked_settings: 0,
            peer: %{
              max_frame_size: 16_384,
              initial_window_size: @default_window,
              max_concurrent_streams: :infinity,
              header_table_size: 4096,
              max_header_list_size: :infinity
            },
            send_window: @default_window,
            streams: %{},
            next_stream_id: 1,
            header_block: nil,
            goaway: nil

  @type stream_id :: pos_integer()
  @type headers :: [{binary(), binary()}]
  @type event ::
          {:headers, stream_id(), headers(), boolean()}
          | {:data, stream_id(), binary(), boolean()}
          | {:reset, stream_id(), Frame.error_code()}
          | {:goaway, non_neg_integer(), Frame.error_code(), binary()}
          | {:pong, binary()}
  @type error_reason :: {atom(), String.t()}
  @type t :: %__MODULE__{}

  # Per-stream state: `pending` is body not yet sent (flow control); `local` is :open (more body may
  # follow via send_data/4), :ending (END_STREAM goes out after `pending`) or :closed.
  # Receiving: `recv_window` is what the peer may still send, `window` the size credit tops it back
  # up to, `unreturned` the consumed bytes not yet credited (they go out in one WINDOW_UPDATE once
  # they reach half the window), `credit` :auto (DATA counts as consumed on arrival) or :manual
  # (the owner reports consumption with return_credit/3).
  defmodule Stream do
    @moduledoc false
    defstruct [
      :id,
      :send_window,
      :recv_window,
      :window,
      credit: :auto,
      unreturned: 0,
      pending: <<>>,
      local: :open
    ]
  end

  @doc """
  A new connection and the bytes to send first: the client preface, our SETTINGS (push disabled,
  our stream window) and a connection WINDOW_UPDATE raising the connection window.

  Options: `:initial_window_size` (SETTINGS_INITIAL_WINDOW_SIZE: every stream's receive window
  when it opens, and the window of requests that ask for none; default 4 MiB),
  `:connection_window_size` (default 16 MiB), `:max_frame_size` (largest frame we accept,
  default 16384), `:max_header_list_size` (default 1 MiB).
  """
  @spec new(keyword()) :: {t(), iodata()}
  def new(opts \\ []) do
    stream_window = Keyword.get(opts, :initial_window_size, 4 * 1024 * 1024)
    connection_window = Keyword.get(opts, :connection_window_size, 16 * 1024 * 1024)
    max_frame_size = Keyword.get(opts, :max_frame_size, 16_384)
    max_header_list = Keyword.get(opts, :max_header_list_size, 1024 * 1024)

    conn = %__MODULE__{
      encoder: HPACK.new_encoder(),
      decoder: HPACK.new_decoder(max_header_list_size: max_header_list),
      max_frame_size: max_frame_size,
      stream_window: stream_window,
      connection_window: connection_window,
      recv_window: connection_window,
      unacked_settings: 1
    }

    settings = [
      enable_push: 0,
      initial_window_size: stream_window,
      max_frame_size: max_frame_size,
      max_header_list_size: max_header_list
    ]

    window_update =
      if connection_window > @default_window,
        do: Frame.encode({:window_update, 0, connection_window - @default_window}),
        else: []

    {conn, [Frame.client_preface(), Frame.encode({:settings, settings}), window_update]}
  end

  @doc """
  Opens a stream: HEADERS (+ CONTINUATION when the block exceeds the peer's max frame size) and
  as much of `body` as the flow-control windows allow; the rest is buffered in the connection.

  Options:

    * `:end_stream` (default `true`): `false` keeps the request body open for `send_data/4`.
    * `:receive_window` - the stream's receive window in bytes, from the connection's
      `:initial_window_size` (the default, and the smallest: a stream cannot start lower) to
      2^31-1. One above the initial window is granted with a WINDOW_UPDATE right after the HEADERS.
    * `:credit` - `:auto` (default): received DATA is credited back as it arrives; `:manual`: only
      what the owner passes to `return_credit/3` is, so the peer can be at most one window ahead
      of the owner's consumption.
  """
  @spec request(t(), headers(), iodata(), keyword()) ::
          {:ok, t(), stream_id(), iodata()}
          | {:error, t(), :closed | :goaway | :too_many_streams | :stream_ids_exhausted}
  def request(%__MODULE__{} = conn, headers, body, opts \\ []) do
    end_stream = Keyword.get(opts, :end_stream, true)

    window =
      opts
      |> Keyword.get(:receive_window, conn.stream_window)
      |> max(conn.stream_window)
      |> min(@max_window)

    credit = Keyword.get(opts, :credit, :auto)
    body = IO.iodata_to_binary(body)

    cond do
      conn.state == :closed ->
        {:error, conn, :closed}

      conn.goaway != nil ->
        {:error, conn, :goaway}

      conn.next_stream_id > @max_stream_id ->
        {:error, conn, :stream_ids_exhausted}

      conn.peer.max_concurrent_streams != :infinity and
          map_size(conn.streams) >= conn.peer.max_concurrent_streams ->
        {:error, conn, :too_many_streams}

      true ->
        sid = conn.next_stream_id
        {block, encoder} = HPACK.encode(conn.encoder, headers)
        headers_end_stream = end_stream and body == <<>>

        stream = %Stream{
          id: sid,
          send_window: conn.peer.initial_window_size,
          recv_window: window,
          window: window,
          credit: credit,
          pending: body,
          local:
            cond do
              headers_end_stream -> :closed
              end_stream -> :ending
              true -> :open
            end
        }

        header_frames =
          header_frames(
            sid,
            IO.iodata_to_binary(block),
            headers_end_stream,
            conn.peer.max_frame_size
          )

        # The stream is open once its HEADERS are out; the peer starts it at our initial window.
        window_update =
          if window > conn.stream_window,
            do: Frame.encode({:window_update, sid, window - conn.stream_window}),
            else: []

        conn = %{
          conn
          | encoder: encoder,
            next_stream_id: sid + 2,
            streams: Map.put(conn.streams, sid, stream)
        }

        {conn, data_out} = flush(conn)
        {:ok, conn, sid, [header_frames, window_update | data_out]}
    end
  end

  @doc """
  Queues more request body on an open stream (`end_stream?` closes our side) and returns whatever
  the windows let out now.
  """
  @spec send_data(t(), stream_id(), iodata(), boolean()) ::
          {:ok, t(), iodata()} | {:error, t(), :unknown_stream}
  def send_data(%__MODULE__{} = conn, sid, data, end_stream?) do
    case conn.streams do
      %{^sid => %Stream{local: :open} = stream} ->
        stream = %{
          stream
          | pending: stream.pending <> IO.iodata_to_binary(data),
            local: if(end_stream?, do: :ending, else: :open)
        }

        {conn, out} = flush(put_stream(conn, stream))
        {:ok, conn, out}

      _ ->
        {:error, conn, :unknown_stream}
    end
  end

  @doc "Resets a stream with CANCEL and forgets it (buffered body is dropped). Unknown streams: no-op."
  @spec cancel(t(), stream_id()) :: {t(), iodata()}
  def cancel(%__MODULE__{} = conn, sid) do
    if Map.has_key?(conn.streams, sid) and conn.state != :closed do
      {%{conn | streams: Map.delete(conn.streams, sid)},
       Frame.encode({:rst_stream, sid, :cancel})}
    else
      {%{conn | streams: Map.delete(conn.streams, sid)}, []}
    end
  end

  @doc """
  Reports that the owner consumed `bytes` more of a `credit: :manual` stream's DATA, so the peer
  may send that much more. Credit goes out in one WINDOW_UPDATE once half the stream's window is
  due, which keeps the peer busy while the consumer keeps up; credit beyond what was received is
  ignored (the peer never gets more than one window). Unknown, closed and `credit: :auto`
  streams: no-op.
  """
  @spec return_credit(t(), stream_id(), non_neg_integer()) :: {t(), iodata()}
  def return_credit(%__MODULE__{} = conn, sid, bytes) when is_integer(bytes) and bytes >= 0 do
    case conn.streams do
      %{^sid => %Stream{credit: :manual} = stream} when conn.state != :closed ->
        due = min(stream.unreturned + bytes, stream.window - stream.recv_window)
        {stream, out} = credit_stream(%{stream | unreturned: due})
        {put_stream(conn, stream), out}

      _ ->
        {conn, []}
    end
  end

  @doc """
  Bytes the peer may still send on stream `stream_id` before it needs our WINDOW_UPDATE, or `nil`
  when the stream is not open.
  """
  @spec receive_window(t(), stream_id()) :: non_neg_integer() | nil
  def receive_window(%__MODULE__{} = conn, stream_id) do
    case conn.streams do
      %{^stream_id => stream} -> stream.recv_window
      _ -> nil
    end
  end

  @doc "A PING carrying 8 opaque bytes; the ack arrives as a `{:pong, data}` event."
  @spec ping(t(), <<_::64>>) :: {t(), iodata()}
  def ping(%__MODULE__{} = conn, <<_::64>> = data), do: {conn, Frame.encode({:ping, data})}

  @doc "A GOAWAY telling the peer we are done (no streams of its own to report); the connection is closed."
  @spec close(t(), Frame.error_code(), binary()) :: {t(), iodata()}
  def close(%__MODULE__{} = conn, code \\ :no_error, debug \\ "") do
    {%{conn | state: :closed}, Frame.encode({:goaway, 0, code, debug})}
  end

  @doc "Whether stream `stream_id` is still open in either direction."
  @spec open?(t(), stream_id()) :: boolean()
  def open?(%__MODULE__{} = conn, stream_id), do: Map.has_key?(conn.streams, stream_id)

  @doc "Ids of the streams still open (either direction)."
  @spec open_streams(t()) :: [stream_id()]
  def open_streams(%__MODULE__{} = conn), do: Map.keys(conn.streams)

  @doc """
  Feeds received bytes (any split: partial frames are kept for the next call) and returns the
  events plus bytes to send (acks, window updates, newly unblocked request body).
  """
  @spec handle_data(t(), binary()) ::
          {:ok, t(), [event()], iodata()} | {:error, t(), error_reason(), iodata()}
  def handle_data(%__MODULE__{state: :closed} = conn, _bytes),
    do: {:error, conn, {:closed, "connection closed"}, []}

  def handle_data(%__MODULE__{} = conn, bytes) do
    read_frames(%{conn | buffer: conn.buffer <> bytes}, [], [])
  end

  defp read_frames(conn, events, out) do
    case Frame.decode(conn.buffer, conn.max_frame_size) do
      :more ->
        {conn, flushed} = flush(conn)
        {:ok, conn, Enum.reverse(events), [Enum.reverse(out) | flushed]}

      {:error, {code, message}} ->
        connection_error(conn, code, message, out)

      {:ok, frame, length, rest} ->
        conn = %{conn | buffer: rest}

        case handle_frame(conn, frame, length) do
          {:ok, conn, new_events, new_out} ->
            read_frames(conn, Enum.reverse(new_events, events), [new_out | out])

          {:error, code, message} ->
            connection_error(conn, code, message, out)
        end
    end
  end

  defp connection_error(conn, code, message, out) do
    goaway = Frame.encode({:goaway, 0, code, message})
    {:error, %{conn | state: :closed, buffer: <<>>}, {code, message}, [Enum.reverse(out), goaway]}
  end

  ## Frame handling. Each returns {:ok, conn, events, out} or {:error, code, message}.

  # While a header block is open only its CONTINUATIONs may arrive (§6.10).
  defp handle_frame(
         %{header_block: {sid, fragments, end_stream}} = conn,
         {:continuation, sid, fragment, flags},
         _
       ) do
    fragments = [fragments | fragment]

    cond do
      # An endless CONTINUATION run would grow memory without bound; HPACK output is never much
      # smaller than its input, so twice the header list limit is a safe ceiling.
      IO.iodata_length(fragments) > header_block_limit(conn) ->
        {:error, :enhance_your_calm,
         "header block on stream #{sid} exceeds the header list limit"}

      flags.end_headers ->
        header_block_done(
          %{conn | header_block: nil},
          sid,
          IO.iodata_to_binary(fragments),
          end_stream
        )

      true ->
        {:ok, %{conn | header_block: {sid, fragments, end_stream}}, [], []}
    end
  end

  defp handle_frame(%{header_block: {sid, _, _}}, _frame, _),
    do: {:error, :protocol_error, "expected CONTINUATION for stream #{sid}"}

  defp handle_frame(%{settings_received: false}, frame, _)
       when not is_tuple(frame) or elem(frame, 0) != :settings,
       do: {:error, :protocol_error, "server preface must start with SETTINGS"}

  defp handle_frame(conn, {:settings, settings}, _) do
    with {:ok, conn} <- apply_settings(conn, settings) do
      {:ok, %{conn | settings_received: true}, [], Frame.encode(:settings_ack)}
    end
  end

  defp handle_frame(conn, :settings_ack, _),
    do: {:ok, %{conn | unacked_settings: max(conn.unacked_settings - 1, 0)}, [], []}

  defp handle_frame(conn, {:ping, data}, _), do: {:ok, conn, [], Frame.encode({:ping_ack, data})}
  defp handle_frame(conn, {:ping_ack, data}, _), do: {:ok, conn, [{:pong, data}], []}

  defp handle_frame(conn, {:goaway, last_sid, code, debug}, _) do
    {refused, kept} = Enum.split_with(conn.streams, fn {sid, _} -> sid > last_sid end)
    resets = for {sid, _} <- Enum.sort(refused), do: {:reset, sid, :refused_stream}
    conn = %{conn | goaway: {last_sid, code, debug}, streams: Map.new(kept)}
    {:ok, conn, resets ++ [{:goaway, last_sid, code, debug}], []}
  end

  defp handle_frame(conn, {:rst_stream, sid, code}, _) do
    cond do
      idle?(conn, sid) ->
        {:error, :protocol_error, "RST_STREAM on idle stream #{sid}"}

      Map.has_key?(conn.streams, sid) ->
        {:ok, %{conn | streams: Map.delete(conn.streams, sid)}, [{:reset, sid, code}], []}

      true ->
        {:ok, conn, [], []}
    end
  end

  defp handle_frame(conn, {:window_update, 0, increment}, _) do
    window = conn.send_window + increment

    if window > @max_window,
      do: {:error, :flow_control_error, "connection send window overflow"},
      else: {:ok, %{conn | send_window: window}, [], []}
  end

  defp handle_frame(conn, {:window_update, sid, increment}, _) do
    case conn.streams do
      %{^sid => stream} when increment == 0 ->
        reset_stream(conn, stream, :protocol_error)

      %{^sid => stream} ->
        if stream.send_window + increment > @max_window,
          do: reset_stream(conn, stream, :flow_control_error),
          else:
            {:ok, put_stream(conn, %{stream | send_window: stream.send_window + increment}), [],
             []}

      _ ->
        if idle?(conn, sid),
          do: {:error, :protocol_error, "WINDOW_UPDATE on idle stream #{sid}"},
          else: {:ok, conn, [], []}
    end
  end

  defp handle_frame(conn, {:headers, sid, fragment, flags}, _) do
    cond do
      rem(sid, 2) == 0 -> {:error, :protocol_error, "server opened stream #{sid}"}
      idle?(conn, sid) -> {:error, :protocol_error, "HEADERS on idle stream #{sid}"}
      flags.end_headers -> header_block_done(conn, sid, fragment, flags.end_stream)
      true -> {:ok, %{conn | header_block: {sid, fragment, flags.end_stream}}, [], []}
    end
  end

  defp handle_frame(_conn, {:continuation, sid, _, _}, _),
    do: {:error, :protocol_error, "CONTINUATION without HEADERS on stream #{sid}"}

  defp handle_frame(_conn, {:push_promise, _, _, _, _}, _),
    do: {:error, :protocol_error, "PUSH_PROMISE received but push is disabled"}

  defp handle_frame(conn, {:data, sid, data, flags}, length) do
    cond do
      idle?(conn, sid) ->
        {:error, :protocol_error, "DATA on idle stream #{sid}"}

      length > conn.recv_window ->
        {:error, :flow_control_error, "DATA exceeds the connection receive window"}

      true ->
        conn = %{conn | recv_window: conn.recv_window - length}
        {conn, conn_credit} = credit_connection(conn)

        data_for_stream(
          conn,
          Map.get(conn.streams, sid),
          data,
          flags.end_stream,
          length,
          conn_credit
        )
    end
  end

  # PRIORITY is advisory and unknown frame types must be ignored.
  defp handle_frame(conn, {:priority, _, _}, _), do: {:ok, conn, [], []}
  defp handle_frame(conn, {:unknown, _, _, _, _}, _), do: {:ok, conn, [], []}

  # DATA for a stream we already closed or cancelled: counted on the connection only.
  defp data_for_stream(conn, nil, _data, _end_stream, _length, out), do: {:ok, conn, [], out}

  defp data_for_stream(conn, stream, data, end_stream, length, out) do
    if length > stream.recv_window do
      with {:ok, conn, events, rst} <- reset_stream(conn, stream, :flow_control_error),
           do: {:ok, conn, events, [out, rst]}
    else
      # Padding is never delivered, so it counts as consumed at once; so does all of the frame
      # for an :auto stream.
      consumed = if stream.credit == :auto, do: length, else: length - byte_size(data)

      stream = %{
        stream
        | recv_window: stream.recv_window - length,
          unreturned: stream.unreturned + consumed
      }

      event = {:data, stream.id, data, end_stream}

      if end_stream do
        {conn, rst} = close_remote(conn, stream)
        {:ok, conn, [event], [out, rst]}
      else
        {stream, credit} = credit_stream(stream)
        {:ok, put_stream(conn, stream), [event], [out, credit]}
      end
    end
  end

  # Give the window back once half of it is used: few WINDOW_UPDATEs, and the peer never waits.
  defp credit_connection(conn) do
    if conn.recv_window <= div(conn.connection_window, 2) do
      increment = conn.connection_window - conn.recv_window

      {%{conn | recv_window: conn.connection_window},
       Frame.encode({:window_update, 0, increment})}
    else
      {conn, []}
    end
  end

  defp credit_stream(stream) do
    if stream.unreturned > 0 and stream.unreturned >= div(stream.window, 2) do
      {%{stream | recv_window: stream.recv_window + stream.unreturned, unreturned: 0},
       Frame.encode({:window_update, stream.id, stream.unreturned})}
    else
      {stream, []}
    end
  end

  defp header_block_limit(%{decoder: %{max_header_list_size: :infinity}}), do: 16 * 1024 * 1024
  defp header_block_limit(%{decoder: %{max_header_list_size: limit}}), do: 2 * limit

  defp header_block_done(conn, sid, block, end_stream) do
    # Decode even for closed streams: the HPACK table must stay in sync with the peer's.
    case HPACK.decode(conn.decoder, block) do
      {:ok, headers, decoder} ->
        conn = %{conn | decoder: decoder}

        case conn.streams do
          %{^sid => stream} ->
            event = {:headers, sid, headers, end_stream}
            {conn, rst} = if end_stream, do: close_remote(conn, stream), else: {conn, []}
            {:ok, conn, [event], rst}

          _ ->
            {:ok, conn, [], []}
        end

      {:error, {:compression_error, reason}} ->
        {:error, :compression_error, "HPACK: #{inspect(reason)}"}
    end
  end

  # The response is complete. A server may answer before reading our whole body (§8.1): the rest
  # is dropped and the stream reset (CANCEL), so neither side keeps a half-open stream around.
  defp close_remote(conn, %Stream{local: :closed} = stream),
    do: {%{conn | streams: Map.delete(conn.streams, stream.id)}, []}

  defp close_remote(conn, stream) do
    {%{conn | streams: Map.delete(conn.streams, stream.id)},
     Frame.encode({:rst_stream, stream.id, :cancel})}
  end

  defp reset_stream(conn, stream, code) do
    conn = %{conn | streams: Map.delete(conn.streams, stream.id)}
    {:ok, conn, [{:reset, stream.id, code}], Frame.encode({:rst_stream, stream.id, code})}
  end

  defp apply_settings(conn, settings) do
    Enum.reduce_while(settings, {:ok, conn}, fn {name, value}, {:ok, conn} ->
      case apply_setting(conn, name, value) do
        {:ok, conn} -> {:cont, {:ok, conn}}
        error -> {:halt, error}
      end
    end)
  end

  defp apply_setting(conn, :initial_window_size, value) do
    # A new initial window shifts every open stream's send window by the difference (§6.9.2).
    delta = value - conn.peer.initial_window_size

    if Enum.any?(conn.streams, fn {_, s} -> s.send_window + delta > @max_window end) do
      {:error, :flow_control_error, "SETTINGS_INITIAL_WINDOW_SIZE overflows a stream window"}
    else
      streams =
        Map.new(conn.streams, fn {sid, s} -> {sid, %{s | send_window: s.send_window + delta}} end)

      {:ok, %{conn | streams: streams, peer: %{conn.peer | initial_window_size: value}}}
    end
  end

  defp apply_setting(conn, :header_table_size, value) do
    {:ok,
     %{
       conn
       | encoder: HPACK.set_max_table_size(conn.encoder, value),
         peer: %{conn.peer | header_table_size: value}
     }}
  end

  defp apply_setting(conn, :enable_push, _value), do: {:ok, conn}

  defp apply_setting(conn, name, value),
    do: {:ok, %{conn | peer: Map.put(conn.peer, name, value)}}

  ## Sending

  defp header_frames(sid, block, end_stream, max) when byte_size(block) <= max do
    Frame.encode({:headers, sid, block, %{end_stream: end_stream, end_headers: true}})
  end

  defp header_frames(sid, block, end_stream, max) do
    <<first::binary-size(max), rest::binary>> = block

    [
      Frame.encode({:headers, sid, first, %{end_stream: end_stream, end_headers: false}})
      | continuations(sid, rest, max)
    ]
  end

  defp continuations(sid, block, max) when byte_size(block) <= max,
    do: [Frame.encode({:continuation, sid, block, %{end_headers: true}})]

  defp continuations(sid, block, max) do
    <<chunk::binary-size(max), rest::binary>> = block

    [
      Frame.encode({:continuation, sid, chunk, %{end_headers: false}})
      | continuations(sid, rest, max)
    ]
  end

  # Sends buffered body for every stream (lowest id first) as far as the windows allow.
  defp flush(%{state: :closed} = conn), do: {conn, []}

  defp flush(conn) do
    conn.streams
    |> Map.keys()
    |> Enum.sort()
    |> Enum.reduce({conn, []}, fn sid, {conn, out} ->
      case conn.streams[sid] do
        %Stream{local: local, pending: pending} = stream
        when local == :ending or pending != <<>> ->
          {conn, stream, frames} = flush_stream(conn, stream, [])
          {put_stream(conn, stream), [out | frames]}

        _ ->
          {conn, out}
      end
    end)
  end

  defp flush_stream(conn, %Stream{pending: <<>>, local: :ending} = stream, acc) do
    # An empty DATA frame carrying END_STREAM does not consume flow-control window.
    frame = Frame.encode({:data, stream.id, <<>>, %{end_stream: true}})
    {conn, %{stream | local: :closed}, Enum.reverse([frame | acc])}
  end

  defp flush_stream(conn, %Stream{pending: <<>>} = stream, acc),
    do: {conn, stream, Enum.reverse(acc)}

  defp flush_stream(conn, stream, acc) do
    size =
      Enum.min([
        byte_size(stream.pending),
        conn.send_window,
        stream.send_window,
        conn.peer.max_frame_size
      ])

    if size <= 0 do
      {conn, stream, Enum.reverse(acc)}
    else
      <<chunk::binary-size(size), rest::binary>> = stream.pending
      last = rest == <<>> and stream.local == :ending
      frame = Frame.encode({:data, stream.id, chunk, %{end_stream: last}})

      stream = %{
        stream
        | pending: rest,
          send_window: stream.send_window - size,
          local: if(last, do: :closed, else: stream.local)
      }

      conn = %{conn | send_window: conn.send_window - size}

      if last,
        do: {conn, stream, Enum.reverse([frame | acc])},
        else: flush_stream(conn, stream, [frame | acc])
    end
  end

  defp put_stream(conn, stream), do: %{conn | streams: Map.put(conn.streams, stream.id, stream)}

  # A client stream id we have not opened yet (§5.1: frames on idle streams are protocol errors).
  defp idle?(conn, sid), do: rem(sid, 2) == 1 and sid >= conn.next_stream_id
end
