defmodule Snakepit.GRPC.Message do
  @moduledoc """
  gRPC length-prefixed message framing (grpc/doc/PROTOCOL-HTTP2.md): a compressed-flag byte, a
  4-byte big-endian length, then the message. We never compress and reject compressed input, as
  we announce no `grpc-accept-encoding`.

  `decode/2` splits a buffer; the incremental decoder (`new_decoder/1`, `feed/2`) is what a
  response stream uses: it only joins received chunks once a whole message is there, so a large
  message arriving in thousands of DATA frames is copied once, not once per frame.
  """

  @default_max_size 64 * 1024 * 1024

  defstruct chunks: [], size: 0, need: 5, max_size: @default_max_size

  @type decoder :: %__MODULE__{
          chunks: [binary()],
          size: non_neg_integer(),
          need: pos_integer(),
          max_size: pos_integer()
        }
  @type error :: :compressed | {:too_large, non_neg_integer()} | {:bad_flag, byte()}

  @doc "Frames one serialized message."
  @spec encode(iodata()) :: iodata()
  def encode(message), do: [<<0, IO.iodata_length(message)::32>> | message]

  @doc """
  Splits as many complete messages as `buffer` holds; returns them with the unconsumed rest.
  Fails on a compressed message or one larger than `max_size` bytes.
  """
  @spec decode(binary(), pos_integer()) :: {:ok, [binary()], binary()} | {:error, error()}
  def decode(buffer, max_size \\ @default_max_size), do: decode(buffer, max_size, [])

  defp decode(<<1, _::binary>>, _max, _acc), do: {:error, :compressed}

  defp decode(<<0, length::32, _::binary>>, max, _acc) when length > max,
    do: {:error, {:too_large, length}}

  defp decode(<<0, length::32, message::binary-size(length), rest::binary>>, max, acc),
    do: decode(rest, max, [message | acc])

  defp decode(<<flag, _::binary>>, _max, _acc) when flag > 1, do: {:error, {:bad_flag, flag}}
  defp decode(rest, _max, acc), do: {:ok, Enum.reverse(acc), rest}

  @doc "An incremental decoder accepting messages up to `max_size` bytes."
  @spec new_decoder(pos_integer()) :: decoder()
  def new_decoder(max_size \\ @default_max_size), do: %__MODULE__{max_size: max_size}

  @doc "Feeds received bytes; returns the messages completed by them."
  @spec feed(decoder(), binary()) :: {:ok, [binary()], decoder()} | {:error, error()}
  def feed(%__MODULE__{} = decoder, data) do
    decoder = %{decoder | chunks: [data | decoder.chunks], size: decoder.size + byte_size(data)}

    if decoder.size < decoder.need do
      {:ok, [], decoder}
    else
      buffer = decoder.chunks |> Enum.reverse() |> IO.iodata_to_binary()

      with {:ok, messages, rest} <- decode(buffer, decoder.max_size) do
        need =
          case rest do
            <<_flag, length::32, _::binary>> -> 5 + length
            _ -> 5
          end

        {:ok, messages, %{decoder | chunks: [rest], size: byte_size(rest), need: need}}
      end
    end
  end

  @doc "Bytes received but not yet part of a complete message."
  @spec buffered(decoder()) :: non_neg_integer()
  def buffered(%__MODULE__{size: size}), do: size
end
