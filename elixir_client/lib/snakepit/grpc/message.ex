defmodule Snakepit.GRPC.Message do
  @moduledoc """
  gRPC length-prefixed message framing (grpc/doc/PROTOCOL-HTTP2.md): a compressed-flag byte, a
  4-byte big-endian length, then the message. We never compress and reject compressed input, as
  we announce no `grpc-accept-encoding`.
  """

  @default_max_size 64 * 1024 * 1024

  @doc "Frames one serialized message."
  @spec encode(iodata()) :: iodata()
  def encode(message), do: [<<0, IO.iodata_length(message)::32>> | message]

  @doc """
  Splits as many complete messages as `buffer` holds; returns them with the unconsumed rest.
  Fails on a compressed message or one larger than `max_size` bytes.
  """
  @spec decode(binary(), pos_integer()) ::
          {:ok, [binary()], binary()} | {:error, :compressed | {:too_large, non_neg_integer()}}
  def decode(buffer, max_size \\ @default_max_size), do: decode(buffer, max_size, [])

  defp decode(<<1, _::binary>>, _max, _acc), do: {:error, :compressed}

  defp decode(<<0, length::32, _::binary>>, max, _acc) when length > max,
    do: {:error, {:too_large, length}}

  defp decode(<<0, length::32, message::binary-size(length), rest::binary>>, max, acc),
    do: decode(rest, max, [message | acc])

  defp decode(<<flag, _::binary>>, _max, _acc) when flag > 1, do: {:error, {:bad_flag, flag}}
  defp decode(rest, _max, acc), do: {:ok, Enum.reverse(acc), rest}
end
