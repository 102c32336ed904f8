defmodule Snakepit.GRPC.Call do
  @moduledoc """
  The response side of one gRPC call as a pure state machine: feed it the HTTP/2 events of its
  stream, get back the decoded messages and, once the call is over, its outcome.

  Handles normal responses (headers, length-prefixed messages, trailers), Trailers-Only responses
  (a single HEADERS frame with END_STREAM carrying `grpc-status`), HTTP-level failures (a
  `:status` other than 200, a non-gRPC content type, missing `grpc-status`) and stream resets.
  """

  alias Snakepit.GRPC.{Error, Message, Metadata, Status}

  defstruct stage: :headers, decoder: nil, max_message_size: 64 * 1024 * 1024

  @type t :: %__MODULE__{
          stage: :headers | :messages | :done,
          decoder: Message.decoder() | nil,
          max_message_size: pos_integer()
        }
  @type outcome :: {:ok, [{String.t(), binary()}]} | {:error, Error.t()}
  @type result :: {:cont, t(), [binary()]} | {:done, t(), [binary()], outcome()}

  @doc "A call waiting for its response headers."
  @spec new(keyword()) :: t()
  def new(opts \\ []) do
    max = Keyword.get(opts, :max_message_size, 64 * 1024 * 1024)
    %__MODULE__{max_message_size: max, decoder: Message.new_decoder(max)}
  end

  @doc """
  Advances the call with one HTTP/2 event of its stream (`{:headers, ...}`, `{:data, ...}` or
  `{:reset, ...}`). `{:done, ...}` means the call is over; the stream may still be open on the
  HTTP/2 side (e.g. a non-200 response), in which case the owner should cancel it.
  """
  @spec handle_event(t(), tuple()) :: result()
  def handle_event(%__MODULE__{stage: :done} = call, _event), do: {:cont, call, []}

  def handle_event(%__MODULE__{stage: :headers} = call, {:headers, _sid, headers, end_stream}) do
    status = header(headers, ":status")
    content_type = header(headers, "content-type") || ""

    cond do
      status != "200" ->
        http_status =
          case Integer.parse(status || "") do
            {code, ""} -> code
            _ -> 0
          end

        message = "HTTP status #{status || "missing"} from server" <> grpc_detail(headers)

        done(
          call,
          [],
          {:error, Error.new(Status.from_http_status(http_status), message, trailers(headers))}
        )

      end_stream ->
        # Trailers-Only: the one header block carries the status.
        done(call, [], outcome(headers))

      not String.starts_with?(content_type, "application/grpc") ->
        done(
          call,
          [],
          {:error, Error.new(:unknown, "unexpected content-type #{inspect(content_type)}")}
        )

      true ->
        {:cont, %{call | stage: :messages}, []}
    end
  end

  def handle_event(%__MODULE__{stage: :messages} = call, {:data, _sid, data, end_stream}) do
    case Message.feed(call.decoder, data) do
      {:ok, messages, decoder} when end_stream ->
        done(
          %{call | decoder: decoder},
          messages,
          {:error,
           Error.new(:internal, "server ended the stream without trailers (no grpc-status)")}
        )

      {:ok, messages, decoder} ->
        {:cont, %{call | decoder: decoder}, messages}

      {:error, :compressed} ->
        done(
          call,
          [],
          {:error,
           Error.new(
             :internal,
             "received a compressed message, but no compression was negotiated"
           )}
        )

      {:error, {:too_large, size}} ->
        done(
          call,
          [],
          {:error,
           Error.new(
             :resource_exhausted,
             "received message of #{size} bytes exceeds the limit of #{call.max_message_size}"
           )}
        )

      {:error, reason} ->
        done(
          call,
          [],
          {:error, Error.new(:internal, "malformed gRPC message framing: #{inspect(reason)}")}
        )
    end
  end

  def handle_event(%__MODULE__{stage: :messages} = call, {:headers, _sid, trailers, end_stream}) do
    cond do
      not end_stream ->
        done(call, [], {:error, Error.new(:internal, "trailers without END_STREAM")})

      Message.buffered(call.decoder) > 0 ->
        done(
          call,
          [],
          {:error,
           Error.new(
             :internal,
             "stream ended inside a message (#{Message.buffered(call.decoder)} bytes left over)"
           )}
        )

      true ->
        done(call, [], outcome(trailers))
    end
  end

  def handle_event(%__MODULE__{stage: :headers} = call, {:data, _sid, _data, _end}),
    do: done(call, [], {:error, Error.new(:internal, "DATA before response headers")})

  def handle_event(call, {:reset, _sid, code}) do
    done(call, [], {:error, Error.new(Status.from_reset_code(code), reset_message(code))})
  end

  defp reset_message(:cancel), do: "stream cancelled by the server (RST_STREAM CANCEL)"
  defp reset_message(:refused_stream), do: "server refused the stream (RST_STREAM REFUSED_STREAM)"
  defp reset_message(:enhance_your_calm), do: "server reset the stream: ENHANCE_YOUR_CALM"
  defp reset_message(code), do: "server reset the stream: RST_STREAM #{inspect(code)}"

  defp done(call, messages, outcome), do: {:done, %{call | stage: :done}, messages, outcome}

  defp outcome(trailers) do
    decoded = trailers(trailers)

    case header(trailers, "grpc-status") do
      nil ->
        {:error, Error.new(:internal, "response has no grpc-status", decoded)}

      code ->
        case Integer.parse(code) do
          {0, ""} ->
            {:ok, decoded}

          {n, ""} ->
            message = Metadata.decode_message(header(trailers, "grpc-message") || "")
            status = Status.to_atom(n)
            {:error, %Error{status: status, code: n, message: message, trailers: decoded}}

          _ ->
            {:error, Error.new(:internal, "malformed grpc-status #{inspect(code)}", decoded)}
        end
    end
  end

  defp grpc_detail(headers) do
    case header(headers, "grpc-message") do
      nil -> ""
      message -> ": " <> Metadata.decode_message(message)
    end
  end

  # Metadata as the caller sees it: no pseudo-headers, -bin values decoded.
  defp trailers(headers) do
    headers
    |> Enum.reject(fn {name, _} -> String.starts_with?(name, ":") end)
    |> Metadata.decode_metadata()
  end

  defp header(headers, name) do
    case List.keyfind(headers, name, 0) do
      {_, value} -> value
      nil -> nil
    end
  end
end
