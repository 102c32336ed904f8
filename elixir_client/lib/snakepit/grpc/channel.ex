defmodule Snakepit.GRPC.Channel do
  @moduledoc """
  One HTTP/2 connection to a gRPC server (TCP or a Unix socket), shared by many concurrent calls.

  The process owns the socket (`:gen_tcp`, binary, active-once) and a `Snakepit.HTTP2.Conn`. Calls
  never block it: `unary/4` callers wait in their own process and get an asynchronous reply when
  their stream ends; `server_stream/4` callers receive messages as they arrive:

      {:snakepit_grpc, ref, {:message, binary}}   # zero or more
      {:snakepit_grpc, ref, :done}                # or
      {:snakepit_grpc, ref, {:error, %Snakepit.GRPC.Error{}}}

  A server stream opened with `:window` has backpressure: the caller acknowledges each message it
  takes with `ack/3`, and the server may be at most `:window` bytes of messages ahead of those
  acknowledgements (HTTP/2 stream credit is withheld until then), so a slow consumer slows the
  server instead of filling its mailbox. Other calls on the connection are not held up by it:
  connection-level credit is always returned as data arrives, and what a stream may buffer is
  bounded by its own window.

  Deadlines (`:timeout`, default 30 s) are sent as `grpc-timeout` and enforced here: on expiry the
  stream is reset with CANCEL and the call fails with `:deadline_exceeded`. Callers are monitored;
  a caller that dies mid-call gets its stream cancelled. When the server's
  SETTINGS_MAX_CONCURRENT_STREAMS is reached, further calls wait in a FIFO inside the channel
  (their deadline keeps running) and start as streams finish.

  When the connection drops, the server sends GOAWAY, or the HTTP/2 layer sees a protocol error,
  every open call fails with `:unavailable` and the process stops with `{:shutdown, reason}`
  (owners watch it with a link or monitor).
  """

  use GenServer

  alias Snakepit.GRPC.{Call, Error, Message, Metadata}
  alias Snakepit.HTTP2.Conn

  @default_timeout 30_000
  # Every stream starts at HTTP/2's default window (so it is the smallest `:window`); calls
  # without backpressure get a large one at once, so big responses flow at full speed.
  @initial_window 65_535
  @auto_window 4 * 1024 * 1024
  # On the wire each gRPC message follows a flag byte and a 4-byte length.
  @message_prefix 5
  # Extra time a blocked unary caller waits beyond its deadline for the channel's own reply.
  @reply_grace 5_000

  @type server :: GenServer.server()
  @type call_opts :: [
          timeout: non_neg_integer() | :infinity,
          metadata: [{String.t(), iodata()}],
          window: pos_integer() | nil
        ]

  ## API

  @doc """
  Connects and starts the channel. Options: `:host` (`"127.0.0.1"`, a charlist/tuple address, or
  `{:local, path}` for a Unix socket), `:port`, `:connect_timeout` (ms, default 5000), `:metadata`
  (headers sent on every call), `:name`, `:max_message_size` (largest message received, default
  64 MiB).

  The connection is made synchronously; the HTTP/2 SETTINGS exchange completes in the background.
  The process is started unlinked and linked once connected, so a failed connect returns
  `{:error, reason}` without sending an exit signal to the caller.
  """
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts) do
    connect_timeout = Keyword.get(opts, :connect_timeout, 5000)
    gen_opts = if name = opts[:name], do: [name: name], else: []

    case GenServer.start(__MODULE__, opts, [timeout: connect_timeout + 5000] ++ gen_opts) do
      {:ok, pid} ->
        Process.link(pid)
        {:ok, pid}

      other ->
        other
    end
  end

  @doc """
  Makes a unary call: `path` is `"/package.Service/Method"`, `request` the serialized message.
  Returns the serialized response and the trailers (`-bin` values decoded).

  Options: `:timeout` (ms or `:infinity`, default 30000) and `:metadata` (extra headers).
  """
  @spec unary(server(), String.t(), iodata(), call_opts()) ::
          {:ok, binary(), [{String.t(), binary()}]} | {:error, Error.t()}
  def unary(server, path, request, opts \\ []) do
    timeout = Keyword.get(opts, :timeout, @default_timeout)
    wait = if timeout == :infinity, do: :infinity, else: timeout + @reply_grace

    try do
      GenServer.call(server, {:unary, path, request, opts}, wait)
    catch
      :exit, {:timeout, _} ->
        {:error, Error.new(:deadline_exceeded, "no reply from the channel within #{timeout} ms")}

      :exit, reason ->
        {:error,
         Error.new(:unavailable, "channel is not running: #{inspect(exit_reason(reason))}")}
    end
  end

  @doc """
  Starts a server-streaming call; messages are sent to the calling process (see the moduledoc).
  Same options as `unary/4`; the deadline covers the whole stream.

  `:window` (bytes, at least 65_535; default `nil`, no backpressure) turns on backpressure: the
  caller must `ack/3` every message it takes, and the server is held once `:window` bytes of
  messages (5 bytes of gRPC framing each included) are unacknowledged. A message larger than the
  window is still let through whole. Without `:window` credit is returned as data arrives and
  messages queue in the caller's mailbox as fast as the server sends them.
  """
  @spec server_stream(server(), String.t(), iodata(), call_opts()) ::
          {:ok, reference()} | {:error, Error.t()}
  def server_stream(server, path, request, opts \\ []) do
    case Keyword.get(opts, :window) do
      window when is_nil(window) or (is_integer(window) and window > 0) ->
        :ok

      other ->
        raise ArgumentError, ":window must be nil or a positive integer, got #{inspect(other)}"
    end

    # The channel answers as soon as the stream is open; the long timeout only guards a wedged one.
    GenServer.call(server, {:server_stream, path, request, opts}, 60_000)
  catch
    :exit, reason ->
      {:error, Error.new(:unavailable, "channel is not running: #{inspect(exit_reason(reason))}")}
  end

  @doc """
  Tells the channel that the caller took `count` more messages of the `:window` server stream
  `ref`, so the server may send as many bytes more. Asynchronous; ignored for other calls and for
  calls that are over.
  """
  @spec ack(server(), reference(), pos_integer()) :: :ok
  def ack(server, ref, count \\ 1) when is_integer(count) and count > 0,
    do: GenServer.cast(server, {:ack, ref, count})

  @doc """
  Cancels a server stream (RST_STREAM CANCEL). No further messages for `ref` are delivered, and
  those already in the caller's mailbox are flushed when the caller is the stream's receiver.
  """
  @spec cancel(server(), reference()) :: :ok
  def cancel(server, ref) do
    try do
      GenServer.call(server, {:cancel, ref})
    catch
      :exit, _ -> :ok
    end

    flush_messages(ref)
  end

  defp flush_messages(ref) do
    receive do
      {:snakepit_grpc, ^ref, _} -> flush_messages(ref)
    after
      0 -> :ok
    end
  end

  @doc "Fails open calls with `:unavailable`, sends GOAWAY, closes the socket and stops."
  @spec close(server()) :: :ok
  def close(server) do
    GenServer.call(server, :close)
  catch
    :exit, _ -> :ok
  end

  defp exit_reason({reason, {GenServer, :call, _}}), do: reason
  defp exit_reason(reason), do: reason

  ## Server

  @impl true
  def init(opts) do
    host = Keyword.get(opts, :host, "127.0.0.1")
    port = Keyword.get(opts, :port, 0)
    connect_timeout = Keyword.get(opts, :connect_timeout, 5000)
    {address, authority} = address(host, port)

    case :gen_tcp.connect(
           address,
           port_for(host, port),
           socket_options(host),
           connect_timeout
         ) do
      {:ok, socket} ->
        {conn, preface} = Conn.new(initial_window_size: @initial_window)

        case :gen_tcp.send(socket, preface) do
          :ok ->
            :ok = :inet.setopts(socket, active: :once)

            {:ok,
             %{
               socket: socket,
               conn: conn,
               authority: authority,
               metadata: Keyword.get(opts, :metadata, []),
               max_message_size: Keyword.get(opts, :max_message_size, 64 * 1024 * 1024),
               # ref => call entry; stream id => ref; monitor ref => ref
               calls: %{},
               streams: %{},
               monitors: %{},
               # refs of calls waiting for a stream slot (server's MAX_CONCURRENT_STREAMS), FIFO
               waiting: :queue.new(),
               # WINDOW_UPDATEs for backpressured streams, sent with the reply to the bytes read
               credit_out: []
             }}

          {:error, reason} ->
            :gen_tcp.close(socket)
            {:stop, reason}
        end

      {:error, reason} ->
        {:stop, reason}
    end
  end

  defp address({:local, path}, _port), do: {{:local, path}, "localhost"}
  defp address(host, port) when is_binary(host), do: {String.to_charlist(host), "#{host}:#{port}"}
  defp address(host, port) when is_list(host), do: {host, "#{host}:#{port}"}
  defp address(host, port) when is_tuple(host), do: {host, "#{:inet.ntoa(host)}:#{port}"}

  defp port_for({:local, _}, _port), do: 0
  defp port_for(_host, port), do: port

  # A peer that stops reading must not block the channel forever: sends time out and close the
  # socket, which fails every call with :unavailable. TCP_NODELAY does not apply to Unix sockets.
  defp socket_options(host) do
    # A large user-level buffer lets one {:tcp, ...} message carry many frames (the default, about
    # one MTU, costs a message and a setopts per 1.4 KB on big responses).
    base = [
      :binary,
      active: false,
      send_timeout: 30_000,
      send_timeout_close: true,
      buffer: 256 * 1024,
      recbuf: 256 * 1024,
      sndbuf: 256 * 1024
    ]

    if match?({:local, _}, host), do: base, else: [{:nodelay, true} | base]
  end

  @impl true
  def handle_call({kind, path, request, opts}, {pid, _} = from, state)
      when kind in [:unary, :server_stream] do
    timeout = Keyword.get(opts, :timeout, @default_timeout)
    metadata = state.metadata ++ Keyword.get(opts, :metadata, [])
    ref = make_ref()

    entry = %{
      kind: kind,
      from: from,
      pid: pid,
      ref: ref,
      sid: nil,
      monitor: Process.monitor(pid),
      timer: if(timeout != :infinity, do: Process.send_after(self(), {:deadline, ref}, timeout)),
      timeout: timeout,
      headers: Metadata.request_headers(state.authority, path, timeout, metadata),
      body: Message.encode(request),
      call: Call.new(max_message_size: state.max_message_size),
      messages: [],
      # Backpressure (server streams with :window): the wire sizes of the messages delivered but
      # not acknowledged yet, their total, and the DATA bytes received whose credit is withheld.
      window: if(kind == :server_stream, do: Keyword.get(opts, :window)),
      unacked: :queue.new(),
      held: 0,
      unreleased: 0
    }

    state = %{
      state
      | calls: Map.put(state.calls, ref, entry),
        monitors: Map.put(state.monitors, entry.monitor, ref)
    }

    # Calls queued earlier go first, so a new call never overtakes them.
    result =
      if :queue.is_empty(state.waiting),
        do: open_stream(state, ref),
        else: {:ok, %{state | waiting: :queue.in(ref, state.waiting)}}

    case {result, kind} do
      {{:ok, state}, :unary} -> {:noreply, state}
      {{:ok, state}, :server_stream} -> {:reply, {:ok, ref}, state}
      {{:stop, reason, state}, :unary} -> {:stop, reason, state}
      {{:stop, reason, state}, :server_stream} -> {:stop, reason, {:ok, ref}, state}
    end
  end

  def handle_call({:cancel, ref}, _from, state) do
    case Map.fetch(state.calls, ref) do
      {:ok, entry} -> reply_after(drop_call(state, entry), :ok)
      :error -> {:reply, :ok, state}
    end
  end

  def handle_call(:close, _from, state) do
    state = fail_all(state, "channel closed")
    {conn, out} = Conn.close(state.conn)
    _ = :gen_tcp.send(state.socket, out)
    :gen_tcp.close(state.socket)
    {:stop, :normal, :ok, %{state | conn: conn, socket: nil}}
  end

  defp reply_after({:ok, state}, reply), do: {:reply, reply, state}
  defp reply_after({:stop, reason, state}, reply), do: {:stop, reason, reply, state}

  @impl true
  def handle_cast({:ack, ref, count}, state) do
    case Map.fetch(state.calls, ref) do
      {:ok, %{window: window, sid: sid} = entry} when window != nil and sid != nil ->
        {bytes, unacked} = dequeue_sizes(entry.unacked, count, 0)

        {state, out} =
          release_credit(state, %{entry | unacked: unacked, held: entry.held - bytes})

        noreply(send_out(state, out))

      _ ->
        {:noreply, state}
    end
  end

  defp dequeue_sizes(queue, 0, bytes), do: {bytes, queue}

  defp dequeue_sizes(queue, count, bytes) do
    case :queue.out(queue) do
      {{:value, size}, rest} -> dequeue_sizes(rest, count - 1, bytes + size)
      {:empty, queue} -> {bytes, queue}
    end
  end

  @impl true
  def handle_info({:tcp, socket, bytes}, %{socket: socket} = state) do
    case Conn.handle_data(state.conn, bytes) do
      {:ok, conn, events, out} ->
        state = Enum.reduce(events, %{state | conn: conn, credit_out: []}, &handle_event/2)

        with {:ok, state} <- send_out(state, [out | state.credit_out]),
             {:ok, state} <- start_waiting(state) do
          case state.conn.goaway do
            nil ->
              :ok = :inet.setopts(socket, active: :once)
              {:noreply, state}

            {_last, code, debug} ->
              message =
                "server sent GOAWAY (#{inspect(code)}#{if debug != "", do: ": " <> debug})"

              shutdown(state, message, {:goaway, code})
          end
        end

      {:error, conn, {code, message}, out} ->
        _ = :gen_tcp.send(socket, out)
        state = %{state | conn: conn}
        shutdown(state, "HTTP/2 connection error #{code}: #{message}", {:http2_error, code})
    end
  end

  def handle_info({:tcp_closed, socket}, %{socket: socket} = state),
    do: shutdown(%{state | socket: nil}, "connection closed by the server", :closed)

  def handle_info({:tcp_error, socket, reason}, %{socket: socket} = state),
    do: shutdown(state, "connection error: #{inspect(reason)}", {:tcp_error, reason})

  def handle_info({:deadline, ref}, state) do
    case Map.fetch(state.calls, ref) do
      {:ok, entry} ->
        error = Error.new(:deadline_exceeded, "deadline of #{entry.timeout} ms exceeded")
        deliver(entry, {:error, error})
        noreply(drop_call(state, entry))

      :error ->
        {:noreply, state}
    end
  end

  def handle_info({:DOWN, monitor, :process, _pid, _reason}, state) do
    with {:ok, ref} <- Map.fetch(state.monitors, monitor),
         {:ok, entry} <- Map.fetch(state.calls, ref) do
      noreply(drop_call(state, entry))
    else
      :error -> {:noreply, state}
    end
  end

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    if state.socket, do: :gen_tcp.close(state.socket)
    :ok
  end

  defp noreply({:ok, state}), do: {:noreply, state}
  defp noreply({:stop, reason, state}), do: {:stop, reason, state}

  ## Internals

  # Opens the HTTP/2 stream for a registered call, or queues the call when the server's stream
  # limit is reached.
  defp open_stream(state, ref) do
    entry = Map.fetch!(state.calls, ref)

    flow =
      if entry.window,
        do: [receive_window: entry.window, credit: :manual],
        else: [receive_window: @auto_window]

    case Conn.request(state.conn, entry.headers, entry.body, flow) do
      {:ok, conn, sid, out} ->
        # The request is on its way; drop its copy so big bodies are not kept twice.
        entry = %{entry | sid: sid, headers: nil, body: nil}

        state = %{
          state
          | conn: conn,
            calls: Map.put(state.calls, ref, entry),
            streams: Map.put(state.streams, sid, ref)
        }

        send_out(state, out)

      {:error, conn, :too_many_streams} ->
        {:ok, %{state | conn: conn, waiting: :queue.in(ref, state.waiting)}}

      {:error, conn, reason} ->
        state = %{state | conn: conn}
        deliver(entry, {:error, request_error(reason)})
        {:ok, forget(state, entry)}
    end
  end

  # Starts queued calls while stream slots are free.
  defp start_waiting(state) do
    case :queue.out(state.waiting) do
      {:empty, _} ->
        {:ok, state}

      {{:value, ref}, rest} ->
        before = :queue.len(rest)

        case open_stream(%{state | waiting: rest}, ref) do
          # Put back at the end by open_stream: still no slot; restore the order and stop.
          {:ok, %{waiting: waiting} = state} when is_tuple(waiting) ->
            if :queue.len(waiting) > before,
              do: {:ok, %{state | waiting: :queue.in_r(ref, rest)}},
              else: start_waiting(state)

          stop ->
            stop
        end
    end
  end

  defp request_error(:goaway),
    do: Error.new(:unavailable, "connection is going away (GOAWAY received)")

  defp request_error(reason),
    do: Error.new(:unavailable, "cannot start a stream: #{inspect(reason)}")

  defp handle_event({:goaway, _last, _code, _debug}, state), do: state
  defp handle_event({:pong, _}, state), do: state

  defp handle_event(event, state) do
    sid = elem(event, 1)

    with {:ok, ref} <- Map.fetch(state.streams, sid),
         {:ok, entry} <- Map.fetch(state.calls, ref) do
      case Call.handle_event(entry.call, event) do
        {:cont, call, messages} ->
          entry = push_messages(%{entry | call: call}, messages)

          if entry.window do
            entry = %{entry | unreleased: entry.unreleased + data_size(event)}
            {state, out} = release_credit(state, entry)
            %{state | credit_out: [state.credit_out | out]}
          else
            %{state | calls: Map.put(state.calls, ref, entry)}
          end

        {:done, _call, messages, outcome} ->
          entry |> push_messages(messages) |> deliver(outcome)
          state = forget(state, entry)

          # A non-200 response may leave the stream open on the HTTP/2 side: reset it.
          if Conn.open?(state.conn, sid) do
            {conn, out} = Conn.cancel(state.conn, sid)
            _ = :gen_tcp.send(state.socket, out)
            %{state | conn: conn}
          else
            state
          end
      end
    else
      :error -> state
    end
  end

  defp push_messages(entry, []), do: entry

  defp push_messages(%{kind: :server_stream} = entry, messages) do
    Enum.each(messages, &send(entry.pid, {:snakepit_grpc, entry.ref, {:message, &1}}))

    if entry.window do
      Enum.reduce(messages, entry, fn message, entry ->
        size = byte_size(message) + @message_prefix
        %{entry | unacked: :queue.in(size, entry.unacked), held: entry.held + size}
      end)
    else
      entry
    end
  end

  defp push_messages(%{kind: :unary} = entry, messages),
    do: %{entry | messages: entry.messages ++ messages}

  defp data_size({:data, _sid, data, _end_stream}), do: byte_size(data)
  defp data_size(_event), do: 0

  # Credits a backpressured stream with every received byte that is not part of a message waiting
  # for its acknowledgement: the bytes of acknowledged messages, and those of a message still being
  # received (so a message larger than the window can complete). Credit given early for the start
  # of a message is made up for by withholding its end.
  defp release_credit(state, entry) do
    due = entry.unreleased - entry.held

    {conn, out, entry} =
      if due > 0 do
        {conn, out} = Conn.return_credit(state.conn, entry.sid, due)
        {conn, out, %{entry | unreleased: entry.unreleased - due}}
      else
        {state.conn, [], entry}
      end

    {%{state | conn: conn, calls: Map.put(state.calls, entry.ref, entry)}, out}
  end

  defp deliver(%{kind: :unary} = entry, {:ok, trailers}) do
    reply =
      case entry.messages do
        [message] ->
          {:ok, message, trailers}

        messages ->
          {:error,
           Error.new(
             :internal,
             "unary response carried #{length(messages)} messages, expected 1",
             trailers
           )}
      end

    GenServer.reply(entry.from, reply)
  end

  defp deliver(%{kind: :unary} = entry, {:error, error}),
    do: GenServer.reply(entry.from, {:error, error})

  defp deliver(%{kind: :server_stream} = entry, {:ok, _}),
    do: send(entry.pid, {:snakepit_grpc, entry.ref, :done})

  defp deliver(%{kind: :server_stream} = entry, {:error, error}),
    do: send(entry.pid, {:snakepit_grpc, entry.ref, {:error, error}})

  # Removes a call from every index (its stream, if any, is left to the caller of forget/2).
  defp forget(state, entry) do
    if entry.timer, do: Process.cancel_timer(entry.timer)
    Process.demonitor(entry.monitor, [:flush])

    %{
      state
      | calls: Map.delete(state.calls, entry.ref),
        streams: if(entry.sid, do: Map.delete(state.streams, entry.sid), else: state.streams),
        monitors: Map.delete(state.monitors, entry.monitor),
        waiting: if(entry.sid, do: state.waiting, else: :queue.delete(entry.ref, state.waiting))
    }
  end

  # Drops a call without delivering anything more: resets its stream, or takes it off the queue.
  defp drop_call(state, entry) do
    state = forget(state, entry)

    if entry.sid do
      {conn, out} = Conn.cancel(state.conn, entry.sid)

      with {:ok, state} <- send_out(%{state | conn: conn}, out), do: start_waiting(state)
    else
      {:ok, state}
    end
  end

  defp send_out(state, out) do
    if IO.iodata_length(out) == 0 do
      {:ok, state}
    else
      case :gen_tcp.send(state.socket, out) do
        :ok ->
          {:ok, state}

        {:error, reason} ->
          shutdown(state, "send failed: #{inspect(reason)}", {:send_failed, reason})
      end
    end
  end

  defp shutdown(state, message, reason) do
    state = fail_all(state, message)
    if state.socket, do: :gen_tcp.close(state.socket)
    {:stop, {:shutdown, reason}, %{state | socket: nil}}
  end

  # Fails every call, open or waiting, in the order they were made (stream ids, then the queue).
  defp fail_all(state, message) do
    entries = Map.values(state.calls)
    {open, queued} = Enum.split_with(entries, & &1.sid)

    order =
      Enum.sort_by(open, & &1.sid) ++ Enum.sort_by(queued, &queue_position(state.waiting, &1.ref))

    Enum.reduce(order, state, fn entry, state ->
      deliver(entry, {:error, Error.new(:unavailable, message)})
      forget(state, entry)
    end)
  end

  defp queue_position(queue, ref), do: Enum.find_index(:queue.to_list(queue), &(&1 == ref))
end
