defmodule Snakepit.HPACK.Huffman do
  @moduledoc """
  HPACK Huffman string coding (RFC 7541 §5.2, Appendix B). Pure functions.

  Decoding is compiled into one function clause per symbol, so the BEAM's binary pattern matcher
  builds the prefix-code decision tree for us.
  """

  import Bitwise

  @codes Snakepit.HPACK.HuffmanTable.codes()
  @encode_table @codes |> Enum.take(256) |> List.to_tuple()

  @doc "Huffman-encodes `binary`, padding the last byte with the EOS prefix (all ones)."
  @spec encode(binary()) :: binary()
  def encode(binary) when is_binary(binary) do
    bits = for <<byte <- binary>>, into: <<>>, do: code_bits(byte)
    pad = rem(8 - rem(bit_size(bits), 8), 8)
    <<bits::bitstring, (1 <<< pad) - 1::size(pad)>>
  end

  @doc "Length in bytes of the Huffman encoding of `binary`, without encoding it."
  @spec encoded_size(binary()) :: non_neg_integer()
  def encoded_size(binary) when is_binary(binary) do
    bits =
      for <<byte <- binary>>, reduce: 0, do: (acc -> acc + elem(elem(@encode_table, byte), 1))

    div(bits + 7, 8)
  end

  @compile {:inline, code_bits: 1}
  defp code_bits(byte) do
    {code, len} = elem(@encode_table, byte)
    <<code::size(len)>>
  end

  @doc """
  Decodes a Huffman-encoded string. Fails on an EOS symbol in the data and on padding that is longer
  than 7 bits or not all ones (RFC 7541 §5.2).
  """
  @spec decode(binary()) :: {:ok, binary()} | {:error, :invalid_huffman}
  def decode(binary) when is_binary(binary), do: decode_bits(binary, [])

  # Padding: fewer than 8 bits, all ones. No real code of 7 bits or less is all ones, so this clause
  # can go first.
  defp decode_bits(<<>>, acc), do: {:ok, IO.iodata_to_binary(acc)}

  defp decode_bits(rest, acc) when bit_size(rest) < 8 do
    size = bit_size(rest)
    ones = (1 <<< size) - 1

    case rest do
      <<^ones::size(size)>> -> {:ok, IO.iodata_to_binary(acc)}
      _ -> decode_symbol(rest, acc)
    end
  end

  defp decode_bits(rest, acc), do: decode_symbol(rest, acc)

  for {{code, len}, symbol} <- Enum.with_index(@codes), symbol < 256 do
    defp decode_symbol(<<unquote(code)::size(unquote(len)), rest::bitstring>>, acc),
      do: decode_bits(rest, [acc, unquote(symbol)])
  end

  # EOS in the data, or a truncated code.
  defp decode_symbol(_bits, _acc), do: {:error, :invalid_huffman}
end
