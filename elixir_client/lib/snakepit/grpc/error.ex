defmodule Snakepit.GRPC.Error do
  @moduledoc """
  A failed gRPC call: the status (atom and code), its message and the trailing metadata
  (`-bin` values already base64-decoded).

  `connection_lost` is true when the call failed because its connection went down (or its channel
  was not running): the server may have run it, and whatever serves that connection is likely
  gone. A call the server answered, reset or refused (GOAWAY included) has it false.
  """

  alias Snakepit.GRPC.Status

  defexception status: :unknown, code: 2, message: "", trailers: [], connection_lost: false

  @type t :: %__MODULE__{
          status: Status.t(),
          code: non_neg_integer(),
          message: String.t(),
          trailers: [{String.t(), binary()}],
          connection_lost: boolean()
        }

  @doc "An error for `status` with `message`."
  @spec new(Status.t(), String.t(), [{String.t(), binary()}]) :: t()
  def new(status, message, trailers \\ []) do
    %__MODULE__{
      status: status,
      code: Status.to_code(status),
      message: message,
      trailers: trailers
    }
  end

  @doc "An `:unavailable` error of a call whose connection went down, with `message`."
  @spec connection_lost(String.t()) :: t()
  def connection_lost(message), do: %{new(:unavailable, message) | connection_lost: true}

  @impl true
  def message(%__MODULE__{status: status, code: code, message: message}),
    do: "gRPC #{status} (#{code}): #{message}"
end
