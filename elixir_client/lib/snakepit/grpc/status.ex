defmodule Snakepit.GRPC.Status do
  @moduledoc """
  gRPC status codes (grpc/doc/statuscodes.md): integer <-> atom, and the status a client reports for
  a failure below gRPC (an HTTP status, an RST_STREAM code). The one status table of the client.
  """

  @codes [
    ok: 0,
    cancelled: 1,
    unknown: 2,
    invalid_argument: 3,
    deadline_exceeded: 4,
    not_found: 5,
    already_exists: 6,
    permission_denied: 7,
    resource_exhausted: 8,
    failed_precondition: 9,
    aborted: 10,
    out_of_range: 11,
    unimplemented: 12,
    internal: 13,
    unavailable: 14,
    data_loss: 15,
    unauthenticated: 16
  ]

  @type t ::
          :ok
          | :cancelled
          | :unknown
          | :invalid_argument
          | :deadline_exceeded
          | :not_found
          | :already_exists
          | :permission_denied
          | :resource_exhausted
          | :failed_precondition
          | :aborted
          | :out_of_range
          | :unimplemented
          | :internal
          | :unavailable
          | :data_loss
          | :unauthenticated

  @doc "All `{atom, code}` pairs."
  @spec all() :: [{t(), 0..16}]
  def all, do: @codes

  @doc "Atom for a code; codes outside 0..16 are `:unknown`, as the gRPC spec says."
  @spec to_atom(integer()) :: t()
  for {name, code} <- @codes do
    def to_atom(unquote(code)), do: unquote(name)
  end

  def to_atom(_code), do: :unknown

  @doc "Code for a status atom."
  @spec to_code(t()) :: 0..16
  for {name, code} <- @codes do
    def to_code(unquote(name)), do: unquote(code)
  end

  @doc """
  The status a client should report for an HTTP response status that is not 200
  (grpc/doc/http-grpc-status-mapping.md).
  """
  @spec from_http_status(integer()) :: t()
  def from_http_status(400), do: :internal
  def from_http_status(401), do: :unauthenticated
  def from_http_status(403), do: :permission_denied
  def from_http_status(404), do: :unimplemented
  def from_http_status(status) when status in [429, 502, 503, 504], do: :unavailable
  def from_http_status(_status), do: :unknown

  @doc """
  The status of a call whose stream the server reset with RST_STREAM `code`
  (grpc/doc/PROTOCOL-HTTP2.md, "Errors"): CANCEL is `:cancelled`, REFUSED_STREAM `:unavailable`
  (the server did not process it: safe to retry), ENHANCE_YOUR_CALM `:resource_exhausted`, any other
  code `:internal`.
  """
  @spec from_reset_code(atom()) :: t()
  def from_reset_code(:cancel), do: :cancelled
  def from_reset_code(:refused_stream), do: :unavailable
  def from_reset_code(:enhance_your_calm), do: :resource_exhausted
  def from_reset_code(_code), do: :internal
end
