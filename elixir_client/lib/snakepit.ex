defmodule Snakepit do
  @moduledoc """
  Elixir client of snakepit_bridge: pools of Python gRPC workers and the calls to their tools.

      # config/config.exs
      config :snakepit,
        pools: [
          %{name: :default, worker_profile: :process, pool_size: 4},
          %{name: :hpc_pool, worker_profile: :thread, pool_size: 2, threads_per_worker: 16}
        ]

      {:ok, %{"message" => "hi"}} = Snakepit.execute(:default, "echo", %{message: "hi"})
      {:ok, 3} = Snakepit.execute("add", %{a: 1, b: 2}, [])        # default pool

  Every call returns `{:ok, result}` or `{:error, %Snakepit.Error{}}`. Tool names are strings or
  atoms; arguments are maps (atom or string keys) encoded by `Snakepit.Codec`; results come back
  decoded, maps with string keys.

  Call options (`opts`):

    * `:timeout` - the call's deadline in ms (default: the pool's `call_timeout`)
    * `:metadata` - a `%{String.t() => String.t()}` sent in the request
    * `:request_id` - echoed by the server in its logs and response
    * `:seed` - seeds the request's RNG on the server
    * `:window` - `execute_stream` only: how many bytes of chunks the worker may be ahead of the
      consumer (default 262_144; see `execute_stream/4`)
    * `:idempotent` - `true`: on a `worker_profile: :remote` pool, a call whose endpoint died
      during it (`:worker_crashed`) is run once more on another endpoint (see
      `Snakepit.Remote.Retry`)
    * `:traceparent` - a W3C `traceparent` sent as the call's `traceparent` gRPC header (default:
      the process dictionary's `:snakepit_traceparent`); an invalid one is not sent. See
      `Snakepit.TraceContext`
    * `:cluster` - `false` keeps the call on this node's pool even when it is full and connected
      nodes have a pool of the same name (default: such calls may run there, see
      `Snakepit.Cluster`; sessions and streams always stay local)

  Each call logs at `:debug` with `:logger` metadata `pool`, `worker`, `tool`, `duration_ms` (and
  `trace_id` when it sent a traceparent), and emits the telemetry events of `Snakepit.Telemetry`:
  a `[:snakepit, :call, ...]` span and a `[:snakepit, :queue, :wait]`.
  """

  require Logger
  alias Snakepit.{CallEngine, Cluster, Codec, Error, Pool, Proto, Shm, Telemetry, TraceContext}
  alias Snakepit.GRPC.Channel

  @service "/snakepit.bridge.BridgeService/"
  # Bytes of chunks a stream may run ahead of its consumer (execute_stream's :window).
  @stream_window 256 * 1024

  @type pool :: atom | pid
  @type tool :: String.t() | atom
  @type args :: map
  @type result :: {:ok, term} | {:error, Error.t()}

  ## pools

  @doc """
  The default pool: `config :snakepit, default_pool: name`, else the first configured pool.
  """
  @spec default_pool() :: atom | nil
  def default_pool do
    case Application.get_env(:snakepit, :default_pool) do
      nil ->
        case Application.get_env(:snakepit, :pools, []) do
          [first | _] -> first |> Map.new() |> Map.get(:name)
          _ -> nil
        end

      name ->
        name
    end
  end

  @doc """
  Starts a pool under the application's supervisor (see `Snakepit.Config` / README for keys) and
  waits until all its workers are ready (`await: false` to not wait).

  Returns `{:error, message}` (a string naming the key) for an invalid config. When a worker fails
  to start, it returns at once, without waiting for `startup_timeout`, with
  `{:error, %Snakepit.Error{reason: :worker_start_failed}}` whose message ends with the server's
  last line of output (e.g. `error: cannot import adapter module 'my_adapter': No module named
  'my_adapter'`, `ModuleNotFoundError: No module named 'grpc'`); with
  `{:error, %Snakepit.Error{reason: :startup_timeout}}` when the workers were not ready in time. The
  pool is stopped in both cases.
  """
  @spec start_pool(map | keyword, keyword) :: {:ok, pid} | {:error, String.t() | Error.t()}
  def start_pool(config, opts \\ []) do
    with {:ok, c} <- Snakepit.Config.new(config),
         :ok <- Snakepit.Application.launcher_validate(c),
         {:ok, pid} <- DynamicSupervisor.start_child(Snakepit.PoolSupervisor, Pool.child_spec(c)) do
      if Keyword.get(opts, :await, true) do
        case Pool.await_ready(pid, c.startup_timeout + 1_000) do
          :ok ->
            {:ok, pid}

          {:error, reason} ->
            DynamicSupervisor.terminate_child(Snakepit.PoolSupervisor, pid)

            case reason do
              %Error{} = e ->
                {:error, e}

              _ ->
                {:error,
                 Error.new(
                   :startup_timeout,
                   "pool #{inspect(c.name)}: workers not ready within startup_timeout (#{c.startup_timeout} ms)"
                 )}
            end
        end
      else
        {:ok, pid}
      end
    end
  end

  @doc """
  Stops a pool (one from `start_pool/2` or from the application config) and its workers.

  The pool takes no new call from then on: new callers and queued callers get
  `{:error, %Snakepit.Error{reason: :pool_stopped}}` at once. Calls in flight get `grace:` ms
  (default: the pool's `shutdown_grace`) to finish normally; `stop_pool` returns as soon as they
  are done. A call still running after the grace fails with `:pool_stopped`; then the workers are
  stopped (SIGTERM, SIGKILL if they outlive their own `shutdown_grace` + 2 s).
  """
  @spec stop_pool(pool, keyword) :: :ok | {:error, :not_found}
  def stop_pool(pool, opts \\ []) do
    case Pool.whereis(pool) do
      nil ->
        {:error, :not_found}

      pid ->
        _ = Pool.drain(pid, Keyword.get(opts, :grace))

        case DynamicSupervisor.terminate_child(Snakepit.PoolSupervisor, pid) do
          :ok ->
            :ok

          {:error, :not_found} ->
            # a pool from `config :snakepit, pools:` is a static child of the application supervisor
            id = {Pool, pool_name(pool, pid)}

            with :ok <- Supervisor.terminate_child(Snakepit.Supervisor, id),
                 :ok <- Supervisor.delete_child(Snakepit.Supervisor, id) do
              :ok
            else
              _ -> {:error, :not_found}
            end
        end
    end
  end

  defp pool_name(pool, _pid) when is_atom(pool), do: pool

  defp pool_name(_pool, pid) do
    case Registry.keys(Snakepit.Registry, pid) do
      [name] -> name
      _ -> nil
    end
  end

  @doc """
  Waits until `pool` has all its workers ready; `{:error, %Snakepit.Error{}}` as soon as one fails
  to start (see `start_pool/2`), `{:error, :timeout}` after `timeout` ms.
  """
  @spec await_ready(pool, timeout) :: :ok | {:error, :timeout | :pool_not_found | Error.t()}
  def await_ready(pool, timeout \\ 30_000), do: Pool.await_ready(pool, timeout)

  ## execute

  @doc """
  Runs `tool` with `args` on the default pool (`execute/2`, `execute(tool, args, opts)`) or on
  `pool` (`execute(pool, tool, args)`, `execute/4`).
  """
  @spec execute(tool, args) :: result
  def execute(tool, args), do: execute(default_pool(), tool, args, [])

  @spec execute(pool | tool, tool | args, args | keyword) :: result
  def execute(pool, tool, args) when is_map(args), do: execute(pool, tool, args, [])
  def execute(tool, args, opts) when is_list(opts), do: execute(default_pool(), tool, args, opts)

  @spec execute(pool, tool, args, keyword) :: result
  def execute(pool, tool, args, opts) do
    tool = to_string(tool)
    opts = put_traceparent(opts)

    call = fn lease, {json, blobs}, shm ->
      req = tool_request(tool, json, blobs, opts, shm)

      with {:ok, resp} <-
             unary(
               lease,
               "ExecuteTool",
               :execute_tool_request,
               req,
               :execute_tool_response,
               tool,
               opts
             ) do
        decode_value(resp.result_json, resp.blobs, tool, with_regions(opts, shm))
      end
    end

    Snakepit.Remote.Retry.run(pool, opts, fn ->
      with_slot(pool, tool, args_encoder(args, tool), opts, span(:execute, tool), call,
        remote: {:execute, [tool, args]}
      )
    end)
  end

  @doc """
  Runs `tool` in session `session_id`: calls of a session go to the same worker while it lives; on
  first use of a worker the session is created there (InitializeSession). When that worker was
  recycled or crashed, the session is created again on the new worker (its server-side state starts
  over). Extra options: `:session_ttl` (seconds), `:session_seed`, `:session_state` (initial state map).

  Arities: `execute_in_session(session_id, tool, args)`, `execute_in_session(session_id, tool, args,
  opts)` on the default pool, `execute_in_session(pool, session_id, tool, args)` and `/5`.
  """
  @spec execute_in_session(String.t(), tool, args) :: result
  def execute_in_session(session_id, tool, args),
    do: execute_in_session(default_pool(), session_id, tool, args, [])

  @spec execute_in_session(pool | String.t(), String.t() | tool, tool | args, args | keyword) ::
          result
  def execute_in_session(pool, session_id, tool, args) when is_map(args),
    do: execute_in_session(pool, session_id, tool, args, [])

  def execute_in_session(session_id, tool, args, opts) when is_list(opts),
    do: execute_in_session(default_pool(), session_id, tool, args, opts)

  @spec execute_in_session(pool, String.t(), tool, args, keyword) :: result
  def execute_in_session(pool, session_id, tool, args, opts) when is_binary(session_id) do
    execute(pool, tool, args, Keyword.put(opts, :session_id, session_id))
  end

  @doc "The server-side state of a session (GetSession on its worker)."
  @spec get_session(pool, String.t()) :: {:ok, map} | {:error, Error.t()}
  def get_session(pool \\ default_pool(), session_id) do
    opts = put_traceparent(session_id: session_id, skip_session_init: true)

    with_slot(
      pool,
      "GetSession",
      nil,
      opts,
      span(:get_session, nil),
      fn lease, _, _ ->
        with :ok <- known_session(lease, session_id),
             {:ok, r} <-
               unary(
                 lease,
                 "GetSession",
                 :get_session_request,
                 %{session_id: session_id},
                 :get_session_response,
                 nil,
                 Keyword.take(opts, [:traceparent])
               ),
             {:ok, state} <- decode_value(r.state_json, r.blobs, nil, []) do
          {:ok,
           %{r | state_json: nil}
           |> Map.delete(:state_json)
           |> Map.delete(:blobs)
           |> Map.put(:state, state)}
        end
      end
    )
  end

  defp known_session(%{init_session: true}, sid),
    do:
      {:error,
       Error.new(
         :not_found,
         "session #{inspect(sid)} was never used in this pool (or its worker is gone)"
       )}

  defp known_session(_lease, _sid), do: :ok

  @doc "Deletes a session on its worker and forgets its pinning."
  @spec cleanup_session(pool, String.t()) :: {:ok, boolean} | {:error, Error.t()}
  def cleanup_session(pool \\ default_pool(), session_id) do
    case Pool.forget_session(pool, session_id) do
      nil ->
        {:ok, false}

      channel ->
        req = Proto.encode(:cleanup_session_request, %{session_id: session_id})

        case Channel.unary(channel, @service <> "CleanupSession", req, timeout: 10_000) do
          {:ok, bin, _} ->
            with {:ok, r} <- decode_msg(:cleanup_session_response, bin), do: {:ok, r.existed}

          {:error, e} ->
            {:error, Error.from_grpc(e, nil)}
        end
    end
  catch
    :exit, reason -> {:error, Error.new(:unavailable, "cleanup_session: #{inspect(reason)}")}
  end

  ## streaming

  @doc """
  Runs a streaming (generator) tool.

    * With a 1-arity `callback`: calls it with each chunk's decoded value, in order, and returns
      `{:ok, final}` where `final` is the generator's return value (often `nil`), or
      `{:error, %Snakepit.Error{}}`.
    * With a keyword list of options (or no 4th argument): returns a lazy `Stream` of the chunk values;
      nothing runs until it is enumerated; a failure raises `Snakepit.Error` during enumeration, and
      halting early cancels the call.

  `execute_stream/5` takes a callback and options.

  Backpressure: chunks come only as fast as they are consumed. The worker may be at most
  `:window` bytes of chunks ahead of the consumer (option `:window`, default 262_144, at least
  65_535: HTTP/2 flow-control credit for the stream is given back only as the consumer takes
  chunks); beyond that the Python generator blocks until the consumer catches up, so the BEAM
  buffers at most about one window per stream. A chunk larger than the window still comes through.
  Other calls on the same worker are not held up by a stalled stream, but it keeps its pool slot
  until it ends; the `:timeout` covers the whole stream, however slowly it is consumed. Halting
  early, the consumer's death and the deadline reset the stream (RST_STREAM CANCEL), and no chunk
  of it is left in the caller's mailbox.
  """
  @spec execute_stream(pool, tool, args, (term -> any) | keyword) :: result | Enumerable.t()
  def execute_stream(pool, tool, args, callback_or_opts \\ [])

  def execute_stream(pool, tool, args, callback) when is_function(callback, 1),
    do: execute_stream(pool, tool, args, callback, [])

  def execute_stream(pool, tool, args, opts) when is_list(opts) do
    check_window!(opts)
    lazy_stream(pool, to_string(tool), args, opts)
  end

  @spec execute_stream(pool, tool, args, (term -> any), keyword) :: result
  def execute_stream(pool, tool, args, callback, opts) when is_function(callback, 1) do
    check_window!(opts)
    tool = to_string(tool)
    opts = put_traceparent(opts)

    run = fn lease, {json, blobs}, shm ->
      with {:ok, call} <- open_stream(lease, tool, json, blobs, opts, shm),
           do: CallEngine.run_stream(lease, call, tool, with_regions(opts, shm), callback)
    end

    with_slot(pool, tool, args_encoder(args, tool), opts, span(:stream, tool), run)
  end

  defp check_window!(opts) do
    case Keyword.get(opts, :window, @stream_window) do
      window when is_integer(window) and window > 0 ->
        :ok

      other ->
        raise ArgumentError,
              "execute_stream option :window must be a positive integer (bytes), got #{inspect(other)}"
    end
  end

  # The trace context is the caller's, read here: the stream may be enumerated elsewhere. Its
  # telemetry span starts when enumeration starts and stops in the `after` function, which sees
  # every end: the last chunk (:ok), a failure (raised there, once the slot is back), a halt.
  defp lazy_stream(pool, tool, args, opts) do
    opts = put_traceparent(opts)
    meta = call_metadata(pool, span(:stream, tool), opts)

    Stream.resource(
      fn -> open_lazy_stream(pool, tool, args, opts, meta) end,
      fn
        %{done: true} = st ->
          {:halt, st}

        st ->
          case CallEngine.next_chunk(st.lease, st.call, tool, with_regions(opts, st.shm)) do
            {:chunk, value} -> {[value], st}
            {:final, _value} -> {[], st}
            :done -> {:halt, %{st | done: true}}
            {:error, e} -> {:halt, %{st | failed: e}}
          end
      end,
      fn st ->
        # not done: halted early or failed; cancelled here, so its tool may still run
        unless st.done, do: CallEngine.cancel(st.call)
        Shm.finish(st.shm, not st.done)
        Pool.checkin(st.lease, if(st.done, do: :ok, else: :abandoned))

        result =
          cond do
            st.done -> {:ok, nil}
            st.failed -> {:error, st.failed}
            true -> :halted
          end

        Telemetry.call_stop(st.start, stop_metadata(meta, st.lease, result))
        if st.failed, do: raise(st.failed)
      end
    )
  end

  defp open_lazy_stream(pool, tool, args, opts, meta) do
    start = Telemetry.call_start(meta)

    opened =
      guarded(start, meta, nil, nil, fn ->
        shm = call_regions(pool)

        with {:ok, {json, blobs}, placements} <- encode(args, tool, shm),
             shm = Shm.with_args(shm, placements),
             {:ok, lease} <-
               checkout(pool, meta, session_id: opts[:session_id], regions: Shm.prefixes(shm)) do
          case write_args_and_open(lease, tool, json, blobs, opts, shm) do
            {:ok, call} ->
              {:ok, lease, call, shm}

            {:error, e} = error ->
              Shm.finish(shm, true)
              # as with_slot/7 reports it: a failed InitializeSession leaves the session not
              # created on the worker
              Pool.checkin(lease, outcome(error, opts[:session_id]))
              {:error, e, lease}
          end
        else
          {:error, e} -> {:error, e, nil}
        end
      end)

    case opened do
      {:ok, lease, call, shm} ->
        %{lease: lease, call: call, shm: shm, done: false, failed: nil, start: start}

      {:error, %Error{} = e, lease} ->
        Telemetry.call_stop(start, stop_metadata(meta, lease, {:error, e}))
        raise e
    end
  end

  # (the span's exception, if any, is reported by the caller's guarded/5)
  defp write_args_and_open(lease, tool, json, blobs, opts, shm) do
    with :ok <- write_args(shm, tool), do: open_stream(lease, tool, json, blobs, opts, shm)
  catch
    kind, reason ->
      Shm.finish(shm, true)
      Pool.checkin(lease, :abandoned)
      :erlang.raise(kind, reason, __STACKTRACE__)
  end

  defp open_stream(lease, tool, json, blobs, opts, shm) do
    with :ok <- maybe_init_session(lease, opts) do
      request = tool_request(tool, json, blobs, opts, shm)

      CallEngine.start_stream(
        lease,
        tool,
        request,
        Keyword.put_new(opts, :window, @stream_window)
      )
    end
  end

  ## batch

  @doc """
  Runs `tool` once per element of `args_list` in one ExecuteBatch call on one worker (the server
  runs the items on its thread pool, at most `:max_parallelism` at once; 0 = its pool size).
  Returns `{:ok, results}` with one `{:ok, value}` or `{:error, %Snakepit.Error{}}` per item, in order;
  `{:error, e}` when the whole call failed.
  """
  @spec execute_batch(pool, tool, [args], keyword) :: {:ok, [result]} | {:error, Error.t()}
  def execute_batch(pool, tool, args_list, opts \\ []) when is_list(args_list) do
    tool = to_string(tool)
    opts = put_traceparent(opts)

    # each item's argument regions are "<args prefix>.<item>.<n>"
    encoder = fn shm ->
      args_list
      |> Enum.with_index()
      |> Enum.reduce_while({:ok, [], []}, fn {args, index}, {:ok, items, placed} ->
        case encode(args, tool, shm, index) do
          {:ok, {json, blobs}, placements} ->
            {:cont, {:ok, [%{args_json: json, blobs: blobs} | items], [placements | placed]}}

          err ->
            {:halt, err}
        end
      end)
      |> case do
        {:ok, items, placed} ->
          {:ok, Enum.reverse(items), placed |> Enum.reverse() |> Enum.concat()}

        err ->
          err
      end
    end

    run = fn lease, items, shm -> run_batch(lease, tool, items, opts, shm) end
    span = Map.put(span(:batch, tool), :items, length(args_list))
    # the server counts each item as a tool call
    with_slot(pool, tool, encoder, opts, span, run,
      weight: max(length(args_list), 1),
      remote: {:execute_batch, [tool, args_list]}
    )
  end

  defp run_batch(lease, tool, items, opts, shm) do
    req =
      %{
        tool_name: tool,
        items: items,
        session_id: opts[:session_id] || "",
        request_id: opts[:request_id] || "",
        metadata: opts[:metadata] || %{},
        max_parallelism: opts[:max_parallelism] || 0
      }
      |> Map.merge(Shm.request_fields(shm))

    opts = with_regions(opts, shm)

    with {:ok, resp} <-
           unary(
             lease,
             "ExecuteBatch",
             :execute_batch_request,
             req,
             :execute_batch_response,
             tool,
             opts
           ) do
      {:ok,
       Enum.map(resp.results, fn
         %{ok: true} = r -> decode_value(r.result_json, r.blobs, tool, opts)
         %{error: te} when is_map(te) -> {:error, Error.from_tool_error(te, tool)}
         _ -> {:error, Error.new(:unknown, "batch item failed without an error", tool: tool)}
       end)}
    end
  end

  ## introspection

  @doc """
  Pool counters (`calls`, `failures`, `checkouts`, `queued` now, `queued_total`, `queue_full`,
  `queue_timeouts`, `recycles`, `crashes`, `workers_started`, `stuck_replacements`,
  `unhealthy_replacements`, `in_flight`, `capacity` (slots of ready workers, less those stuck
  calls hold), `sessions`, `shm_dir` (the pool's shared-memory directory, or nil: see
  `Snakepit.Shm`)) and `workers`: one map per worker (pid, id, status,
  os_pid, where its server listens (`uds`: its Unix socket's path, or `port`: its TCP port; the
  other is nil), in_flight, capacity, requests, max_requests, `abandoned_calls`, `stuck_calls`) with
  `python`: that worker's GetStats response (adapter_stats_json / thread_safety_json decoded into
  `adapter_stats` / `thread_safety`), or `{:error, e}`.

  Queue waits, for the whole pool (callers wait in one queue, for whichever worker frees a slot
  first): `queue_wait_total_ms` and `queue_wait_max_ms`, the milliseconds callers waited in the
  queue, by the pool's clock, over all `checkouts` (a caller served at once waited 0;
  `queue_wait_total_ms / checkouts` is the mean). The caller-side wait of each checkout, in native
  units, is the `[:snakepit, :queue, :wait]` event of `Snakepit.Telemetry`.

  Per worker slot (a replacement takes its predecessor's slot, so the counts survive it): `slots`,
  one `%{slot, worker, recycles, crashes}` per slot (`worker`: the id of its current worker, or
  nil while the slot is empty), and in each worker map `slot_recycles` / `slot_crashes`, its
  slot's counts. `recycles` counts TTL and max-requests recycles, `crashes` workers that went down
  without the pool asking (or failed to start); they add up to the pool's `recycles` and
  `crashes`.

  `get_stats(pool, cluster: true)`: the pool on every connected node that has one (see
  `Snakepit.Cluster.stats/2`): `{:ok, %{nodes, by_node, calls, failures, in_flight, capacity,
  queued, workers}}`, each worker with its `node`.
  """
  @spec get_stats(pool, keyword) :: {:ok, map} | {:error, Error.t()}
  def get_stats(pool \\ default_pool(), opts \\ [])

  def get_stats(pool, opts) when is_atom(pool) and is_list(opts) do
    if opts[:cluster] == true, do: {:ok, Cluster.stats(pool)}, else: local_stats(pool)
  end

  def get_stats(pool, _opts), do: local_stats(pool)

  defp local_stats(pool) do
    stats = Pool.stats(pool)

    workers =
      stats.workers
      |> Task.async_stream(fn w -> Map.put(w, :python, worker_stats(w)) end,
        timeout: 15_000,
        ordered: true
      )
      |> Enum.map(fn {:ok, w} -> w end)

    {:ok, %{stats | workers: workers}}
  rescue
    e in ArgumentError -> {:error, Error.new(:pool_not_found, Exception.message(e))}
  catch
    :exit, reason -> {:error, Error.new(:unavailable, "get_stats: #{inspect(reason)}")}
  end

  defp worker_stats(%{channel: nil}),
    do: {:error, Error.new(:unavailable, "worker not connected")}

  defp worker_stats(%{channel: ch}) do
    case Channel.unary(ch, @service <> "GetStats", Proto.encode(:get_stats_request, %{}),
           timeout: 10_000
         ) do
      {:ok, bin, _} ->
        with {:ok, r} <- decode_msg(:get_stats_response, bin) do
          r
          |> Map.put(:adapter_stats, json_or_nil(r.adapter_stats_json))
          |> Map.put(:thread_safety, json_or_nil(r.thread_safety_json))
        end

      {:error, e} ->
        {:error, Error.from_grpc(e, nil)}
    end
  catch
    :exit, reason -> {:error, Error.new(:unavailable, inspect(reason))}
  end

  defp json_or_nil(""), do: nil
  defp json_or_nil(nil), do: nil

  defp json_or_nil(json) do
    case Codec.decode(json, []) do
      {:ok, v} -> v
      _ -> json
    end
  end

  @doc """
  The pool's workers: pid, id, slot, status (`:starting`, `:ready`, `:retiring`, `:draining`,
  `:server_draining` (its server shuts down on its own), `:unhealthy`, `:stopping`), os_pid,
  `uds` (its server's Unix socket path; nil for `transport: :tcp`) or `port` (its TCP port; nil
  for `transport: :uds`), in_flight, capacity (calls it is given at once: `threads_per_worker`, or
  `process_pipeline_depth` for a process worker), requests, max_requests (its jittered
  `worker_max_requests`), `abandoned_calls` (calls
  given up on that may still run on the server), `stuck_calls` (those confirmed still running after
  `stuck_call_grace`), uptime_ms, `slot_recycles`, `slot_crashes` (see `get_stats/1`).

  `list_workers(pool, cluster: true)`: the workers of the pool on every connected node that has
  one, each with its `node` (see `Snakepit.Cluster.list_workers/2`).
  """
  @spec list_workers(pool, keyword) :: [map]
  def list_workers(pool \\ default_pool(), opts \\ [])

  def list_workers(pool, opts) when is_atom(pool) and is_list(opts) do
    if opts[:cluster] == true, do: Cluster.list_workers(pool), else: Pool.stats(pool).workers
  end

  def list_workers(pool, _opts), do: Pool.stats(pool).workers

  ## internals

  # Runs one call on a pool slot, as one telemetry span (`span`: its operation and tool, see
  # Snakepit.Telemetry). `opts` went through put_traceparent/1, as those `fun` has. `weight`: the
  # tool calls the server counts for this one (a batch: its items).
  #
  # `encoder` (nil: a call without arguments or results, e.g. GetSession) is given the call's
  # shared-memory regions (Snakepit.Shm; nil when the pool has none) and returns
  # {:ok, encoded, placements}; `fun` gets the lease, `encoded` and the regions. The argument
  # regions are written once the call has its slot (the checkout registers them: the pool deletes
  # them should the caller die) and deleted when the call ends, with any result region it left.
  #
  # `extra`: `:weight` (default 1) and `:remote`, `{fun, args}` for a call that may run on another
  # node's pool as `Snakepit.fun(pool, ...args, opts)` there (see Snakepit.Cluster).
  defp with_slot(pool, tool, encoder, opts, span, fun, extra \\ []) do
    meta = call_metadata(pool, span, opts)
    start = Telemetry.call_start(meta)
    sid = opts[:session_id]
    # a call that skips the session's initialisation only reads it: the pool must not count it
    # as created on the worker
    create? = opts[:skip_session_init] != true
    plan = if extra[:remote], do: Cluster.plan(pool, opts), else: :local

    checked_out =
      guarded(start, meta, nil, nil, fn ->
        # no local pool: its arguments are encoded on the node that runs it
        case plan == :remote && Cluster.pick_node(pool, false) do
          {:ok, node} ->
            {:remote, node}

          _none ->
            shm = encoder && call_regions(pool)

            with {:ok, encoded, placements} <- run_encoder(encoder, shm),
                 shm = Shm.with_args(shm, placements),
                 {:ok, lease} <-
                   routed_checkout(pool, meta, plan,
                     session_id: sid,
                     weight: Keyword.get(extra, :weight, 1),
                     create_session: create?,
                     regions: Shm.prefixes(shm)
                   ),
                 do: {:ok, lease, encoded, shm}
        end
      end)

    case checked_out do
      {:remote, node} ->
        remote_call(start, meta, node, pool, extra[:remote], opts)

      {:ok, lease, encoded, shm} ->
        # the log's duration is the call's on its worker; the span's includes the queue wait
        t0 = System.monotonic_time()

        result =
          guarded(start, meta, lease, shm, fn ->
            with :ok <- write_args(shm, tool),
                 :ok <-
                   if(opts[:skip_session_init], do: :ok, else: maybe_init_session(lease, opts)),
                 do: fun.(lease, encoded, shm)
          end)

        Shm.finish(shm, not match?({:ok, _}, result))
        Pool.checkin(lease, outcome(result, sid))
        stop_meta = stop_metadata(meta, lease, result)

        ms = System.convert_time_unit(System.monotonic_time() - t0, :native, :microsecond) / 1000
        trace = if meta.trace_id, do: [trace_id: meta.trace_id], else: []

        Logger.debug(
          fn -> "snakepit #{tool} #{if stop_meta.result == :ok, do: "ok", else: "failed"}" end,
          [pool: lease.pool_name, worker: lease.worker_id, tool: tool, duration_ms: ms] ++ trace
        )

        Telemetry.call_stop(start, stop_meta)
        result

      {:error, _} = error ->
        Telemetry.call_stop(start, stop_metadata(meta, nil, error))
        error
    end
  end

  # The call run by `node`'s pool (Snakepit.Cluster.call/5), as this call's span, with `node`.
  defp remote_call(start, meta, node, pool, {fun, args}, opts) do
    result = guarded(start, meta, nil, nil, fn -> Cluster.call(node, pool, fun, args, opts) end)
    Telemetry.call_stop(start, Map.put(stop_metadata(meta, nil, result), :node, node))
    result
  end

  # A slot of the local pool; with plan :try_local, when it has none free at once, a node to run
  # the call instead ({:remote, node}), else a slot after the usual wait in its queue.
  defp routed_checkout(pool, meta, :try_local, opts) do
    case checkout(pool, meta, [{:queue, false} | opts]) do
      {:error, %Error{reason: :pool_saturated}} ->
        case Cluster.pick_node(pool, true) do
          {:ok, node} -> {:remote, node}
          :none -> checkout(pool, meta, opts)
        end

      checked_out ->
        checked_out
    end
  end

  defp routed_checkout(pool, meta, _plan, opts), do: checkout(pool, meta, opts)

  # Runs `fun`; when it raises, throws or exits, the call's span ends with :exception (and the
  # slot, if it has one, is given back as abandoned, once the call's regions are deleted) before
  # it goes on.
  defp guarded(start, meta, lease, shm, fun) do
    fun.()
  catch
    kind, reason ->
      Shm.finish(shm, true)
      # (a stream whose callback raised was cancelled: its tool may still run)
      if lease, do: Pool.checkin(lease, :abandoned)

      Telemetry.call_exception(
        start,
        kind,
        reason,
        __STACKTRACE__,
        Map.merge(meta, worker_metadata(lease))
      )

      :erlang.raise(kind, reason, __STACKTRACE__)
  end

  # A pool slot, and its [:snakepit, :queue, :wait] event: how long the caller waited for it (none
  # for a checkout that would not queue and found no free slot: the call goes on elsewhere).
  defp checkout(pool, meta, opts) do
    start = System.monotonic_time()

    case Pool.checkout(pool, opts) do
      {:error, %Error{reason: :pool_saturated}} = saturated -> saturated
      checkout -> queue_wait_event(meta, checkout, System.monotonic_time() - start)
    end
  end

  defp queue_wait_event(meta, checkout, waited) do
    {lease, outcome} =
      case checkout do
        {:ok, lease} -> {lease, %{result: :ok, error_reason: nil, queued: lease.queued}}
        {:error, e} -> {nil, %{result: :error, error_reason: error_reason(e), queued: false}}
      end

    metadata =
      meta
      |> Map.take([:pool, :tool, :operation, :trace_id, :traceparent])
      |> Map.merge(outcome)
      |> Map.merge(worker_metadata(lease))

    Telemetry.execute([:snakepit, :queue, :wait], %{duration: waited}, metadata)
    checkout
  end

  defp span(operation, tool), do: %{operation: operation, tool: tool}

  # The option :traceparent replaced by the traceparent the call sends (see Snakepit.TraceContext),
  # nil for none: what CallEngine sends. Once per call: resolving again would read the process
  # dictionary when the option was invalid.
  defp put_traceparent(opts), do: Keyword.put(opts, :traceparent, TraceContext.resolve(opts))

  defp call_metadata(pool, span, opts) do
    traceparent = opts[:traceparent]

    Map.merge(
      %{
        pool: pool,
        session_id: opts[:session_id],
        request_id: opts[:request_id],
        traceparent: traceparent,
        trace_id: traceparent && TraceContext.trace_id(traceparent)
      },
      span
    )
  end

  defp stop_metadata(meta, lease, result) do
    outcome =
      case result do
        {:error, e} -> %{result: :error, error: e, error_reason: error_reason(e)}
        :halted -> %{result: :halted, error: nil, error_reason: nil}
        _ -> %{result: :ok, error: nil, error_reason: nil}
      end

    meta |> Map.merge(worker_metadata(lease)) |> Map.merge(outcome)
  end

  defp error_reason(%Error{reason: reason}), do: reason
  defp error_reason(_other), do: nil

  defp worker_metadata(nil),
    do: %{worker: nil, worker_pid: nil, os_pid: nil, port: nil, uds: nil}

  defp worker_metadata(lease) do
    %{
      worker: lease.worker_id,
      worker_pid: lease.worker,
      os_pid: Map.get(lease, :os_pid),
      port: Map.get(lease, :port),
      uds: Map.get(lease, :uds)
    }
  end

  # How a call's result is checked in (see Snakepit.Pool.checkin/2).
  defp outcome({:error, %Error{reason: :session_init_failed}}, sid),
    do: {:session_init_failed, sid}

  # past its deadline the call was cancelled, not ended by the server
  defp outcome({:error, %Error{reason: :timeout}}, _sid), do: :abandoned
  defp outcome({:error, _}, _sid), do: :error
  defp outcome(_result, _sid), do: :ok

  defp maybe_init_session(%{init_session: true} = lease, opts) do
    sid = Keyword.fetch!(opts, :session_id)

    state =
      case opts[:session_state] do
        nil -> {"", []}
        st -> Codec.encode(st)
      end

    req =
      %{
        session_id: sid,
        state_json: elem(state, 0),
        blobs: elem(state, 1),
        ttl_seconds: opts[:session_ttl] || 0,
        metadata: %{}
      }
      |> put_present(:seed, opts[:session_seed])

    case unary(
           lease,
           "InitializeSession",
           :initialize_session_request,
           req,
           :initialize_session_response,
           nil,
           Keyword.take(opts, [:traceparent])
         ) do
      {:ok, _} ->
        :ok

      {:error, e} ->
        {:error,
         %{
           e
           | reason: :session_init_failed,
             message: "InitializeSession #{sid}: #{e.message} (#{e.reason})"
         }}
    end
  end

  defp maybe_init_session(_lease, _opts), do: :ok

  defp tool_request(tool, json, blobs, opts, shm) do
    %{
      tool_name: tool,
      args_json: json,
      blobs: blobs,
      session_id: opts[:session_id] || "",
      request_id: opts[:request_id] || "",
      metadata: opts[:metadata] || %{}
    }
    |> put_present(:seed, opts[:seed])
    |> Map.merge(Shm.request_fields(shm))
  end

  defp put_present(map, _key, nil), do: map
  defp put_present(map, key, value), do: Map.put(map, key, value)

  defp unary(lease, method, req_type, req, resp_type, tool, opts),
    do: CallEngine.unary(lease, method, req_type, req, resp_type, tool, opts)

  defp decode_msg(type, bin), do: CallEngine.decode_msg(type, bin)

  defp decode_value(json, blobs, tool, opts), do: CallEngine.decode_value(json, blobs, tool, opts)

  defp args_encoder(args, tool), do: fn shm -> encode(args, tool, shm) end

  defp run_encoder(nil, _shm), do: {:ok, nil, []}
  defp run_encoder(encoder, shm), do: encoder.(shm)

  # {:ok, {json, blobs}, placements}: the arguments with their large blobs as regions of `shm`
  # (`item`: a batch item's index, which names its regions)
  defp encode(args, tool, shm, item \\ nil) do
    {json, blobs, placements} = Codec.encode_args_placing(args, shm && Shm.args_spec(shm, item))

    {:ok, {json, blobs}, placements}
  rescue
    e in ArgumentError -> {:error, Error.new(:invalid_argument, Exception.message(e), tool: tool)}
  end

  # This call's regions in the pool's shared-memory directory, or nil (the pool has none).
  defp call_regions(pool) do
    case Pool.shm(pool) do
      nil -> nil
      shm -> Shm.new_call(shm)
    end
  end

  defp write_args(shm, tool) do
    case Shm.write_args(shm) do
      :ok -> :ok
      {:error, message} -> {:error, Error.new(:resource_exhausted, message, tool: tool)}
    end
  end

  # The call options as CallEngine decodes results with: through the call's regions.
  defp with_regions(opts, nil), do: opts
  defp with_regions(opts, shm), do: Keyword.put(opts, :shm_call, shm)
end
