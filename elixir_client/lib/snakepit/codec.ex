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

  ## Shared-memory regions (`encode_placing/2`, `decode/3`'s `:read_region`)

  For a worker on this host (see `Snakepit.Shm`), `encode_placing/2` sends every bytes blob and
  NDArray buffer of at least `min_bytes` as a region reference instead of a blob,
  `{"__snakepit__": "bytes", "shm": name, "offset": 0, "length": n}` or
  `{"__snakepit__": "ndarray", "shm": name, "offset": 0, "dtype", "shape"}`, and returns the
  `{name, binary}` pairs to write. It does no I/O itself: the call writes them once it has its
  slot (and the pool can delete them should the caller die), so the codec stays a pure function
  of its input. Decoding is given a reader for the same reason: `decode/3` with
  `read_region: fun` calls `fun.(name, offset, nbytes)` for each region reference (the caller's
  reader checks the name, reads the file and deletes it); without one, a region reference is an
  error. Strings (valid UTF-8 binaries) are never regions.

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
  @typedoc "A region to write: its name and contents."
  @type placement :: {String.t(), binary}
  @typedoc "How `encode_placing/2` names regions (`\"<prefix>.<n>\"`) and which blobs go there."
  @type region_spec :: %{prefix: String.t(), min_bytes: pos_integer}
  @typedoc "Reads `nbytes` from `offset` of region `name`, for `decode/3`'s `:read_region`."
  @type region_reader ::
          (String.t(), non_neg_integer, non_neg_integer -> {:ok, binary} | {:error, String.t()})

  @doc """
  Encodes a value tree into `{json_binary, blobs}`.
  Raises `ArgumentError` for values that have no wire form.
  """
  @spec encode(term) :: {binary, blobs}
  def encode(term) do
    {json, blobs, []} = encode_placing(term, nil)
    {json, blobs}
  end

  @doc """
  Encodes like `encode/1`, except that bytes and NDArray buffers of at least
  `regions.min_bytes` become references to shared-memory regions named `"<prefix>.<n>"`
  (n = 0, 1, ...), returned as `placements` for the caller to write (see "Shared-memory
  regions"). With `nil`, exactly `encode/1` and no placements.
  """
  @spec encode_placing(term, region_spec | nil) :: {binary, blobs, [placement]}
  def encode_placing(term, regions) do
    {json_term, {_n, rev_blobs, _regions, _k, rev_placed}} = enc(term, {0, [], regions, 0, []})

    {IO.iodata_to_binary(:jiffy.encode(json_term)), Enum.reverse(rev_blobs),
     Enum.reverse(rev_placed)}
  end

  @doc """
  Encodes tool arguments: `nil` and `%{}` give `"{}"`; anything else must be a map (or keyword list).
  """
  @spec encode_args(map | keyword | nil) :: {binary, blobs}
  def encode_args(args) do
    {json, blobs, []} = encode_args_placing(args, nil)
    {json, blobs}
  end

  @doc "`encode_args/1` with regions, as `encode_placing/2`."
  @spec encode_args_placing(map | keyword | nil, region_spec | nil) ::
          {binary, blobs, [placement]}
  def encode_args_placing(nil, _regions), do: {"{}", [], []}

  def encode_args_placing(args, regions) when is_map(args) and not is_struct(args),
    do: encode_placing(args, regions)

  def encode_args_placing(args, regions) when is_list(args) do
    if Keyword.keyword?(args),
      do: encode_placing(Map.new(args), regions),
      else: raise(ArgumentError, "tool arguments must be a map or keyword list, got a list")
  end

  def encode_args_placing(other, _regions),
    do:
      raise(ArgumentError, "tool arguments must be a map or keyword list, got #{inspect(other)}")

  @doc """
  Decodes `json` (empty means `nil`) with its `blobs`. Options: `bytes: :binary | :tagged`,
  `read_region:` a `t:region_reader/0` for shared-memory region references (see "Shared-memory
  regions"; without one they are an error).
  """
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
        ctx = %{
          blobs: List.to_tuple(blobs),
          mode: Keyword.get(opts, :bytes, :binary),
          read_region: Keyword.get(opts, :read_region)
        }

        {:ok, dec(term, ctx)}
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
        {ref, acc} = blob_ref(nd.data, acc)
        {Map.merge(ref, %{@tag => "ndarray", "dtype" => nd.dtype, "shape" => nd.shape}), acc}

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
    case blob_ref(bin, acc) do
      {%{"shm" => _} = ref, acc} ->
        {Map.merge(ref, %{@tag => "bytes", "length" => byte_size(bin)}), acc}

      {ref, acc} ->
        {Map.put(ref, @tag, "bytes"), acc}
    end
  end

  # A reference to `bin`: the next region when it is large enough to go to one, else the next
  # blob. acc: {blobs so far, their reverse, region spec or nil, regions so far, their reverse}
  defp blob_ref(bin, {n, rev, %{min_bytes: min} = regions, k, placed})
       when byte_size(bin) >= min do
    name = "#{regions.prefix}.#{k}"
    {%{"shm" => name, "offset" => 0}, {n, rev, regions, k + 1, [{name, bin} | placed]}}
  end

  defp blob_ref(bin, {n, rev, regions, k, placed}),
    do: {%{"blob" => n}, {n + 1, [bin | rev], regions, k, placed}}

  defp key(k) when is_binary(k) do
    if String.valid?(k),
      do: k,
      else: raise(ArgumentError, "map key #{inspect(k)} is not valid UTF-8")
  end

  defp key(k) when is_atom(k), do: Atom.to_string(k)
  defp key(k) when is_integer(k), do: Integer.to_string(k)
  defp key(k), do: raise(ArgumentError, "map key #{inspect(k)} is not a string, atom or integer")

  ## decoding

  defp dec(%{@tag => tag} = obj, ctx), do: dec_tagged(tag, obj, ctx)
  defp dec(map, ctx) when is_map(map), do: Map.new(map, fn {k, v} -> {k, dec(v, ctx)} end)
  defp dec(list, ctx) when is_list(list), do: Enum.map(list, &dec(&1, ctx))
  defp dec(other, _ctx), do: other

  defp dec_tagged("bytes", %{"shm" => name} = obj, ctx) do
    length = obj["length"]

    unless is_integer(length) and length >= 0,
      do: fail("bytes region length must be a non-negative integer, got #{inspect(length)}")

    tag_bytes(read_region(ctx, "bytes", name, obj, length), ctx.mode)
  end

  defp dec_tagged("bytes", obj, ctx), do: tag_bytes(fetch_blob(obj, ctx.blobs, "bytes"), ctx.mode)

  defp dec_tagged("ndarray", obj, ctx) do
    data =
      case obj do
        %{"shm" => name} -> read_region(ctx, "ndarray", name, obj, ndarray_bytes(obj))
        _ -> fetch_blob(obj, ctx.blobs, "ndarray")
      end

    nd = %NDArray{data: data, dtype: obj["dtype"], shape: obj["shape"]}

    case NDArray.validate(nd) do
      :ok -> nd
      {:error, msg} -> fail(msg)
    end
  end

  defp dec_tagged("float", %{"value" => "nan"}, _), do: :nan
  defp dec_tagged("float", %{"value" => "inf"}, _), do: :infinity
  defp dec_tagged("float", %{"value" => "-inf"}, _), do: :neg_infinity

  defp dec_tagged("float", obj, _),
    do: fail("float tag with unknown value #{inspect(obj["value"])}")

  defp dec_tagged("object", %{"value" => value}, ctx) when is_map(value),
    do: Map.new(value, fn {k, v} -> {k, dec(v, ctx)} end)

  defp dec_tagged(tag, _obj, _ctx), do: fail("unknown __snakepit__ tag #{inspect(tag)}")

  defp tag_bytes(bin, :tagged), do: {:bytes, bin}
  defp tag_bytes(bin, _mode), do: bin

  # The buffer size of a region's ndarray, from its dtype and shape (checked first: they size
  # the read).
  defp ndarray_bytes(%{"dtype" => dtype, "shape" => shape}) do
    itemsize = if is_binary(dtype), do: NDArray.itemsize(dtype), else: :error

    cond do
      itemsize == :error ->
        fail("ndarray dtype #{inspect(dtype)} is not an array-interface string like \"<f8\"")

      not (is_list(shape) and Enum.all?(shape, &(is_integer(&1) and &1 >= 0))) ->
        fail("ndarray shape must be a list of non-negative integers, got #{inspect(shape)}")

      true ->
        itemsize * NDArray.size(shape)
    end
  end

  defp ndarray_bytes(obj),
    do: fail("ndarray region needs dtype and shape, got #{inspect(Map.keys(obj))}")

  defp read_region(%{read_region: nil}, kind, name, _obj, _nbytes),
    do:
      fail(
        "#{kind} in shared-memory region #{inspect(name)}: this call takes no regions " <>
          "(its pool has shm: false)"
      )

  defp read_region(%{read_region: read}, kind, name, obj, nbytes) do
    offset = Map.get(obj, "offset", 0)

    unless is_integer(offset) and offset >= 0,
      do: fail("#{kind} region offset must be a non-negative integer, got #{inspect(offset)}")

    case read.(name, offset, nbytes) do
      {:ok, bin} -> bin
      {:error, msg} -> fail(msg)
    end
  end

  defp fail(msg), do: throw({:snakepit_codec, msg})

  defp fetch_blob(%{"blob" => i}, blobs, _kind)
       when is_integer(i) and i >= 0 and i < tuple_size(blobs),
       do: elem(blobs, i)

  defp fetch_blob(obj, blobs, kind),
    do:
      fail("#{kind} blob index #{inspect(obj["blob"])} out of range (#{tuple_size(blobs)} blobs)")
end
