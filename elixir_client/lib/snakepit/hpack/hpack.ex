defmodule Snakepit.HPACK do
  @moduledoc """
  HPACK header compression (RFC 7541) as pure functions over a context.

  One context encodes (our requests) and another decodes (the peer's responses); each owns a
  `Snakepit.HPACK.Table`. Header lists are `[{name, value}]` with lowercase binary names.

      enc = Snakepit.HPACK.new_encoder()
      {block, enc} = Snakepit.HPACK.encode(enc, [{":method", "POST"}])
      dec = Snakepit.HPACK.new_decoder()
      {:ok, [{":method", "POST"}], _dec} = Snakepit.HPACK.decode(dec, IO.iodata_to_binary(block))

  On encode, a header may be `{name, value, :no_index}` (literal, not added to the table: for
  values that change on every request) or `{name, value, :never_index}` (sensitive, §7.1.3).
  """

  import Bitwise

  alias Snakepit.HPACK.{Huffman, Table}

  defstruct table: Table.new(),
            max_size_limit: 4096,
            pending_size_updates: [],
            huffman: :auto,
            max_header_list_size: :infinity

  @type huffman_mode :: :auto | :always | :never
  @type header :: {binary(), binary()}
  @type t :: %__MODULE__{
          table: Table.t(),
          max_size_limit: non_neg_integer(),
          pending_size_updates: [non_neg_integer()],
          huffman: huffman_mode(),
          max_header_list_size: pos_integer() | :infinity
        }
  @type error ::
          {:compression_error, atom() | {atom(), term()}}

  # Guards against absurd integers from the peer (a 32-bit value is plenty for HPACK).
  @max_integer 0xFFFFFFFF

  @doc """
  A new encoding context. Options: `:max_table_size` (default 4096, the protocol's initial value),
  `:huffman` (`:auto` (default, Huffman when shorter) | `:always` | `:never`).
  """
  @spec new_encoder(keyword()) :: t()
  def new_encoder(opts \\ []) do
    size = Keyword.get(opts, :max_table_size, 4096)

    %__MODULE__{
      table: Table.new(size),
      max_size_limit: size,
      huffman: Keyword.get(opts, :huffman, :auto)
    }
  end

  @doc """
  A new decoding context. `:max_table_size` (default 4096) is the SETTINGS_HEADER_TABLE_SIZE we
  advertise: the peer's dynamic-table size updates may not exceed it. `:max_header_list_size`
  bounds the decoded list (name + value + 32 per field, as HTTP/2 counts it).
  """
  @spec new_decoder(keyword()) :: t()
  def new_decoder(opts \\ []) do
    size = Keyword.get(opts, :max_table_size, 4096)

    %__MODULE__{
      table: Table.new(size),
      max_size_limit: size,
      max_header_list_size: Keyword.get(opts, :max_header_list_size, :infinity)
    }
  end

  @doc """
  Encoder side: the peer's SETTINGS_HEADER_TABLE_SIZE changed. The table shrinks at once when
  needed and the next header block starts with the size update(s) §4.2 asks for (the smallest
  size reached, then the final one). We never grow past the 4096 we start with.
  """
  @spec set_max_table_size(t(), non_neg_integer()) :: t()
  def set_max_table_size(%__MODULE__{} = ctx, setting) do
    new_size = min(setting, ctx.max_size_limit)

    if new_size == ctx.table.max_size and ctx.pending_size_updates == [] do
      ctx
    else
      %{
        ctx
        | table: Table.resize(ctx.table, new_size),
          pending_size_updates: ctx.pending_size_updates ++ [new_size]
      }
    end
  end

  @doc "Encodes a header list into one header block, updating the encoder's dynamic table."
  @spec encode(t(), [header() | {binary(), binary(), :no_index | :never_index}]) ::
          {iodata(), t()}
  def encode(%__MODULE__{} = ctx, headers) do
    updates = size_update_prefix(ctx.pending_size_updates)
    ctx = %{ctx | pending_size_updates: []}

    {fields, ctx} =
      Enum.map_reduce(headers, ctx, fn
        {name, value}, ctx -> encode_field(ctx, name, value, :index)
        {name, value, mode}, ctx -> encode_field(ctx, name, value, mode)
      end)

    {[updates | fields], ctx}
  end

  defp size_update_prefix([]), do: []

  defp size_update_prefix(sizes) do
    # Only the minimum and the final size matter (§4.2).
    smallest = Enum.min(sizes)
    final = List.last(sizes)
    steps = if smallest == final, do: [final], else: [smallest, final]
    Enum.map(steps, &encode_integer(&1, 5, 0b001))
  end

  defp encode_field(ctx, name, value, :index) do
    case Table.find(ctx.table, name, value) do
      {:full, index} ->
        {encode_integer(index, 7, 1), ctx}

      {:name, index} ->
        data = [encode_integer(index, 6, 0b01), encode_string(value, ctx.huffman)]
        {data, %{ctx | table: Table.add(ctx.table, name, value)}}

      :none ->
        data = [
          <<0b01000000>>,
          encode_string(name, ctx.huffman),
          encode_string(value, ctx.huffman)
        ]

        {data, %{ctx | table: Table.add(ctx.table, name, value)}}
    end
  end

  defp encode_field(ctx, name, value, mode) when mode in [:no_index, :never_index] do
    # 4-bit prefix: 0000 = without indexing, 0001 = never indexed.
    pattern = if mode == :no_index, do: 0b0000, else: 0b0001

    case Table.find(ctx.table, name, value) do
      {kind, index} when kind in [:full, :name] ->
        {[encode_integer(index, 4, pattern), encode_string(value, ctx.huffman)], ctx}

      :none ->
        {[
           <<pattern::4, 0::4>>,
           encode_string(name, ctx.huffman),
           encode_string(value, ctx.huffman)
         ], ctx}
    end
  end

  @doc """
  Decodes one complete header block (HEADERS + CONTINUATION fragments already joined), updating the
  decoder's dynamic table. Any failure is a connection-level COMPRESSION_ERROR for HTTP/2.
  """
  @spec decode(t(), binary()) :: {:ok, [header()], t()} | {:error, error()}
  def decode(%__MODULE__{} = ctx, block) when is_binary(block) do
    decode_block(block, ctx, [], true, 0)
  end

  # `at_start`: dynamic table size updates are only allowed before the first field (§4.2).
  defp decode_block(<<>>, ctx, acc, _at_start, _list_size), do: {:ok, Enum.reverse(acc), ctx}

  # Indexed field: 1xxxxxxx
  defp decode_block(<<1::1, _::7, _::binary>> = data, ctx, acc, _at_start, list_size) do
    with {:ok, index, rest} <- decode_integer(data, 7),
         {:ok, {name, value}} <- lookup(ctx, index) do
      add_field(rest, ctx, acc, name, value, list_size)
    end
  end

  # Literal with incremental indexing: 01xxxxxx
  defp decode_block(<<0b01::2, _::6, _::binary>> = data, ctx, acc, _at_start, list_size) do
    with {:ok, name, value, rest} <- decode_literal(data, 6, ctx) do
      ctx = %{ctx | table: Table.add(ctx.table, name, value)}
      add_field(rest, ctx, acc, name, value, list_size)
    end
  end

  # Dynamic table size update: 001xxxxx
  defp decode_block(<<0b001::3, _::5, _::binary>> = data, ctx, acc, true, list_size) do
    with {:ok, size, rest} <- decode_integer(data, 5) do
      if size > ctx.max_size_limit do
        {:error, {:compression_error, {:table_size_update_too_large, size}}}
      else
        decode_block(rest, %{ctx | table: Table.resize(ctx.table, size)}, acc, true, list_size)
      end
    end
  end

  defp decode_block(<<0b001::3, _::5, _::binary>>, _ctx, _acc, false, _list_size),
    do: {:error, {:compression_error, :table_size_update_after_field}}

  # Literal without indexing (0000xxxx) or never indexed (0001xxxx).
  defp decode_block(<<0b000::3, _::5, _::binary>> = data, ctx, acc, _at_start, list_size) do
    with {:ok, name, value, rest} <- decode_literal(data, 4, ctx) do
      add_field(rest, ctx, acc, name, value, list_size)
    end
  end

  defp add_field(rest, ctx, acc, name, value, list_size) do
    list_size = list_size + Table.entry_size(name, value)

    if ctx.max_header_list_size != :infinity and list_size > ctx.max_header_list_size do
      {:error, {:compression_error, :header_list_too_large}}
    else
      decode_block(rest, ctx, [{name, value} | acc], false, list_size)
    end
  end

  defp lookup(_ctx, 0), do: {:error, {:compression_error, :zero_index}}

  defp lookup(ctx, index) do
    case Table.lookup(ctx.table, index) do
      {:ok, entry} -> {:ok, entry}
      :error -> {:error, {:compression_error, {:invalid_index, index}}}
    end
  end

  defp decode_literal(data, prefix, ctx) do
    with {:ok, index, rest} <- decode_integer(data, prefix),
         {:ok, name, rest} <- literal_name(index, rest, ctx),
         {:ok, value, rest} <- decode_string(rest) do
      {:ok, name, value, rest}
    end
  end

  defp literal_name(0, rest, _ctx), do: decode_string(rest)

  defp literal_name(index, rest, ctx) do
    with {:ok, {name, _}} <- lookup(ctx, index), do: {:ok, name, rest}
  end

  @doc """
  Encodes an integer with an N-bit prefix (§5.1); `high_bits` fills the byte's bits above the prefix.
  """
  @spec encode_integer(non_neg_integer(), 1..8, non_neg_integer()) :: binary()
  def encode_integer(value, prefix, high_bits) do
    max_prefix = (1 <<< prefix) - 1
    high = high_bits <<< prefix

    if value < max_prefix do
      <<high ||| value>>
    else
      IO.iodata_to_binary([<<high ||| max_prefix>> | continuation_bytes(value - max_prefix)])
    end
  end

  defp continuation_bytes(value) when value < 128, do: [value]

  defp continuation_bytes(value),
    do: [(value &&& 0x7F) ||| 0x80 | continuation_bytes(value >>> 7)]

  @doc """
  Decodes an N-bit-prefix integer from the start of `data` (the bits above the prefix in the first
  byte are ignored). Returns the rest of the binary.
  """
  @spec decode_integer(binary(), 1..8) :: {:ok, non_neg_integer(), binary()} | {:error, error()}
  def decode_integer(<<first, rest::binary>>, prefix) do
    max_prefix = (1 <<< prefix) - 1
    value = first &&& max_prefix

    if value < max_prefix, do: {:ok, value, rest}, else: decode_continuation(rest, max_prefix, 0)
  end

  def decode_integer(<<>>, _prefix), do: {:error, {:compression_error, :truncated_integer}}

  defp decode_continuation(<<more::1, bits::7, rest::binary>>, acc, shift) do
    acc = acc + (bits <<< shift)

    cond do
      acc > @max_integer -> {:error, {:compression_error, :integer_overflow}}
      more == 1 -> decode_continuation(rest, acc, shift + 7)
      true -> {:ok, acc, rest}
    end
  end

  defp decode_continuation(<<>>, _acc, _shift),
    do: {:error, {:compression_error, :truncated_integer}}

  @doc "Encodes a string literal (§5.2), Huffman-coded per `mode`."
  @spec encode_string(binary(), huffman_mode()) :: iodata()
  def encode_string(string, mode \\ :auto) do
    use_huffman =
      case mode do
        :always -> true
        :never -> false
        :auto -> Huffman.encoded_size(string) < byte_size(string)
      end

    if use_huffman do
      encoded = Huffman.encode(string)
      [encode_integer(byte_size(encoded), 7, 1), encoded]
    else
      [encode_integer(byte_size(string), 7, 0), string]
    end
  end

  @doc "Decodes a string literal (§5.2) from the start of `data`, returning the rest."
  @spec decode_string(binary()) :: {:ok, binary(), binary()} | {:error, error()}
  def decode_string(<<huffman::1, _::7, _::binary>> = data) do
    with {:ok, length, rest} <- decode_integer(data, 7) do
      case rest do
        <<raw::binary-size(length), rest::binary>> when huffman == 1 ->
          case Huffman.decode(raw) do
            {:ok, string} -> {:ok, string, rest}
            {:error, reason} -> {:error, {:compression_error, reason}}
          end

        <<raw::binary-size(length), rest::binary>> ->
          {:ok, raw, rest}

        _ ->
          {:error, {:compression_error, :truncated_string}}
      end
    end
  end

  def decode_string(<<>>), do: {:error, {:compression_error, :truncated_string}}
end
