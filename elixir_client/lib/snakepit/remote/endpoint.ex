defmodule Snakepit.Remote.Endpoint do
  @moduledoc """
  Where a remote worker listens, as a pool config names it: `"host:port"` (a name, an IPv4
  address, or `"[v6 address]:port"`) or `"unix:/absolute/path"`. Parsed once, at config time;
  `channel_address/1` gives the `Snakepit.GRPC.Channel.start_link/1` options that reach it.
  """

  @enforce_keys [:text]
  defstruct [:text, :host, :port, :path]

  @type t :: %__MODULE__{
          text: String.t(),
          host: String.t() | :inet.ip_address() | nil,
          port: :inet.port_number() | nil,
          path: Path.t() | nil
        }

  @doc """
  Parses `"host:port"`, `"[::1]:port"` or `"unix:/path"`; `{:error, why}` names what is wrong.
  """
  @spec parse(term) :: {:ok, t} | {:error, String.t()}
  def parse("unix:" <> path = text) do
    if String.starts_with?(path, "/"),
      do: {:ok, %__MODULE__{text: text, path: path}},
      else: {:error, "#{inspect(text)}: a unix endpoint needs an absolute path (unix:/...)"}
  end

  def parse("[" <> rest = text) when is_binary(text) do
    with [addr, ":" <> port] <- String.split(rest, "]", parts: 2),
         {:ok, ip} <- :inet.parse_ipv6strict_address(String.to_charlist(addr)),
         {:ok, port} <- port(port) do
      {:ok, %__MODULE__{text: text, host: ip, port: port}}
    else
      _ -> {:error, "#{inspect(text)}: expected \"[IPv6 address]:port\""}
    end
  end

  def parse(text) when is_binary(text) do
    with [host, port] when host != "" <- String.split(text, ":"),
         {:ok, port} <- port(port) do
      {:ok, %__MODULE__{text: text, host: host(host), port: port}}
    else
      _ -> {:error, "#{inspect(text)}: expected \"host:port\" or \"unix:/path\""}
    end
  end

  def parse(other), do: {:error, "#{inspect(other)}: an endpoint is a string"}

  @doc "The endpoint of a resolved address and port (DNS discovery)."
  @spec from_address(:inet.ip_address(), :inet.port_number()) :: t
  def from_address(ip, port) do
    text =
      case ip do
        {_, _, _, _} -> "#{:inet.ntoa(ip)}:#{port}"
        _ -> "[#{:inet.ntoa(ip)}]:#{port}"
      end

    %__MODULE__{text: text, host: ip, port: port}
  end

  @doc """
  The warnings a pool with these endpoints and DNS name (`discovery`'s, or nil) should log when
  `tls` is nil: one per endpoint or name whose plaintext traffic may leave this machine (not a
  loopback address, `localhost` or a Unix socket; see `Snakepit.GRPC.Transport.plaintext_warning?/2`).
  """
  @spec plaintext_warnings([t], String.t() | nil, keyword | nil) :: [String.t()]
  def plaintext_warnings(endpoints, dns_name, tls) do
    hosts =
      Enum.map(endpoints, fn e -> {e.text, Keyword.fetch!(channel_address(e), :host)} end) ++
        if(dns_name, do: [{"DNS name #{dns_name}", dns_name}], else: [])

    for {label, host} <- hosts, Snakepit.GRPC.Transport.plaintext_warning?(host, tls) do
      "endpoint #{label} is reached over plaintext TCP outside loopback: calls, results and any " <>
        "bearer token cross the network unencrypted; set the pool's tls: option " <>
        "(and --tls-cert/--tls-key on the servers)"
    end
  end

  @doc "Options of `Snakepit.GRPC.Channel.start_link/1` that connect to the endpoint."
  @spec channel_address(t) :: keyword
  def channel_address(%__MODULE__{path: path}) when is_binary(path), do: [host: {:local, path}]
  def channel_address(%__MODULE__{host: host, port: port}), do: [host: host, port: port]

  # an address literal is used as one (no resolution); a name stays a string
  defp host(text) do
    case :inet.parse_address(String.to_charlist(text)) do
      {:ok, ip} -> ip
      {:error, _} -> text
    end
  end

  defp port(text) do
    case Integer.parse(text) do
      {p, ""} when p in 1..65_535 -> {:ok, p}
      _ -> :error
    end
  end
end
