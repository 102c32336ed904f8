defmodule Snakepit.TraceContext do
  @moduledoc """
  W3C trace context (https://www.w3.org/TR/trace-context/) for the calls of `Snakepit`.

  A call sends a `traceparent` gRPC header when its caller has one:

    * the call's option `traceparent: "00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>"`, or
    * else the caller's process dictionary under `:snakepit_traceparent`
      (`Process.put(:snakepit_traceparent, traceparent)`, e.g. set once per request by the code
      that started the trace).

  The option wins when it is given (not nil), even when it is invalid. A value that does not parse
  is ignored, as the W3C recommendation says: the call is made, without the header (logged at
  `:debug`). The rules are the Python server's (`snakepit_bridge/server/tracing.py`): lower-case hex,
  version `ff` invalid, all-zero trace or parent id invalid, version `00` exactly four fields, a
  later version may add fields after the flags, at most 512 bytes; surrounding whitespace is
  trimmed.

  The server puts it in the tool's `ctx.traceparent` / `ctx.trace_id` and in every log line of the
  call (`[<request id> trace=<trace id>]`); the client puts `trace_id` and `traceparent` in the
  call's telemetry metadata (`Snakepit.Telemetry`) and its `:debug` log line.
  """

  require Logger

  @process_key :snakepit_traceparent
  @max_length 512

  @doc "The process dictionary key a caller's traceparent is read from: `#{inspect(@process_key)}`."
  @spec process_key() :: atom
  def process_key, do: @process_key

  @doc """
  The valid traceparent a call with options `opts` sends, from `opts[:traceparent]` or else the
  process dictionary; nil when there is none or it is invalid.
  """
  @spec resolve(keyword) :: String.t() | nil
  def resolve(opts) do
    case Keyword.get(opts, :traceparent) || Process.get(@process_key) do
      nil ->
        nil

      candidate ->
        case parse(candidate) do
          {:ok, %{header: header}} ->
            header

          :error ->
            Logger.debug("snakepit: ignoring invalid traceparent #{inspect(candidate)}")
            nil
        end
    end
  end

  @doc """
  Parses a `traceparent` value: `{:ok, %{header, version, trace_id, parent_id, flags}}` (`header`:
  the value as it is sent, trimmed) or `:error`.
  """
  @spec parse(term) ::
          {:ok,
           %{
             header: String.t(),
             version: String.t(),
             trace_id: String.t(),
             parent_id: String.t(),
             flags: String.t()
           }}
          | :error
  def parse(value) when is_binary(value) and byte_size(value) <= @max_length do
    header = String.trim(value)

    with <<version::binary-2, ?-, trace_id::binary-32, ?-, parent_id::binary-16, ?-,
           flags::binary-2, rest::binary>> <- header,
         true <- Enum.all?([version, trace_id, parent_id, flags], &lower_hex?/1),
         true <- version != "ff",
         true <- rest == "" or (version != "00" and String.starts_with?(rest, "-")),
         true <- trace_id != String.duplicate("0", 32),
         true <- parent_id != String.duplicate("0", 16) do
      {:ok,
       %{
         header: header,
         version: version,
         trace_id: trace_id,
         parent_id: parent_id,
         flags: flags
       }}
    else
      _ -> :error
    end
  end

  def parse(_value), do: :error

  @doc "The trace id (32 hex digits) of a valid traceparent."
  @spec trace_id(String.t()) :: String.t()
  def trace_id(<<_version::binary-2, ?-, trace_id::binary-32, _::binary>>), do: trace_id

  defp lower_hex?(s), do: s =~ ~r/\A[0-9a-f]+\z/
end
