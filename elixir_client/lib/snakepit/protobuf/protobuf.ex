defmodule Snakepit.Protobuf do
  @moduledoc """
  The protobuf binary wire format (protobuf.dev/programming-guides/encoding), schema-free.

  Wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32. Groups (3, 4) are deprecated
  and rejected. `Snakepit.Proto` maps these raw fields onto the bridge's message schemas.
  """

  import Bitwise

  @type wire_type :: 0 | 1 | 2 | 5
  @type raw_field :: {field_number :: pos_integer(), wire_type(), non_neg_integer() | binary()}
  @type scalar_type :: :string | :bytes | :bool | :int32 | :int64 | :uint32 | :uint64 | :double

  @max_u64 0xFFFFFFFFFFFFFFFF

  @doc "Varint encoding of an unsigned 64-bit integer (negative integers: two's complement, 10 bytes)."
  @spec encode_varint(integer()) :: binary()
  def encode_varint(n) when n < 0, do: encode_varint(n + (1 <<< 64))
  def encode_varint(n) when n < 0x80, do: <<n>>
  def encode_varint(n), do: <<1::1, n &&& 0x7F::7, encode_varint(n >>> 7)::binary>>

  @doc "Decodes a varint from the start of `data` (at most 10 bytes, value truncated to 64 bits)."
  @spec decode_varint(binary()) :: {:ok, non_neg_integer(), binary()} | {:error, :bad_varint}
  def decode_varint(data), do: decode_varint(data, 0, 0)

  defp decode_varint(<<1::1, bits::7, rest::binary>>, acc, shift) when shift < 63,
    do: decode_varint(rest, acc ||| bits <<< shift, shift + 7)

  defp decode_varint(<<0::1, bits::7, rest::binary>>, acc, shift) when shift <= 63,
    do: {:ok, (acc ||| bits <<< shift) &&& @max_u64, rest}

  defp decode_varint(_data, _acc, _shift), do: {:error, :bad_varint}

  @doc "A field key: field number and wire type."
  @spec encode_key(pos_integer(), wire_type()) :: binary()
  def encode_key(number, wire_type), do: encode_varint(number <<< 3 ||| wire_type)

  @doc "Wire type a scalar type uses when not packed."
  @spec wire_type(scalar_type() | :message) :: wire_type()
  def wire_type(type) when type in [:bool, :int32, :int64, :uint32, :uint64], do: 0
  def wire_type(:double), do: 1
  def wire_type(type) when type in [:string, :bytes, :message], do: 2

  @doc """
  Encodes a scalar value's payload (no key). Raises `ArgumentError` for a value that does not fit
  the type, so bad input fails in the caller, not on the server.
  """
  @spec encode_scalar(scalar_type(), term()) :: iodata()
  def encode_scalar(:string, value) when is_binary(value) do
    if String.valid?(value),
      do: [encode_varint(byte_size(value)), value],
      else: raise(ArgumentError, "string is not valid UTF-8")
  end

  def encode_scalar(:bytes, value) when is_binary(value),
    do: [encode_varint(byte_size(value)), value]

  def encode_scalar(:bool, true), do: <<1>>
  def encode_scalar(:bool, false), do: <<0>>

  def encode_scalar(:int32, v) when is_integer(v) and v >= -0x80000000 and v <= 0x7FFFFFFF,
    do: encode_varint(v)

  def encode_scalar(:int64, v)
      when is_integer(v) and v >= -0x8000000000000000 and v <= 0x7FFFFFFFFFFFFFFF,
      do: encode_varint(v)

  def encode_scalar(:uint32, v) when is_integer(v) and v >= 0 and v <= 0xFFFFFFFF,
    do: encode_varint(v)

  def encode_scalar(:uint64, v) when is_integer(v) and v >= 0 and v <= @max_u64,
    do: encode_varint(v)

  def encode_scalar(:double, v) when is_float(v), do: <<v::float-little-64>>
  def encode_scalar(:double, v) when is_integer(v), do: <<v * 1.0::float-little-64>>
  # IEEE specials the BEAM's floats cannot hold.
  def encode_scalar(:double, :infinity), do: <<0x7FF0000000000000::little-64>>
  def encode_scalar(:double, :neg_infinity), do: <<0xFFF0000000000000::little-64>>
  def encode_scalar(:double, :nan), do: <<0x7FF8000000000000::little-64>>

  def encode_scalar(type, value),
    do: raise(ArgumentError, "cannot encode #{inspect(value)} as protobuf #{type}")

  @doc "Splits a message into its raw fields, in order."
  @spec decode_fields(binary()) :: {:ok, [raw_field()]} | {:error, term()}
  def decode_fields(data), do: decode_fields(data, [])

  defp decode_fields(<<>>, acc), do: {:ok, Enum.reverse(acc)}

  defp decode_fields(data, acc) do
    with {:ok, key, rest} <- decode_varint(data),
         number = key >>> 3,
         wire = key &&& 7,
         :ok <- if(number == 0, do: {:error, :field_number_zero}, else: :ok),
         {:ok, value, rest} <- decode_value(wire, rest) do
      decode_fields(rest, [{number, wire, value} | acc])
    end
  end

  defp decode_value(0, data), do: decode_varint(data)
  defp decode_value(1, <<value::binary-size(8), rest::binary>>), do: {:ok, value, rest}

  defp decode_value(2, data) do
    with {:ok, length, rest} <- decode_varint(data) do
      case rest do
        <<value::binary-size(length), rest::binary>> -> {:ok, value, rest}
        _ -> {:error, :truncated}
      end
    end
  end

  defp decode_value(5, <<value::binary-size(4), rest::binary>>), do: {:ok, value, rest}
  defp decode_value(wire, _data) when wire in [1, 5], do: {:error, :truncated}
  defp decode_value(wire, _data), do: {:error, {:unsupported_wire_type, wire}}

  @doc """
  Converts one raw field value to a scalar of `type`. Packed repeated encodings (a length-delimited
  run of varints or fixed64s) come back as a list.
  """
  @spec decode_scalar(scalar_type(), wire_type(), non_neg_integer() | binary()) ::
          {:ok, term()} | {:ok, {:packed, [term()]}} | {:error, term()}
  def decode_scalar(:string, 2, value) do
    if String.valid?(value), do: {:ok, value}, else: {:error, :invalid_utf8}
  end

  def decode_scalar(:bytes, 2, value), do: {:ok, value}
  def decode_scalar(:bool, 0, value), do: {:ok, value != 0}
  def decode_scalar(:uint64, 0, value), do: {:ok, value}
  def decode_scalar(:uint32, 0, value), do: {:ok, value &&& 0xFFFFFFFF}
  def decode_scalar(:int64, 0, value), do: {:ok, signed(value, 64)}
  def decode_scalar(:int32, 0, value), do: {:ok, signed(value &&& 0xFFFFFFFF, 32)}
  def decode_scalar(:double, 1, value), do: {:ok, decode_double(value)}

  def decode_scalar(type, 2, value)
      when type in [:bool, :uint64, :uint32, :int64, :int32, :double] do
    with {:ok, values} <- unpack(type, value, []), do: {:ok, {:packed, values}}
  end

  def decode_scalar(type, wire, _value), do: {:error, {:wire_type_mismatch, type, wire}}

  defp unpack(_type, <<>>, acc), do: {:ok, Enum.reverse(acc)}

  defp unpack(:double, <<value::binary-size(8), rest::binary>>, acc),
    do: unpack(:double, rest, [decode_double(value) | acc])

  defp unpack(:double, _, _acc), do: {:error, :truncated}

  defp unpack(type, data, acc) do
    with {:ok, raw, rest} <- decode_varint(data),
         {:ok, value} <- decode_scalar(type, 0, raw),
         do: unpack(type, rest, [value | acc])
  end

  defp signed(value, bits) do
    if value >= 1 <<< (bits - 1), do: value - (1 <<< bits), else: value
  end

  defp decode_double(<<value::float-little-64>>), do: value
  defp decode_double(<<bits::little-64>>) when bits == 0x7FF0000000000000, do: :infinity
  defp decode_double(<<bits::little-64>>) when bits == 0xFFF0000000000000, do: :neg_infinity
  defp decode_double(_nan), do: :nan
end
