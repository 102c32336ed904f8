defmodule Snakepit.NDArray do
  @moduledoc """
  A numpy array as it crosses the bridge: the raw C-order buffer, a numpy array-interface `dtype`
  string with explicit byte order (`"<f8"`, `"<i8"`, `"<f4"`, `"|u1"`, `"|b1"`, ...) and a shape.

  Encoded by `Snakepit.Codec` as `{"__snakepit__": "ndarray", "blob": i, "dtype": ..., "shape": ...}`
  with the buffer in `blobs[i]`; decoded results that are numpy arrays come back as this struct.
  """

  @enforce_keys [:data, :dtype, :shape]
  defstruct [:data, :dtype, :shape]

  @type t :: %__MODULE__{data: binary, dtype: String.t(), shape: [non_neg_integer]}

  @doc "Item size in bytes of an array-interface dtype string (`\"<f8\"` -> 8), or `:error`."
  @spec itemsize(String.t()) :: pos_integer | :error
  def itemsize(<<order, kind, size::binary>>) when order in ~c"<>|=" and kind in ~c"biufcmMSUV" do
    case Integer.parse(size) do
      {n, ""} when n > 0 -> n
      _ -> :error
    end
  end

  def itemsize(_), do: :error

  @doc "Number of elements for a shape (`[]` is a scalar: 1)."
  @spec size([non_neg_integer]) :: non_neg_integer
  def size(shape), do: Enum.reduce(shape, 1, &(&1 * &2))

  @doc "Checks that the buffer length agrees with dtype and shape."
  @spec validate(t) :: :ok | {:error, String.t()}
  def validate(%__MODULE__{data: data, dtype: dtype, shape: shape}) do
    cond do
      not is_binary(data) ->
        {:error, "ndarray data must be a binary"}

      not (is_list(shape) and Enum.all?(shape, &(is_integer(&1) and &1 >= 0))) ->
        {:error, "ndarray shape must be a list of non-negative integers, got #{inspect(shape)}"}

      itemsize(dtype) == :error ->
        {:error, "ndarray dtype #{inspect(dtype)} is not an array-interface string like \"<f8\""}

      byte_size(data) != size(shape) * itemsize(dtype) ->
        {:error,
         "ndarray buffer of #{byte_size(data)} bytes disagrees with dtype #{dtype} and shape #{inspect(shape)}"}

      true ->
        :ok
    end
  end

  @doc """
  Builds an array from a flat or nested list of numbers. Supported dtypes: `<f8 <f4 <i8 <i4 <i2 |i1
  <u8 <u4 <u2 |u1 |b1` (and their `>` big-endian forms). The shape defaults to the nesting of `list`.
  """
  @spec from_list(list, String.t(), [non_neg_integer] | nil) :: t
  def from_list(list, dtype \\ "<f8", shape \\ nil) do
    shape = shape || infer_shape(list)
    flat = List.flatten(list)
    data = for x <- flat, into: <<>>, do: pack(x, dtype)
    nd = %__MODULE__{data: data, dtype: dtype, shape: shape}

    case validate(nd) do
      :ok -> nd
      {:error, msg} -> raise ArgumentError, msg
    end
  end

  @doc "The elements as a flat list (C order)."
  @spec to_flat_list(t) :: list
  def to_flat_list(%__MODULE__{data: data, dtype: dtype}) do
    n = itemsize(dtype)
    for <<chunk::binary-size(n) <- data>>, do: unpack(chunk, dtype)
  end

  @doc "The elements as a nested list following `shape`."
  @spec to_list(t) :: list | number | boolean
  def to_list(%__MODULE__{shape: shape} = nd) do
    flat = to_flat_list(nd)

    case shape do
      [] -> hd(flat)
      _ -> nest(flat, shape)
    end
  end

  defp nest(flat, [_]), do: flat

  defp nest(flat, [_ | rest]) do
    chunk = size(rest)

    if chunk == 0,
      do: [],
      else: flat |> Enum.chunk_every(chunk) |> Enum.map(&nest(&1, rest))
  end

  defp infer_shape([h | _] = l) when is_list(h), do: [length(l) | infer_shape(h)]
  defp infer_shape(l) when is_list(l), do: [length(l)]

  defp pack(x, <<o, ?f, s::binary>>) do
    bits = String.to_integer(s) * 8
    x = x * 1.0
    if o == ?>, do: <<x::float-big-size(bits)>>, else: <<x::float-little-size(bits)>>
  end

  defp pack(x, <<o, k, s::binary>>) when k in [?i, ?u] do
    bits = String.to_integer(s) * 8
    if o == ?>, do: <<x::big-size(bits)>>, else: <<x::little-size(bits)>>
  end

  defp pack(x, "|b1"), do: if(x in [true, 1], do: <<1>>, else: <<0>>)

  defp unpack(c, <<o, ?f, s::binary>>) do
    bits = String.to_integer(s) * 8

    if o == ?>,
      do: (<<x::float-big-size(bits)>> = c) && x,
      else: (<<x::float-little-size(bits)>> = c) && x
  end

  defp unpack(c, <<o, ?i, s::binary>>) do
    bits = String.to_integer(s) * 8

    if o == ?>,
      do: (<<x::signed-big-size(bits)>> = c) && x,
      else: (<<x::signed-little-size(bits)>> = c) && x
  end

  defp unpack(c, <<o, ?u, s::binary>>) do
    bits = String.to_integer(s) * 8
    if o == ?>, do: (<<x::big-size(bits)>> = c) && x, else: (<<x::little-size(bits)>> = c) && x
  end

  defp unpack(<<b>>, "|b1"), do: b != 0
end

defmodule Snakepit.Codec do
  @moduledoc """
  The "JSON + blobs" value codec of the bridge protocol (see the header of
  `proto/snakepit_bridge.proto`), both ways.

  ## Elixir -> wire (`encode/1`)

  | Elixir                                   | JSON                                                       |
  |------------------------------------------|------------------------------------------------------------|
  | `nil`                                    | `null`                                                     |
  | `true` / `false`                         | `true` / `false`                                           |
  | integer (any size)                       | integer (`3`, never `3.0`)                                 |
  | float                                    | float with a fraction or exponent (`1.0`, `1.0e-7`)        |
  | `:nan`, `:infinity`, `:neg_infinity`     | `{"__snakepit__": "float", "value": "nan"/"inf"/"-inf"}`   |
  | other atoms                              | string (`:ok` -> `"ok"`)                                   |
  | binary that is valid UTF-8               | string                                                     |
  | binary that is **not** valid UTF-8       | `{"__snakepit__": "bytes", "blob": i}`                     |
  | `{:bytes, binary}` (forces raw bytes)    | `{"__snakepit__": "bytes", "blob": i}`                     |
  | `%Snakepit.NDArray{}`                    | `{"__snakepit__": "ndarray", "blob": i, "dtype", "shape"}` |
  | list, tuple                              | list                                                       |
  | map (atom, string or number keys)        | object with string keys                                    |
  | map that has a `"__snakepit__"` key      | `{"__snakepit__": "object", "value": {...}}`               |

  **Strings vs bytes**: a binary is sent as a JSON string when `String.valid?/1` holds, otherwise as a
  `bytes` blob. To send bytes that happen to be valid UTF-8 (e.g. `"abc"` meant as Python `bytes`),
  wrap them: `{:bytes, "abc"}`.

  Other structs, pids, references and functions raise `ArgumentError`.

  ## wire -> Elixir (`decode/3`)

  JSON strings become binaries, objects become maps **with string keys**, `null` becomes `nil`,
  integers and floats stay what they are. `bytes` blobs become plain binaries (or `{:bytes, bin}`
  with `bytes: :tagged`), `ndarray`s become `%Snakepit.NDArray{}`, non-finite floats become
  `:nan`, `:infinity` or `:neg_infinity`, and `object` wrappers are unwrapped. An unknown tag, a blob
  index out of range or a buffer whose size disagrees with dtype and shape is an error naming it.
  """

  alias Snakepit.NDArray

  @tag "__snakepit__"

  @type blobs :: [binary]

  @doc """
  Encodes a value tree into `{json_binary, blobs}`.
  Raises `ArgumentError` for values that have no wire form.
  """
  @spec encode(term) :: {binary, blobs}
  def encode(term) do
    {json_term, {_n, rev_blobs}} = enc(term, {0, []})
    {IO.iodata_to_binary(:jiffy.encode(json_term)), Enum.reverse(rev_blobs)}
  end

  @doc """
  Encodes tool arguments: `nil` and `%{}` give `"{}"`; anything else must be a map (or keyword list).
  """
  @spec encode_args(map | keyword | nil) :: {binary, blobs}
  def encode_args(nil), do: {"{}", []}
  def encode_args(args) when is_map(args) and not is_struct(args), do: encode(args)

  def encode_args(args) when is_list(args) do
    if Keyword.keyword?(args),
      do: encode(Map.new(args)),
      else: raise(ArgumentError, "tool arguments must be a map or keyword list, got a list")
  end

  def encode_args(other),
    do:
      raise(ArgumentError, "tool arguments must be a map or keyword list, got #{inspect(other)}")

  @doc "Decodes `json` (empty means `nil`) with its `blobs`. Options: `bytes: :binary | :tagged`."
  @spec decode(binary, blobs, keyword) :: {:ok, term} | {:error, String.t()}
  def decode(json, blobs \\ [], opts \\ [])
  def decode("", _blobs, _opts), do: {:ok, nil}

  def decode(json, blobs, opts) do
    parsed =
      try do
        {:ok, :jiffy.decode(json, [:return_maps, :use_nil])}
      catch
        _kind, reason -> {:error, "invalid JSON: #{inspect(reason)}"}
      end

    with {:ok, term} <- parsed do
      try do
        {:ok, dec(term, List.to_tuple(blobs), Keyword.get(opts, :bytes, :binary))}
      catch
        {:snakepit_codec, msg} -> {:error, msg}
      end
    end
  end

  @doc "Like `decode/3` but raises `ArgumentError`."
  @spec decode!(binary, blobs, keyword) :: term
  def decode!(json, blobs \\ [], opts \\ []) do
    case decode(json, blobs, opts) do
      {:ok, v} -> v
      {:error, msg} -> raise ArgumentError, msg
    end
  end

  ## encoding

  defp enc(nil, acc), do: {:null, acc}
  defp enc(b, acc) when is_boolean(b), do: {b, acc}
  defp enc(i, acc) when is_integer(i), do: {i, acc}
  defp enc(f, acc) when is_float(f), do: {f, acc}
  defp enc(:nan, acc), do: {%{@tag => "float", "value" => "nan"}, acc}
  defp enc(:infinity, acc), do: {%{@tag => "float", "value" => "inf"}, acc}
  defp enc(:neg_infinity, acc), do: {%{@tag => "float", "value" => "-inf"}, acc}
  defp enc(a, acc) when is_atom(a), do: {Atom.to_string(a), acc}

  defp enc(bin, acc) when is_binary(bin) do
    if String.valid?(bin), do: {bin, acc}, else: blob(bin, acc)
  end

  defp enc({:bytes, bin}, acc) when is_binary(bin), do: blob(bin, acc)

  defp enc(%NDArray{} = nd, acc) do
    case NDArray.validate(nd) do
      :ok ->
        {%{"blob" => i}, acc} = blob_ref(nd.data, acc)
        {%{@tag => "ndarray", "blob" => i, "dtype" => nd.dtype, "shape" => nd.shape}, acc}

      {:error, msg} ->
        raise ArgumentError, msg
    end
  end

  defp enc(%s{}, _acc),
    do: raise(ArgumentError, "cannot encode struct #{inspect(s)} for the bridge")

  defp enc(map, acc) when is_map(map) do
    {pairs, acc} =
      Enum.map_reduce(map, acc, fn {k, v}, acc ->
        {v2, acc} = enc(v, acc)
        {{key(k), v2}, acc}
      end)

    obj = Map.new(pairs)

    if map_size(obj) != map_size(map) do
      raise ArgumentError,
            "map has keys that collide once converted to strings: #{inspect(Map.keys(map))}"
    end

    if Map.has_key?(obj, @tag),
      do: {%{@tag => "object", "value" => obj}, acc},
      else: {obj, acc}
  end

  defp enc(list, acc) when is_list(list), do: Enum.map_reduce(list, acc, &enc/2)
  defp enc(t, acc) when is_tuple(t), do: enc(Tuple.to_list(t), acc)

  defp enc(other, _acc),
    do: raise(ArgumentError, "cannot encode #{inspect(other)} for the bridge")

  defp blob(bin, acc) do
    {ref, acc} = blob_ref(bin, acc)
    {Map.put(ref, @tag, "bytes"), acc}
  end

  defp blob_ref(bin, {n, rev}), do: {%{"blob" => n}, {n + 1, [bin | rev]}}

  defp key(k) when is_binary(k) do
    if String.valid?(k),
      do: k,
      else: raise(ArgumentError, "map key #{inspect(k)} is not valid UTF-8")
  end

  defp key(k) when is_atom(k), do: Atom.to_string(k)
  defp key(k) when is_integer(k), do: Integer.to_string(k)
  defp key(k), do: raise(ArgumentError, "map key #{inspect(k)} is not a string, atom or integer")

  ## decoding

  defp dec(%{@tag => tag} = obj, blobs, mode), do: dec_tagged(tag, obj, blobs, mode)

  defp dec(map, blobs, mode) when is_map(map),
    do: Map.new(map, fn {k, v} -> {k, dec(v, blobs, mode)} end)

  defp dec(list, blobs, mode) when is_list(list), do: Enum.map(list, &dec(&1, blobs, mode))
  defp dec(other, _blobs, _mode), do: other

  defp dec_tagged("bytes", obj, blobs, mode) do
    bin = fetch_blob(obj, blobs, "bytes")
    if mode == :tagged, do: {:bytes, bin}, else: bin
  end

  defp dec_tagged("ndarray", obj, blobs, _mode) do
    nd = %NDArray{
      data: fetch_blob(obj, blobs, "ndarray"),
      dtype: obj["dtype"],
      shape: obj["shape"]
    }

    case NDArray.validate(nd) do
      :ok -> nd
      {:error, msg} -> throw({:snakepit_codec, msg})
    end
  end

  defp dec_tagged("float", %{"value" => "nan"}, _, _), do: :nan
  defp dec_tagged("float", %{"value" => "inf"}, _, _), do: :infinity
  defp dec_tagged("float", %{"value" => "-inf"}, _, _), do: :neg_infinity

  defp dec_tagged("float", obj, _, _),
    do: throw({:snakepit_codec, "float tag with unknown value #{inspect(obj["value"])}"})

  defp dec_tagged("object", %{"value" => value}, blobs, mode) when is_map(value),
    do: Map.new(value, fn {k, v} -> {k, dec(v, blobs, mode)} end)

  defp dec_tagged(tag, _obj, _blobs, _mode),
    do: throw({:snakepit_codec, "unknown __snakepit__ tag #{inspect(tag)}"})

  defp fetch_blob(%{"blob" => i}, blobs, _kind)
       when is_integer(i) and i >= 0 and i < tuple_size(blobs),
       do: elem(blobs, i)

  defp fetch_blob(obj, blobs, kind),
    do:
      throw(
        {:snakepit_codec,
         "#{kind} blob index #{inspect(obj["blob"])} out of range (#{tuple_size(blobs)} blobs)"}
      )
end
