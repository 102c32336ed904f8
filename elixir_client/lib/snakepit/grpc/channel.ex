defmodule Snakepit.GRPC.Channel do
  @moduledoc """
  One HTTP/2 connection to a gRPC server (TCP, TLS over TCP, or a Unix socket), shared by many
  concurrent calls.

  The process owns the socket (`:gen_tcp`, or `:ssl` with `:tls`: a `Snakepit.GRPC.Transport`,
  binary, active-once) and a `Snakepit.HTTP2.Conn`. Calls
  never block it: every call, unary or streaming, is started with `start_call/4`, and the channel
  sends what its stream brings to the calling process as it arrives:

      {:snakepit_grpc, ref, {:message, binary}}        # zero or more
      {:snakepit_grpc, ref, {:done, trailers}}         # or
      {:snakepit_grpc, ref, {:error, %Snakepit.GRPC.Error{}}}

  The caller takes them with `next/1`, the one receive of every call: it also notices the channel
  going down and a deadline the channel could not enforce. `collect/1` (what `unary/4` is) takes
  the one message of a unary call; a streaming caller calls `next/1` until the call ends.
  `server_stream/4` starts a call whose messages the caller receives itself.

  A call started with `:window` has backpressure: each message taken counts as acknowledged
  (`next/1` does it; `ack/3` otherwise), and the server may be at most `:window` bytes of messages
  ahead of those acknowledgements (HTTP/2 stream credit is withheld until then), so a slow consumer
  slows the server instead of filling its mailbox. Other calls on the connection are not held up by
  it: connection-level credit is always returned as data arrives, and what a stream may buffer is
  bounded by its own window.

  Deadlines (`:timeout`, default 30 s) are sent as `grpc-timeout` and enforced here: on expiry the
  stream is reset with CANCEL and the call fails with `:deadline_exceeded`. Callers are monitored;
  a caller that dies mid-call gets its stream cancelled. When the server's
  SETTINGS_MAX_CONCURRENT_STREAMS is reached, further calls wait in a FIFO inside the channel
  (their deadline keeps running) and start as streams finish.

  ## GOAWAY: draining

  When the server sends GOAWAY (it is shutting down, or will close the connection) the channel
  *drains* (`connection_state/1` is `:draining`): streams the server accepted (ids up to the
  GOAWAY's last stream id) run to their end; streams above it, and calls still waiting for a
  stream slot, fail at once with `:unavailable`: the server never saw them, so they are safe to
  retry elsewhere; new calls are refused at once with `:unavailable`. The owner (the process that
  started the channel, or `:owner`) is sent `{:snakepit_grpc_draining, channel, {:goaway, code}}`
  so it can stop routing calls here. Once its last call ends (or `:drain_timeout` passes, when the
  calls left fail with `:unavailable`) the channel closes and stops with
  `{:shutdown, {:goaway, code}}`.

  When the connection drops or the HTTP/2 layer sees a protocol error, every open call fails with
  `:unavailable` (`connection_lost: true`) and the process stops with `{:shutdown, reason}` (owners
  watch it with a link or monitor).
  """

  use GenServer

  alias Snakepit.GRPC.{Call, Error, Message, Metadata, Transport}
  alias Snakepit.HTTP2.Conn

  @default_timeout 30_000
  # Every stream starts at HTTP/2's default window (so it is the smallest `:window`); calls
  # without backpressure get a large one at once, so big responses flow at full speed.
  @initial_window 65_535
  @auto_window 4 * 1024 * 1024
  # On the wire each gRPC message follows a flag byte and a 4-byte length.
  @message_prefix 5
  # Extra time a caller waits beyond its deadline for the channel's own deadline error.
  @reply_grace 5_000
  # How long a draining channel (GOAWAY received) waits for its open calls to end.
  @drain_timeout 30_000

  @type server :: GenServer.server()
  @type start_opt ::
          {:host, String.t() | charlist() | :inet.ip_address() | {:local, Path.t()}}
          | {:port, :inet.port_number()}
          | {:connect_timeout, timeout()}
          | {:metadata, [{String.t(), iodata()}]}
          | {:name, GenServer.name()}
          | {:max_message_size, pos_integer()}
          | {:owner, pid() | nil}
          | {:drain_timeout, non_neg_integer()}
          | {:tls, Transport.tls_opts() | nil}
  @type call_opts :: [
          timeout: non_neg_integer() | :infinity,
          metadata: [{String.t(), iodata()}],
          window: pos_integer() | nil,
          kind: :unary | :server_stream
        ]
  @type trailers :: [{String.t(), binary()}]
  @type event :: {:message, binary()} | {:done, trailers()} | {:error, Error.t()}

  defmodule Handle do
    @moduledoc """
    A call started with `Snakepit.GRPC.Channel.start_call/4`, as its caller holds it: the channel,
    the call's ref, the caller's monitor of the channel, and the time (monotonic ms) after which the
    caller stops waiting for the channel's own deadline error.
    """
    @enforce_keys [:channel, :ref, :monitor, :deadline, :timeout, :window]
    defstruct @enforce_keys

    @type t :: %__MODULE__{
            channel: pid(),
            ref: reference(),
            monitor: reference(),
            deadline: integer() | :infinity,
            timeout: non_neg_integer() | :infinity,
            window: pos_integer() | nil
          }
  end

  ## API

  @doc """
  Connects and starts the channel. Options: `:host` (`"127.0.0.1"`, a charlist/tuple address, or
  `{:local, path}` for a Unix socket), `:port`, `:connect_timeout` (ms, default 5000), `:metadata`
  (headers sent on every call), `:name`, `:max_message_size` (largest message received, default
  64 MiB), `:owner` (the process told when the channel starts draining, default the caller),
  `:drain_timeout` (ms a draining channel waits for its open calls, default 30000), and `:tls`.

  `:tls` (a keyword list, `t:Snakepit.GRPC.Transport.tls_opts/0`; absent or `nil`: plaintext)
  connects with TLS through OTP's `:ssl`, for a server started with `--tls-cert/--tls-key`:

      Channel.start_link(host: "10.0.0.5", port: 50052,
        tls: [cacertfile: "ca.pem", certfile: "client.pem", keyfile: "client-key.pem"])

  The server's certificate must chain to `:cacertfile` (default: the OS's CA store) and carry the
  host's name (or `:server_name`); ALPN must pick `h2`; `:certfile`/`:keyfile` present a client
  certificate (mTLS, a server with `--tls-client-ca`). Any of these failing, or the server refusing
  this client's certificate (or its lack), is `{:error, {:tls, message}}` from `start_link/1`, the
  message saying which. `plaintext_warning?/2` tells whether a connection without TLS leaves the
  machine. TLS over a Unix socket is refused (`{:error, {:tls, _}}`), as the Python server does.

  The connection is made synchronously; over plain TCP the HTTP/2 SETTINGS exchange completes in
  the background, over TLS the server's first bytes are awaited (so a refused client certificate
  shows here). The process is started unlinked and linked once connected, so a failed connect
  returns `{:error, reason}` without sending an exit signal to the caller.
  """
  @spec start_link([start_opt()]) :: GenServer.on_start()
  def start_link(opts) do
    connect_timeout = Keyword.get(opts, :connect_timeout, 5000)
    gen_opts = if name = opts[:name], do: [name: name], else: []
    opts = Keyword.put_new(opts, :owner, self())

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
          {:ok, binary(), trailers()} | {:error, Error.t()}
  def unary(server, path, request, opts \\ []) do
    with {:ok, call} <- start_call(server, path, request, Keyword.put(opts, :kind, :unary)),
         do: collect(call)
  end

  @doc """
  Starts a call; what its stream brings is sent to the calling process (see the moduledoc) and
  taken with `next/1` (or `collect/1`). Returns at once, when the stream is open or queued for a
  stream slot; `{:error, %Error{status: :unavailable}}` when the channel is not running or drains.

  Options: `:timeout` (ms or `:infinity`, default 30000: covers the whole call), `:metadata` (extra
  headers), `:kind` (`:unary` or `:server_stream`, the default; only shown in the channel's state)
  and `:window` (bytes, at least 65_535; default `nil`, no backpressure), which turns on
  backpressure: every message taken must be acknowledged (`next/1` does it), and the server is held
  once `:window` bytes of messages (5 bytes of gRPC framing each included) are unacknowledged. A
  message larger than the window is still let through whole. Without `:window` credit is returned
  as data arrives and messages queue in the caller's mailbox as fast as the server sends them.
  """
  @spec start_call(server(), String.t(), iodata(), call_opts()) ::
          {:ok, Handle.t()} | {:error, Error.t()}
  def start_call(server, path, request, opts \\ []) do
    window = Keyword.get(opts, :window)

    unless is_nil(window) or (is_integer(window) and window > 0),
      do:
        raise(ArgumentError, ":window must be nil or a positive integer, got #{inspect(window)}")

    timeout = Keyword.get(opts, :timeout, @default_timeout)

    case GenServer.whereis(server) do
      pid when is_pid(pid) ->
        # Monitored first, so a channel that goes down at any point after this is noticed.
        monitor = Process.monitor(pid)

        try do
          # The channel answers at once; the long timeout only guards a wedged one.
          GenServer.call(pid, {:start_call, path, request, opts}, 60_000)
        catch
          :exit, reason ->
            Process.demonitor(monitor, [:flush])
            {:error, not_running(exit_reason(reason))}
        else
          {:ok, ref} ->
            {:ok,
             %Handle{
               channel: pid,
               ref: ref,
               monitor: monitor,
               deadline: give_up_at(timeout),
               timeout: timeout,
               window: window
             }}

          {:error, _} = refused ->
            Process.demonitor(monitor, [:flush])
            refused
        end

      _ ->
        {:error, not_running(:noproc)}
    end
  end

  defp give_up_at(:infinity), do: :infinity
  defp give_up_at(timeout), do: System.monotonic_time(:millisecond) + timeout + @reply_grace

  @doc """
  Takes the next event of a call: `{:message, binary}`, or how it ended, `{:done, trailers}` or
  `{:error, %Error{}}`; call it again only after a message. Acknowledges each message of a
  `:window` call. The channel going down ends the call with `:unavailable`; a channel that does not
  end the call within 5 s of its deadline (it always should) with `:deadline_exceeded`, the call
  cancelled.
  """
  @spec next(Handle.t()) :: event()
  def next(%Handle{channel: channel, ref: ref, monitor: monitor} = call) do
    receive do
      {:snakepit_grpc, ^ref, {:message, message}} ->
        if call.window, do: ack(channel, ref)
        {:message, message}

      {:snakepit_grpc, ^ref, ending} ->
        Process.demonitor(monitor, [:flush])
        ending

      {:DOWN, ^monitor, :process, _, reason} ->
        flush_messages(ref)
        {:error, not_running(reason)}
    after
      wait_ms(call.deadline) ->
        cancel(call)

        {:error,
         Error.new(:deadline_exceeded, "no reply from the channel within #{call.timeout} ms")}
    end
  end

  defp wait_ms(:infinity), do: :infinity
  defp wait_ms(deadline), do: max(deadline - System.monotonic_time(:millisecond), 0)

  @doc """
  Runs a unary call to its end: `{:ok, message, trailers}` for exactly one message, else the call's
  error (`:internal` when it ended with another number of messages).
  """
  @spec collect(Handle.t()) :: {:ok, binary(), trailers()} | {:error, Error.t()}
  def collect(%Handle{} = call), do: collect(call, nil, 0)

  # Only the first message is kept: any more make the response invalid, only their count matters.
  defp collect(call, first, count) do
    case next(call) do
      {:message, message} ->
        collect(call, first || message, count + 1)

      {:done, trailers} when count == 1 ->
        {:ok, first, trailers}

      {:done, trailers} ->
        {:error,
         Error.new(:internal, "unary response carried #{count} messages, expected 1", trailers)}

      {:error, _} = error ->
        error
    end
  end

  @doc """
  Starts a server-streaming call whose messages the caller receives itself (see the moduledoc);
  `start_call/4` with the same options, returning only the call's ref. The deadline covers the
  whole stream; a `:window` stream's messages must be acknowledged with `ack/3`.
  """
  @spec server_stream(server(), String.t(), iodata(), call_opts()) ::
          {:ok, reference()} | {:error, Error.t()}
  def server_stream(server, path, request, opts \\ []) do
    with {:ok, call} <- start_call(server, path, request, opts) do
      Process.demonitor(call.monitor, [:flush])
      {:ok, call.ref}
    end
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
  Cancels a call (RST_STREAM CANCEL): `cancel(handle)`, or `cancel(channel, ref)`. No further
  messages for it are delivered, and those already in the caller's mailbox are flushed when the
  caller is the call's receiver.
  """
  @spec cancel(Handle.t()) :: :ok
  def cancel(%Handle{} = call) do
    Process.demonitor(call.monitor, [:flush])
    cancel(call.channel, call.ref)
  end

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

  @doc """
  `:open`, `:draining` (GOAWAY received: no new calls, see the moduledoc) or `:down`. The channel
  answers after whatever it received before, so a caller whose call just failed learns here whether
  that failure took the connection down.
  """
  @spec connection_state(server()) :: :open | :draining | :down
  def connection_state(server) do
    GenServer.call(server, :connection_state, 5_000)
  catch
    :exit, _ -> :down
  end

  @doc "Fails open calls with `:unavailable`, sends GOAWAY, closes the socket and stops."
  @spec close(server()) :: :ok
  def close(server) do
    GenServer.call(server, :close)
  catch
    :exit, _ -> :ok
  end

  @doc """
  Whether a channel to `host` with these `:tls` options (`nil`: none) sends plaintext off this
  machine: true unless TLS is on or `host` is loopback (127.0.0.0/8, ::1, localhost) or a Unix
  socket. A pool uses it to warn about remote endpoints without TLS.
  """
  @spec plaintext_warning?(term(), Transport.tls_opts() | nil) :: boolean()
  defdelegate plaintext_warning?(host, tls), to: Transport

  defp exit_reason({reason, {GenServer, :call, _}}), do: reason
  defp exit_reason(reason), do: reason

  defp not_running(reason),
    do: Error.connection_lost("channel is not running: #{inspect(reason)}")

  ## Server

  @impl true
  def init(opts) do
    host = Keyword.get(opts, :host, "127.0.0.1")
    port = Keyword.get(opts, :port, 0)
    connect_timeout = Keyword.get(opts, :connect_timeout, 5000)
    tls = Keyword.get(opts, :tls)
    {address, authority} = address(host, port)

    with {:ok, socket} <-
           Transport.connect(
             address,
             port_for(host, port),
             socket_options(host),
             tls,
             connect_timeout
           ) do
      {conn, preface} = Conn.new(initial_window_size: @initial_window)

      with {:ok, first_bytes} <- Transport.open(socket, preface, tls, connect_timeout) do
        # The bytes awaited (TLS) are handled as the first socket message, before any call.
        if first_bytes != "",
          do: send(self(), {:first_bytes, first_bytes}),
          else: activate(socket)

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
           credit_out: [],
           owner: Keyword.get(opts, :owner),
           drain_timeout: Keyword.get(opts, :drain_timeout, @drain_timeout),
           # set on GOAWAY: %{reason: {:goaway, code}, message: String.t(), timer: reference}
           draining: nil
         }}
      else
        {:error, reason} ->
          Transport.close(socket)
          {:stop, reason}
      end
    else
      {:error, reason} -> {:stop, reason}
    end
  end

  defp activate(socket), do: :ok = Transport.activate_once(socket)

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
  def handle_call({:start_call, _path, _request, _opts}, _from, %{draining: %{}} = state),
    do: {:reply, {:error, Error.new(:unavailable, state.draining.message)}, state}

  def handle_call({:start_call, path, request, opts}, {pid, _}, state) do
    timeout = Keyword.get(opts, :timeout, @default_timeout)
    metadata = state.metadata ++ Keyword.get(opts, :metadata, [])
    ref = make_ref()

    entry = %{
      kind: Keyword.get(opts, :kind, :server_stream),
      pid: pid,
      ref: ref,
      sid: nil,
      monitor: Process.monitor(pid),
      timer: if(timeout != :infinity, do: Process.send_after(self(), {:deadline, ref}, timeout)),
      timeout: timeout,
      headers: Metadata.request_headers(state.authority, path, timeout, metadata),
      body: Message.encode(request),
      call: Call.new(max_message_size: state.max_message_size),
      # Backpressure (calls with :window): the wire sizes of the messages delivered but not
      # acknowledged yet, their total, and the DATA bytes received whose credit is withheld.
      window: Keyword.get(opts, :window),
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

    reply_after(result, {:ok, ref})
  end

  def handle_call({:cancel, ref}, _from, state) do
    case Map.fetch(state.calls, ref) do
      {:ok, entry} -> reply_after(drop_call(state, entry), :ok)
      :error -> {:reply, :ok, state}
    end
  end

  def handle_call(:connection_state, _from, state),
    do: {:reply, if(state.draining, do: :draining, else: :open), state}

  def handle_call(:close, _from, state) do
    state = fail_all(state, "channel closed")
    {conn, out} = Conn.close(state.conn)
    _ = Transport.send(state.socket, out)
    Transport.close(state.socket)
    {:stop, :normal, :ok, %{state | conn: conn, socket: nil}}
  end

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
  def handle_info({:first_bytes, bytes}, state), do: handle_bytes(bytes, state)

  def handle_info(message, %{socket: %Transport{} = socket} = state)
      when elem(message, 0) in [:tcp, :tcp_closed, :tcp_error, :ssl, :ssl_closed, :ssl_error] do
    case Transport.message(socket, message) do
      {:data, bytes} ->
        handle_bytes(bytes, state)

      :closed ->
        shutdown(%{state | socket: nil}, "connection closed by the server", :closed)

      {:error, reason} ->
        shutdown(state, "connection error: #{inspect(reason)}", {:tcp_error, reason})

      :other ->
        {:noreply, state}
    end
  end

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

  def handle_info(:drain_timeout, %{draining: %{reason: reason}} = state) do
    message =
      "#{state.draining.message}; the call did not end within the drain timeout " <>
        "(#{state.drain_timeout} ms)"

    shutdown(state, message, reason)
  end

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    if state.socket, do: Transport.close(state.socket)
    :ok
  end

  defp handle_bytes(bytes, state) do
    case Conn.handle_data(state.conn, bytes) do
      {:ok, conn, events, out} ->
        state = Enum.reduce(events, %{state | conn: conn, credit_out: []}, &handle_event/2)

        with {:ok, state} <- send_out(state, [out | state.credit_out]),
             {:ok, state} <- start_waiting(state) do
          activate(state.socket)
          noreply({:ok, maybe_start_drain(state)})
        else
          stop -> noreply(stop)
        end

      {:error, conn, {code, message}, out} ->
        _ = Transport.send(state.socket, out)
        state = %{state | conn: conn}
        shutdown(state, "HTTP/2 connection error #{code}: #{message}", {:http2_error, code})
    end
  end

  # Every callback that may end calls returns through these: a draining channel stops once its
  # last call has ended.
  defp noreply({:ok, state}), do: drained_or({:noreply, state})
  defp noreply({:stop, reason, state}), do: {:stop, reason, state}

  defp reply_after({:ok, state}, reply), do: drained_or({:reply, reply, state})
  defp reply_after({:stop, reason, state}, reply), do: {:stop, reason, reply, state}

  defp drained_or(result) do
    state = elem(result, tuple_size(result) - 1)

    if state.draining && map_size(state.calls) == 0 do
      {conn, out} = Conn.close(state.conn)
      _ = Transport.send(state.socket, out)
      Transport.close(state.socket)
      state = %{state | conn: conn, socket: nil}

      case result do
        {:noreply, _} -> {:stop, {:shutdown, state.draining.reason}, state}
        {:reply, reply, _} -> {:stop, {:shutdown, state.draining.reason}, reply, state}
      end
    else
      result
    end
  end

  ## Internals

  # The server sent GOAWAY: no new calls here. Streams above its last stream id were refused (their
  # calls failed while its events were handled); those that wait for a slot are failed here, as
  # the server will never see them; the rest run to their end.
  defp maybe_start_drain(%{draining: nil, conn: %{goaway: {_last, code, debug}}} = state) do
    message = "server sent GOAWAY (#{inspect(code)}#{if debug != "", do: ": " <> debug})"

    state =
      state.waiting
      |> :queue.to_list()
      |> Enum.reduce(state, fn ref, state ->
        entry = Map.fetch!(state.calls, ref)
        deliver(entry, {:error, Error.new(:unavailable, message <> " before this call started")})
        forget(state, entry)
      end)

    if state.owner, do: send(state.owner, {:snakepit_grpc_draining, self(), {:goaway, code}})
    timer = Process.send_after(self(), :drain_timeout, state.drain_timeout)
    %{state | draining: %{reason: {:goaway, code}, message: message, timer: timer}}
  end

  defp maybe_start_drain(state), do: state

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
      case call_event(entry.call, event, state.conn.goaway) do
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
            _ = Transport.send(state.socket, out)
            %{state | conn: conn}
          else
            state
          end
      end
    else
      :error -> state
    end
  end

  # A stream above a GOAWAY's last stream id was never processed by the server (Conn reports it
  # refused): say so, it is what makes the call safe to retry elsewhere.
  defp call_event(call, {:reset, sid, :refused_stream}, {last, code, debug}) when sid > last do
    message =
      "server sent GOAWAY (#{inspect(code)}#{if debug != "", do: ": " <> debug}) " <>
        "without processing this call (stream #{sid} > last stream id #{last})"

    {:done, call, [], {:error, Error.new(:unavailable, message)}}
  end

  defp call_event(call, event, _goaway), do: Call.handle_event(call, event)

  defp push_messages(entry, []), do: entry

  defp push_messages(entry, messages) do
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

  defp deliver(entry, {:ok, trailers}),
    do: send(entry.pid, {:snakepit_grpc, entry.ref, {:done, trailers}})

  defp deliver(entry, {:error, error}),
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
      case Transport.send(state.socket, out) do
        :ok ->
          {:ok, state}

        {:error, reason} ->
          shutdown(state, "send failed: #{inspect(reason)}", {:send_failed, reason})
      end
    end
  end

  defp shutdown(state, message, reason) do
    state = fail_all(state, message)
    if state.socket, do: Transport.close(state.socket)
    {:stop, {:shutdown, reason}, %{state | socket: nil}}
  end

  # Fails every call, open or waiting, in the order they were made (stream ids, then the queue).
  defp fail_all(state, message) do
    entries = Map.values(state.calls)
    {open, queued} = Enum.split_with(entries, & &1.sid)

    order =
      Enum.sort_by(open, & &1.sid) ++ Enum.sort_by(queued, &queue_position(state.waiting, &1.ref))

    Enum.reduce(order, state, fn entry, state ->
      deliver(entry, {:error, Error.connection_lost(message)})
      forget(state, entry)
    end)
  end

  defp queue_position(queue, ref), do: Enum.find_index(:queue.to_list(queue), &(&1 == ref))
end
