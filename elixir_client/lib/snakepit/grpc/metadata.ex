defmodule Snakepit.GRPC.Metadata do
  @moduledoc """
  gRPC header helpers: `grpc-timeout` encoding, `grpc-message` percent-coding, `-bin` metadata
  base64 coding, and request header construction.
  """

  import Bitwise

  @doc """
  Encodes a timeout in milliseconds as a `grpc-timeout` value: at most 8 digits, so long timeouts
  switch to coarser units (rounded up, so the server never gets less time than asked).
  """
  @spec encode_timeout(non_neg_integer()) :: String.t()
  def encode_timeout(ms) when is_integer(ms) and ms >= 0 do
    cond do
      ms < 100_000_000 -> "#{ms}m"
      div(ms + 999, 1000) < 100_000_000 -> "#{div(ms + 999, 1000)}S"
      div(ms + 59_999, 60_000) < 100_000_000 -> "#{div(ms + 59_999, 60_000)}M"
      true -> "#{min(div(ms + 3_599_999, 3_600_000), 99_999_999)}H"
    end
  end

  @doc "Decodes a `grpc-timeout` value to milliseconds (rounded up)."
  @spec decode_timeout(String.t()) :: {:ok, non_neg_integer()} | :error
  def decode_timeout(value) do
    case Integer.parse(value) do
      {n, unit} when n >= 0 ->
        case unit do
          "H" -> {:ok, n * 3_600_000}
          "M" -> {:ok, n * 60_000}
          "S" -> {:ok, n * 1000}
          "m" -> {:ok, n}
          "u" -> {:ok, div(n + 999, 1000)}
          "n" -> {:ok, div(n + 999_999, 1_000_000)}
          _ -> :error
        end

      _ ->
        :error
    end
  end

  @doc """
  Percent-decodes a `grpc-message` value. Malformed escapes are kept literally, as the spec asks
  clients to be lenient.
  """
  @spec decode_message(binary()) :: String.t()
  def decode_message(value), do: value |> percent_decode([]) |> IO.iodata_to_binary()

  defp percent_decode(<<?%, a, b, rest::binary>> = all, acc) do
    case {hex(a), hex(b)} do
      {x, y} when is_integer(x) and is_integer(y) -> percent_decode(rest, [acc, x <<< 4 ||| y])
      _ -> percent_decode(binary_part(all, 1, byte_size(all) - 1), [acc, ?%])
    end
  end

  defp percent_decode(<<c, rest::binary>>, acc), do: percent_decode(rest, [acc, c])
  defp percent_decode(<<>>, acc), do: acc

  defp hex(c) when c in ?0..?9, do: c - ?0
  defp hex(c) when c in ?a..?f, do: c - ?a + 10
  defp hex(c) when c in ?A..?F, do: c - ?A + 10
  defp hex(_), do: nil

  @doc "Percent-encodes a `grpc-message` value (bytes outside 0x20..0x7E, and `%`)."
  @spec encode_message(binary()) :: String.t()
  def encode_message(value) do
    for <<c <- value>>, into: "" do
      if c >= 0x20 and c <= 0x7E and c != ?%,
        do: <<c>>,
        else: "%" <> String.upcase(Base.encode16(<<c>>))
    end
  end

  @doc """
  Decodes received metadata: names ending in `-bin` carry base64 (padded or not) and are decoded;
  a value that is not valid base64 is kept as received.
  """
  @spec decode_metadata([{String.t(), binary()}]) :: [{String.t(), binary()}]
  def decode_metadata(headers) do
    Enum.map(headers, fn {name, value} ->
      if String.ends_with?(name, "-bin"), do: {name, decode_bin(value)}, else: {name, value}
    end)
  end

  defp decode_bin(value) do
    # Several values of one key may be joined with commas.
    value
    |> String.split(",")
    |> Enum.map(fn part ->
      part = String.trim(part)

      case Base.decode64(part, padding: false) do
        {:ok, bytes} -> bytes
        :error -> part
      end
    end)
    |> Enum.join()
  end

  @doc "Encodes outgoing metadata: `-bin` values are base64-encoded (unpadded, which gRPC allows)."
  @spec encode_metadata([{String.t(), iodata()}]) :: [{String.t(), binary()}]
  def encode_metadata(metadata) do
    Enum.map(metadata, fn {name, value} ->
      name = String.downcase(to_string(name))
      value = IO.iodata_to_binary(value)

      if String.ends_with?(name, "-bin"),
        do: {name, Base.encode64(value, padding: false)},
        else: {name, value}
    end)
  end

  @doc """
  Request headers for a call: pseudo-headers first, then gRPC's required headers, the timeout and
  the caller's metadata. `grpc-timeout` is sent unindexed: it changes on every call and would only
  churn the HPACK table.
  """
  @spec request_headers(String.t(), String.t(), non_neg_integer() | :infinity, [
          {String.t(), iodata()}
        ]) ::
          [{binary(), binary()} | {binary(), binary(), :no_index}]
  def request_headers(authority, path, timeout, metadata) do
    timeout_header =
      if timeout == :infinity,
        do: [],
        else: [{"grpc-timeout", encode_timeout(timeout), :no_index}]

    [
      {":method", "POST"},
      {":scheme", "http"},
      {":path", path},
      {":authority", authority},
      {"content-type", "application/grpc"},
      {"te", "trailers"},
      {"user-agent", "snakepit-elixir/0.1"}
    ] ++ timeout_header ++ encode_metadata(metadata)
  end
end
