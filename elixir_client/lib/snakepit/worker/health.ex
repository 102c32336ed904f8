defmodule Snakepit.Worker.Health do
  @moduledoc """
  The two questions the pool asks a worker's server over the worker's existing channel, each with
  its own deadline. Neither waits behind tool calls on the server (control RPCs are not gated).

    * `check/2` - `grpc.health.v1.Health/Check` of the BridgeService: is the server alive and
      serving? (A SIGSTOPped or wedged server answers nothing: the deadline passes.)
    * `active_calls/2` - `GetStats.requests_active`: how many tool calls (running or queued) the
      server has now, to learn whether calls whose callers gave up still hold its slots.
  """

  alias Snakepit.{Protobuf, Proto}
  alias Snakepit.GRPC.Channel

  @health_check "/grpc.health.v1.Health/Check"
  @get_stats "/snakepit.bridge.BridgeService/GetStats"
  @service "snakepit.bridge.BridgeService"
  # grpc.health.v1.HealthCheckResponse.ServingStatus
  @serving 1

  @doc "`:ok` when the server answers SERVING within `timeout` ms, else `{:error, why}`."
  @spec check(GenServer.server(), pos_integer) :: :ok | {:error, String.t()}
  def check(channel, timeout) do
    # HealthCheckRequest{service = 1}; not in the bridge's proto, so encoded here
    request = [Protobuf.encode_key(1, 2), Protobuf.encode_scalar(:string, @service)]

    with {:ok, body} <- call(channel, @health_check, request, timeout),
         {:ok, fields} <- Protobuf.decode_fields(body) do
      case List.keyfind(fields, 1, 0) do
        {1, 0, @serving} -> :ok
        {1, 0, status} -> {:error, "health status #{status} (not SERVING)"}
        nil -> {:error, "health status UNKNOWN (not SERVING)"}
      end
    else
      {:error, why} when is_binary(why) -> {:error, why}
      {:error, why} -> {:error, "bad health response: #{inspect(why)}"}
    end
  end

  @doc "The server's `requests_active` (tool calls running or queued there) within `timeout` ms."
  @spec active_calls(GenServer.server(), pos_integer) ::
          {:ok, non_neg_integer} | {:error, String.t()}
  def active_calls(channel, timeout) do
    with {:ok, body} <- call(channel, @get_stats, Proto.encode(:get_stats_request, %{}), timeout) do
      case Proto.decode(:get_stats_response, body) do
        {:ok, stats} -> {:ok, stats.requests_active}
        {:error, why} -> {:error, "bad GetStats response: #{inspect(why)}"}
      end
    end
  end

  defp call(channel, path, request, timeout) do
    case Channel.unary(channel, path, request, timeout: timeout) do
      {:ok, body, _trailers} -> {:ok, body}
      {:error, %{status: :deadline_exceeded}} -> {:error, "no answer within #{timeout} ms"}
      {:error, e} -> {:error, "#{e.status}: #{e.message}"}
    end
  catch
    :exit, reason -> {:error, "channel down: #{inspect(reason)}"}
  end
end
