defmodule Snakepit.GRPC.Error do
  @moduledoc """
  A failed gRPC call: the status (atom and code), its message and the trailing metadata
  (`-bin` values already base64-decoded).
  """

  alias Snakepit.GRPC.Status

  defexception status: :unknown, code: 2, message: "", trailers: []

  @type t :: %__MODULE__{
          status: Status.t(),
          code: non_neg_integer(),
          message: String.t(),
          trailers: [{String.t(), binary()}]
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

  @impl true
  def message(%__MODULE__{status: status, code: code, message: message}),
    do: "gRPC #{status} (#{code}): #{message}"
end
