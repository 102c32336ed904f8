defmodule Snakepit.Telemetry do
  @moduledoc """
  Events in the shape of [`:telemetry`](https://hexdocs.pm/telemetry), without depending on it.

  ## Dispatch

  `execute/3` hands each event to, in this order of preference:

    1. `:telemetry.execute/3`, when the `:telemetry` module can be loaded (it is a dependency of
       the application that uses snakepit): attach with `:telemetry.attach_many/4` as usual;
    2. else the handler module of `config :snakepit, telemetry_handler: MyHandler`, called as
       `MyHandler.handle_event(event, measurements, metadata)` (`@behaviour Snakepit.Telemetry`);
    3. else nobody: the event is dropped.

  Whether `:telemetry` can be loaded is asked once and kept in `:persistent_term`
  (`reset_cache/0` asks again). Handlers run in the process that emits the event: call events and
  queue waits in the caller's process, worker events in the pool's process, so keep them short.
  A handler that raises, throws or exits does not fail the call or the pool: the failure is logged
  once per handler (`:telemetry` itself detaches a failing handler) and the event is dropped.

  Durations are in `:native` time units (differences of `System.monotonic_time/0`), as is the
  `:telemetry` convention: `System.convert_time_unit(duration, :native, :millisecond)`.

  ## Call events

  One span per call through a pool: `Snakepit.execute/4` (and `execute_in_session`),
  `Snakepit.execute_stream/4,5`, `Snakepit.execute_batch/4` and `Snakepit.get_session/2`. Every
  call emits one `:start` and then exactly one `:stop` or `:exception`, in the caller's process.
  The span covers the whole call: encoding the arguments, waiting for a slot (also reported
  alone, see `[:snakepit, :queue, :wait]`), the gRPC call(s) and decoding the result.

    * `[:snakepit, :call, :start]`
      * measurements: `%{system_time: System.system_time(), monotonic_time: System.monotonic_time()}`
      * metadata: `t:call_metadata/0` without the worker and result keys
    * `[:snakepit, :call, :stop]` - the call returned. A call that returned
      `{:error, %Snakepit.Error{}}` is a `:stop` too, with `result: :error` (as with
      `:telemetry.span/3`, whose `:stop` follows any return): that covers every failure the API
      reports as a value (tool errors, timeouts, queue timeouts, crashed workers, ...)
      * measurements: `%{duration: native, monotonic_time: native}`
      * metadata: `t:call_metadata/0`; `result: :ok | :error`; with `:error`, `error` (the
        `%Snakepit.Error{}`) and `error_reason` (its `reason`, e.g. `:tool_error`,
        `:queue_timeout`). A lazy stream (`execute_stream/4` with options) the consumer stopped
        before its end (`Enum.take/2`, or the consumer raised) has `result: :halted`. A batch is
        `:ok` when the ExecuteBatch call succeeded, whatever its items returned.
    * `[:snakepit, :call, :exception]` - something raised, threw or exited through the call
      instead of returning, e.g. an `execute_stream` callback that raised (the stream is
      cancelled, the slot given back, and the exception goes on to the caller)
      * measurements: `%{duration: native, monotonic_time: native}`
      * metadata: `t:call_metadata/0` plus `kind` (`:error | :throw | :exit`), `reason`,
        `stacktrace`

  ## Queue events

    * `[:snakepit, :queue, :wait]` - once per checkout of a pool slot, in the caller's process:
      every call whose arguments could be encoded asks for one, also those that got it at once
      (`queued: false`) and those that got none (`result: :error`)
      * measurements: `%{duration: native}` - from asking the pool for a slot to its answer, as
        the caller saw it (about 0 when a slot was free)
      * metadata: `pool`, `tool`, `operation`, `trace_id`, `traceparent` (as in
        `t:call_metadata/0`), `result: :ok | :error`,
        `error_reason` (`:queue_timeout`, `:queue_full`, `:pool_stopped`, ...; nil on `:ok`),
        `queued` (true when the caller waited in the pool's queue), and on `:ok` the worker
        keys of `t:call_metadata/0`

  ## Worker events

  Emitted by the pool's process (`Snakepit.Pool`), from the decisions of `Snakepit.Pool.State`.
  Metadata of all three: `pool` (its name), `worker` (the pool's id of the worker, as in
  `Snakepit.list_workers/1`), `slot` (the worker slot; a replacement takes its predecessor's
  slot), `worker_pid` (nil when it was never spawned), `os_pid`, `port` or `uds` (where its server
  listens: a TCP port or a Unix socket path, the other nil; both nil before it was ready),
  `reason`.

    * `[:snakepit, :worker, :start]` - a worker became ready
      * measurements: `%{system_time: ..., duration: native}` - from the pool starting it to its
        server being ready (millisecond resolution)
      * `reason`: `:initial` (the pool's start), `:replacement` (it replaces a worker being
        recycled or taken out of service), `:restart` (its slot was empty: a crash, a failed
        start, a worker that went away before its replacement was started)
    * `[:snakepit, :worker, :recycle]` - the pool decided to replace a worker on purpose (its
      replacement starts now; it is stopped once it is idle and no longer needed)
      * measurements: `%{system_time: ..., uptime: native}`
      * `reason`: `:ttl`, `:max_requests` (both counted in `recycles` of `Snakepit.get_stats/1`),
        `:stuck_calls` (`stuck_replacements`), `:unhealthy` (`unhealthy_replacements`; the
        metadata's `message` says which check failed); `requests`: calls it served
    * `[:snakepit, :worker, :crash]` - a worker went down without the pool asking it (counted in
      `crashes`): its Python process exited or was killed, its connection dropped, it failed to
      start or could not be spawned
      * measurements: `%{system_time: ..., uptime: native}`
      * `reason`: the worker process' exit reason, e.g. `{:shutdown, {:python_exited, 137}}`,
        `{:shutdown, {:channel_down, _}}`, `{:shutdown, {:start_failed, message}}`,
        `{:spawn_failed, message}`; `exit_status`: the Python process' exit status when the
        reason has one (137 for `kill -9`), else nil; `status`: the worker's status when it went
        down (`:starting`, `:ready`, `:server_draining`, ...); `requests`

  ## Trace context

  `trace_id` and `traceparent` in call and queue metadata come from the W3C `traceparent` the
  call sends, see `Snakepit.TraceContext`.
  """

  require Logger

  @typedoc "An event name, e.g. `[:snakepit, :call, :stop]`."
  @type event :: [atom, ...]
  @type measurements :: %{optional(atom) => number}
  @type metadata :: %{optional(atom) => term}

  @typedoc """
  Metadata of the call events.

    * `pool` - the pool as the caller named it (its name, or its pid)
    * `tool` - the tool's name (nil for `get_session`)
    * `operation` - `:execute`, `:stream`, `:batch` or `:get_session`
    * `session_id`, `request_id` - from the call's options, or nil
    * `trace_id`, `traceparent` - the W3C trace context the call sent, or nil
    * `items` - a batch's number of items (`:batch` only)
    * `worker`, `worker_pid`, `os_pid`, `port`, `uds` - the worker that served the call (`:stop`
      and `:exception`; nil when it got no slot); `port` or `uds` says where it listens
  """
  @type call_metadata :: %{
          required(:pool) => atom | pid | nil,
          required(:tool) => String.t() | nil,
          required(:operation) => :execute | :stream | :batch | :get_session,
          required(:session_id) => String.t() | nil,
          required(:request_id) => String.t() | nil,
          required(:trace_id) => String.t() | nil,
          required(:traceparent) => String.t() | nil,
          optional(:items) => non_neg_integer,
          optional(:worker) => pos_integer | nil,
          optional(:worker_pid) => pid | nil,
          optional(:os_pid) => pos_integer | nil,
          optional(:port) => pos_integer | nil,
          optional(:uds) => Path.t() | nil,
          optional(atom) => term
        }

  @doc "Called with every event when `:telemetry` is not loaded (see \"Dispatch\")."
  @callback handle_event(event, measurements, metadata) :: any

  @loaded_key {__MODULE__, :telemetry_loaded?}

  @doc """
  Emits `event`: to `:telemetry` when it is loaded, else to the configured handler module, else
  to nobody. Always returns `:ok`, whatever the handler does.
  """
  @spec execute(event, measurements, metadata) :: :ok
  def execute(event, measurements, metadata) do
    if telemetry_loaded?() do
      safely(:telemetry, fn -> apply(:telemetry, :execute, [event, measurements, metadata]) end)
    else
      case Application.get_env(:snakepit, :telemetry_handler) do
        nil -> :ok
        handler -> safely(handler, fn -> handler.handle_event(event, measurements, metadata) end)
      end
    end

    :ok
  end

  @doc "Whether events go to `:telemetry` (asked once, then kept until `reset_cache/0`)."
  @spec telemetry_loaded?() :: boolean
  def telemetry_loaded? do
    case :persistent_term.get(@loaded_key, nil) do
      nil ->
        loaded? = Code.ensure_loaded?(:telemetry)
        :persistent_term.put(@loaded_key, loaded?)
        loaded?

      loaded? ->
        loaded?
    end
  end

  @doc """
  Forgets whether `:telemetry` is loaded and which handlers' failures were logged: the next event
  asks again. For tests that load or unload a `:telemetry` module.
  """
  @spec reset_cache() :: :ok
  def reset_cache do
    :persistent_term.erase(@loaded_key)

    for {{__MODULE__, :failure_logged, _} = key, _} <- :persistent_term.get(),
        do: :persistent_term.erase(key)

    :ok
  end

  ## call spans (used by Snakepit)

  @doc false
  # Emits [:snakepit, :call, :start]; returns the start time for call_stop/3 and call_exception/5.
  @spec call_start(call_metadata) :: integer
  def call_start(metadata) do
    start = System.monotonic_time()

    execute(
      [:snakepit, :call, :start],
      %{system_time: System.system_time(), monotonic_time: start},
      metadata
    )

    start
  end

  @doc false
  @spec call_stop(integer, call_metadata) :: :ok
  def call_stop(start, metadata) do
    stop = System.monotonic_time()
    execute([:snakepit, :call, :stop], %{duration: stop - start, monotonic_time: stop}, metadata)
  end

  @doc false
  @spec call_exception(integer, :error | :throw | :exit, term, Exception.stacktrace(), metadata) ::
          :ok
  def call_exception(start, kind, reason, stacktrace, metadata) do
    stop = System.monotonic_time()

    execute(
      [:snakepit, :call, :exception],
      %{duration: stop - start, monotonic_time: stop},
      Map.merge(metadata, %{kind: kind, reason: reason, stacktrace: stacktrace})
    )
  end

  # A failing handler must not fail the call or the pool that emitted the event.
  defp safely(handler, fun) do
    fun.()
  catch
    kind, reason ->
      key = {__MODULE__, :failure_logged, handler}

      unless :persistent_term.get(key, false) do
        :persistent_term.put(key, true)

        Logger.error(
          "snakepit telemetry handler #{inspect(handler)} failed (logged once, events still go to it): " <>
            Exception.format(kind, reason, __STACKTRACE__)
        )
      end
  end
end
