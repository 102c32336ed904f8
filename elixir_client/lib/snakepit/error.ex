defmodule Snakepit.Error do
  @moduledoc """
  Every failure of a `Snakepit` call.

  `reason` is one of:

    * `:not_found` - unknown tool or session (gRPC NOT_FOUND)
    * `:invalid_argument` - bad JSON or a missing/unknown/mistyped parameter; `message` names it
    * `:failed_precondition` - a streaming tool called through `execute` or the reverse
    * `:tool_error` - the Python tool raised; `python_type`, `message` and `traceback` describe it
    * `:timeout` - the call passed its deadline (`call_timeout` / `:timeout` option)
    * `:queue_full` - every worker slot was busy and `queue_size` callers already waited
    * `:queue_timeout` - waited `queue_timeout` ms for a free slot
    * `:node_down` - the call was running on another BEAM node's pool (`Snakepit.Cluster`) and
      that node went down or lost its connection during it
    * `:worker_crashed` - the worker running the call died during it
    * `:worker_unhealthy` - the worker running the call failed its health check (no SERVING answer
      within `health_check_timeout`, e.g. a SIGSTOPped server) and the pool replaced it; `message`
      says which check failed
    * `:worker_start_failed` - no worker is ready and the last one to start exited before it was
      ready (or could not be spawned); `message` ends with the server's last line of output, e.g.
      `error: adapter setup failed: ValueError: ...` or `ModuleNotFoundError: No module named 'grpc'`
    * `:startup_timeout` - workers did not print their ready line within `startup_timeout`
    * `:pool_stopped` - `Snakepit.stop_pool/2` was called: the call was queued or new, or it was still
      running after the stop's grace period
    * `:unavailable` - the worker (or pool) cannot serve, e.g. shutting down or not started
    * `:unauthenticated` - missing or wrong bearer token
    * `:resource_exhausted` - the server refused (its own queue full, message too large)
    * `:cancelled`, `:internal`, `:unknown`, `:invalid_response`, `:pool_not_found`, ...

  `grpc_status` is the gRPC status atom when the failure came from the server or the transport.
  """

  alias Snakepit.GRPC.Status

  defexception [:reason, :message, :grpc_status, :python_type, :traceback, :tool]

  @type t :: %__MODULE__{
          reason: atom,
          message: String.t() | nil,
          grpc_status: atom | nil,
          python_type: String.t() | nil,
          traceback: String.t() | nil,
          tool: String.t() | nil
        }

  @impl true
  def message(%__MODULE__{reason: reason, message: msg, python_type: type, tool: tool}) do
    where = if tool, do: " in tool #{tool}", else: ""
    type = if type && type != "", do: " #{type}:", else: ""
    "snakepit #{reason}#{where}:#{type} #{msg}"
  end

  @doc false
  def new(reason, message, fields \\ []) do
    struct(%__MODULE__{reason: reason, message: message}, fields)
  end

  @doc """
  Builds an error from a transport error (`%Snakepit.GRPC.Error{}`) of a call to `tool`.

  When the trailer `snakepit-error-bin` carries a `ToolError`: a Python exception that was raised
  by the tool (it has a traceback, or the status is UNKNOWN) gives `:tool_error`; a validation
  failure (no traceback) keeps the status' reason, e.g. `:invalid_argument`. Both carry
  `python_type` and `traceback`.
  """
  @spec from_grpc(map, String.t() | nil) :: t
  def from_grpc(%{status: status, message: message} = grpc_error, tool) do
    trailers = Map.get(grpc_error, :trailers) || []
    base_reason = reason_for(status)

    case tool_error_from_trailers(trailers) do
      {:ok, te} ->
        reason =
          cond do
            te.traceback not in [nil, ""] -> :tool_error
            status in [:unknown, :internal] -> :tool_error
            true -> base_reason
          end

        %__MODULE__{
          reason: reason,
          message: nonempty(te.message) || message,
          grpc_status: status,
          python_type: nonempty(te.type),
          traceback: nonempty(te.traceback),
          tool: nonempty(te.tool_name) || tool
        }

      :none ->
        %__MODULE__{reason: base_reason, message: message, grpc_status: status, tool: tool}
    end
  end

  @doc "Builds an error from a `ToolError` proto map (a failed batch item)."
  @spec from_tool_error(map, String.t() | nil) :: t
  def from_tool_error(te, tool) do
    status = if is_integer(te.code), do: Status.to_atom(te.code), else: :unknown

    reason =
      if te.traceback not in [nil, ""] or status in [:unknown, :internal, :ok],
        do: :tool_error,
        else: reason_for(status)

    %__MODULE__{
      reason: reason,
      message: te.message,
      grpc_status: status,
      python_type: nonempty(te.type),
      traceback: nonempty(te.traceback),
      tool: nonempty(te.tool_name) || tool
    }
  end

  defp tool_error_from_trailers(trailers) do
    bin =
      Enum.find_value(trailers, fn
        {"snakepit-error-bin", v} -> v
        _ -> nil
      end)

    with bin when is_binary(bin) <- bin,
         {:ok, te} <- Snakepit.Proto.decode(:tool_error, bin) do
      {:ok, te}
    else
      _ -> :none
    end
  end

  # A failure's reason is its gRPC status (Snakepit.GRPC.Status), except that a passed deadline
  # is :timeout, whoever noticed it.
  defp reason_for(:deadline_exceeded), do: :timeout
  defp reason_for(nil), do: :unknown
  defp reason_for(status), do: status

  defp nonempty(""), do: nil
  defp nonempty(v), do: v
end
