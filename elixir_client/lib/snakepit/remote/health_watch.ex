defmodule Snakepit.Remote.HealthWatch do
  @moduledoc """
  Client-side health checking (gRFC A17) of one channel: a `grpc.health.v1.Health/Watch`
  server stream for the BridgeService. The server sends the service's status at once and again
  whenever it changes; the stream stays open for the life of the connection. The caller receives
  the stream's events itself (`{:snakepit_grpc, ref, event}`, see `Snakepit.GRPC.Channel`) and
  reads each message with `status/1`.
  """

  alias Snakepit.GRPC.Channel
  alias Snakepit.Protobuf

  @watch "/grpc.health.v1.Health/Watch"
  @service "snakepit.bridge.BridgeService"

  @type status :: :serving | :not_serving | :unknown | :service_unknown

  @doc "Starts the Watch stream on `channel`; its events go to the calling process under the ref."
  @spec start(GenServer.server()) :: {:ok, reference} | {:error, Snakepit.GRPC.Error.t()}
  def start(channel) do
    # HealthCheckRequest{service = 1}; not in the bridge's proto, so encoded here
    request = [Protobuf.encode_key(1, 2), Protobuf.encode_scalar(:string, @service)]
    Channel.server_stream(channel, @watch, request, timeout: :infinity)
  end

  @doc "The status of one HealthCheckResponse message (field 1, ServingStatus)."
  @spec status(binary) :: {:ok, status} | {:error, String.t()}
  def status(message) do
    case Protobuf.decode_fields(message) do
      {:ok, fields} ->
        case List.keyfind(fields, 1, 0) do
          {1, 0, 1} -> {:ok, :serving}
          {1, 0, 2} -> {:ok, :not_serving}
          {1, 0, 3} -> {:ok, :service_unknown}
          _ -> {:ok, :unknown}
        end

      {:error, why} ->
        {:error, "bad HealthCheckResponse: #{inspect(why)}"}
    end
  end
end
