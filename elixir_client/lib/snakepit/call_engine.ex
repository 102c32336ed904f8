defmodule Snakepit.CallEngine do
  @moduledoc """
  Runs `Snakepit`'s gRPC calls on a lease's worker channel, and turns every way one can fail into
  a `%Snakepit.Error{}` in one place (`failure/3`).

  Unary calls (a tool call, a batch, the session calls) and streaming tool calls take their
  events through the same receive, `Snakepit.GRPC.Channel.next/1`, which sees messages, the end of
  the call (trailers, a reset, the channel going down) and a deadline the channel missed; a unary
  call is the one that collects its one message (`Snakepit.GRPC.Channel.collect/1`), a stream
  decodes each message as a `ToolChunk`.
  """

  alias Snakepit.{Codec, Error, Pool, Proto, Shm}
  alias Snakepit.GRPC.Channel

  @service "/snakepit.bridge.BridgeService/"
  # Longest wait for a worker whose channel went down to exit too. It exits as soon as it sees its
  # channel's exit; only a worker that is stopping on purpose outlives its channel. (A lease's own
  # `:worker_exit_wait` overrides it: the tests make it long, so that "at once" is told apart from
  # "after the wait" however loaded the machine is.)
  @worker_exit_wait 2_000

  @type lease :: Pool.lease()
  @type tool :: String.t() | nil

  @doc """
  Calls BridgeService `method` with the `req_type` message `request`; decodes the response as
  `resp_type`. Options: `:timeout` (ms, default the lease's `call_timeout`), `:traceparent` (sent
  as the `traceparent` header when not nil; already validated, see `Snakepit.TraceContext`).
  """
  @spec unary(lease, String.t(), atom, map, atom, tool, keyword) ::
          {:ok, map} | {:error, Error.t()}
  def unary(lease, method, req_type, request, resp_type, tool, opts) do
    timeout = Keyword.get(opts, :timeout, lease.call_timeout)

    case Channel.unary(lease.channel, @service <> method, Proto.encode(req_type, request),
           timeout: timeout,
           metadata: trace_headers(opts)
         ) do
      {:ok, bin, _trailers} -> decode_msg(resp_type, bin)
      {:error, e} -> {:error, failure(lease, e, tool)}
    end
  end

  @doc """
  Starts ExecuteStreamingTool with the `ExecuteToolRequest` map `request`. Options: `:timeout`
  (covers the whole stream), `:window` (bytes of chunks the worker may be ahead of the consumer),
  `:traceparent` (as in `unary/7`).
  """
  @spec start_stream(lease, String.t(), map, keyword) ::
          {:ok, Channel.Handle.t()} | {:error, Error.t()}
  def start_stream(lease, tool, request, opts) do
    case Channel.start_call(
           lease.channel,
           @service <> "ExecuteStreamingTool",
           Proto.encode(:execute_tool_request, request),
           timeout: Keyword.get(opts, :timeout, lease.call_timeout),
           window: Keyword.get(opts, :window),
           metadata: trace_headers(opts)
         ) do
      {:ok, call} -> {:ok, call}
      {:error, e} -> {:error, failure(lease, e, tool)}
    end
  end

  @doc """
  The next chunk of a stream: `{:chunk, value}`, `{:final, value}` (the generator's return value;
  the stream then ends), `:done`, or `{:error, %Snakepit.Error{}}` (the call is over; a chunk that
  cannot be decoded cancels it).
  """
  @spec next_chunk(lease, Channel.Handle.t(), tool, keyword) ::
          {:chunk, term} | {:final, term} | :done | {:error, Error.t()}
  def next_chunk(lease, call, tool, opts) do
    case Channel.next(call) do
      {:message, bin} ->
        with {:ok, chunk} <- decode_msg(:tool_chunk, bin),
             {:ok, value} <- decode_value(chunk.data_json, chunk.blobs, tool, opts) do
          if chunk.is_final, do: {:final, value}, else: {:chunk, value}
        else
          error ->
            Channel.cancel(call)
            error
        end

      {:done, _trailers} ->
        :done

      {:error, e} ->
        {:error, failure(lease, e, tool)}
    end
  end

  @doc """
  Runs a started stream to its end, calling `callback` with each chunk's value; returns
  `{:ok, final}` (the generator's return value, or nil) or `{:error, %Snakepit.Error{}}`. A callback
  that raises or throws cancels the stream.
  """
  @spec run_stream(lease, Channel.Handle.t(), tool, keyword, (term -> any)) ::
          {:ok, term} | {:error, Error.t()}
  def run_stream(lease, call, tool, opts, callback) do
    run_stream(lease, call, tool, opts, callback, nil)
  catch
    kind, reason ->
      Channel.cancel(call)
      :erlang.raise(kind, reason, __STACKTRACE__)
  end

  defp run_stream(lease, call, tool, opts, callback, final) do
    case next_chunk(lease, call, tool, opts) do
      {:chunk, value} ->
        callback.(value)
        run_stream(lease, call, tool, opts, callback, final)

      {:final, value} ->
        run_stream(lease, call, tool, opts, callback, value)

      :done ->
        {:ok, final}

      {:error, _} = error ->
        error
    end
  end

  defp trace_headers(opts) do
    case Keyword.get(opts, :traceparent) do
      nil -> []
      traceparent -> [{"traceparent", traceparent}]
    end
  end

  @doc "Cancels a started stream (its tool may go on running on the server)."
  @spec cancel(Channel.Handle.t()) :: :ok
  def cancel(call), do: Channel.cancel(call)

  @doc """
  The `%Snakepit.Error{}` of a call on `lease` that failed with `grpc_error` (from the server's
  status and trailers, a stream reset, the channel, or a deadline; see `Snakepit.Error.from_grpc/2`).

  An `:unavailable` failure is made more precise: on a worker the pool stopped on purpose it has the
  pool's reason (`Snakepit.Pool.worker_fate/1`); when the call lost its connection
  (`connection_lost`), it is `:worker_crashed` as soon as the worker is seen to exit, which follows
  at once (the worker goes down with its channel, or its Python process exited first). Otherwise
  (the server answered UNAVAILABLE, refused the stream, or sent GOAWAY: safe to retry elsewhere)
  it is `:unavailable` at once.
  """
  @spec failure(lease, Snakepit.GRPC.Error.t(), tool) :: Error.t()
  def failure(lease, grpc_error, tool) do
    error = Error.from_grpc(grpc_error, tool)
    if error.reason == :unavailable, do: fate_or_crash(lease, grpc_error, error), else: error
  end

  # A lost connection takes the worker with it (it is linked to its channel, or its Python process
  # exited first): wait for that exit, not a fixed time. Any other :unavailable (the server
  # answered it, refused the stream, sent GOAWAY) came from a live worker.
  defp fate_or_crash(lease, grpc_error, error) do
    with nil <- fate(lease, error) do
      if grpc_error.connection_lost, do: await_worker_exit(lease, error), else: error
    end
  end

  defp fate(lease, error) do
    case Pool.worker_fate(lease) do
      {reason, message} -> %{error | reason: reason, message: "#{message} (#{error.message})"}
      nil -> nil
    end
  end

  defp await_worker_exit(lease, error) do
    ref = Process.monitor(lease.worker)

    receive do
      {:DOWN, ^ref, :process, _, _} ->
        # (the pool may have stopped it on purpose meanwhile)
        fate(lease, error) ||
          %{
            error
            | reason: :worker_crashed,
              message: "worker #{lease.worker_id} crashed during the call (#{error.message})"
          }
    after
      Map.get(lease, :worker_exit_wait, @worker_exit_wait) ->
        Process.demonitor(ref, [:flush])
        fate(lease, error) || error
    end
  end

  @doc "Decodes a response message of `type`; `:invalid_response` when it cannot."
  @spec decode_msg(atom, binary) :: {:ok, map} | {:error, Error.t()}
  def decode_msg(type, bin) do
    case Proto.decode(type, bin) do
      {:ok, m} ->
        {:ok, m}

      {:error, r} ->
        {:error, Error.new(:invalid_response, "cannot decode #{type}: #{inspect(r)}")}
    end
  end

  @doc """
  Decodes a result's JSON and blobs (option `:bytes`; `:shm_call`, the call's `Snakepit.Shm`
  regions, which its result region references are read from); `:invalid_response` when it cannot.
  """
  @spec decode_value(binary, list, tool, keyword) :: {:ok, term} | {:error, Error.t()}
  def decode_value(json, blobs, tool, opts) do
    case Codec.decode(json, blobs,
           bytes: Keyword.get(opts, :bytes, :binary),
           read_region: Shm.reader(opts[:shm_call])
         ) do
      {:ok, v} -> {:ok, v}
      {:error, msg} -> {:error, Error.new(:invalid_response, msg, tool: tool)}
    end
  end
end
