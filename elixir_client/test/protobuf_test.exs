defmodule Snakepit.ProtobufTest do
  use ExUnit.Case, async: true

  import Bitwise

  alias Snakepit.{Proto, Protobuf}

  # The repository's own stubs, whichever checkout this is (not an installed copy).
  @repo_root Path.expand("../..", __DIR__)

  @pb_helpers """
  import sys, json
  sys.path.insert(0, #{inspect(@repo_root)})
  from google.protobuf.descriptor import FieldDescriptor as FD
  from snakepit_bridge.generated import snakepit_bridge_pb2 as pb

  def snake(name):
      return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")

  CLASSES = {snake(n): getattr(pb, n) for n in pb.DESCRIPTOR.message_types_by_name}

  def is_map(f):
      return f.message_type is not None and f.message_type.GetOptions().map_entry

  def is_repeated(f):
      # Newer protobuf releases drop `label` in favour of `is_repeated`.
      return f.is_repeated if hasattr(f, "is_repeated") else f.label == FD.LABEL_REPEATED

  def plain(m):
      out = {}
      for f in m.DESCRIPTOR.fields:
          v = getattr(m, f.name)
          if is_map(f):
              out[f.name] = dict(v)
          elif is_repeated(f):
              out[f.name] = [plain(x) if f.message_type else (x.hex() if f.type == FD.TYPE_BYTES else x) for x in v]
          elif f.message_type is not None or (f.has_presence and f.containing_oneof is not None):
              out[f.name] = (plain(v) if f.message_type else v) if m.HasField(f.name) else None
          else:
              out[f.name] = v.hex() if f.type == FD.TYPE_BYTES else v
      return out

  def build(cls, d):
      m = cls()
      for f in cls.DESCRIPTOR.fields:
          v = d.get(f.name)
          if v is None:
              continue
          if is_map(f):
              getattr(m, f.name).update(v)
          elif is_repeated(f):
              if f.message_type:
                  for x in v:
                      getattr(m, f.name).add().CopyFrom(build(getattr(pb, f.message_type.name), x))
              elif f.type == FD.TYPE_BYTES:
                  getattr(m, f.name).extend(bytes.fromhex(x) for x in v)
              else:
                  getattr(m, f.name).extend(v)
          elif f.message_type:
              getattr(m, f.name).CopyFrom(build(getattr(pb, f.message_type.name), v))
          elif f.type == FD.TYPE_BYTES:
              setattr(m, f.name, bytes.fromhex(v))
          else:
              setattr(m, f.name, v)
      return m
  """

  defp python(body, input) do
    path = Path.join(System.tmp_dir!(), "snakepit_pb_#{System.unique_integer([:positive])}.json")
    File.write!(path, :jiffy.encode(input))

    try do
      script = @pb_helpers <> "\ndata = json.load(open(sys.argv[1]))\n" <> body
      {out, status} = System.cmd("python3", ["-c", script, path], stderr_to_stdout: true)
      assert status == 0, out
      :jiffy.decode(out, [:return_maps])
    after
      File.rm(path)
    end
  end

  # A message of `type` with every field set to a non-default value (variant picks edge values).
  defp sample(type, variant) do
    Map.new(Proto.schemas()[type], fn {name, number, ftype, card} ->
      {name, sample_value(ftype, card, number, variant)}
    end)
  end

  defp sample_value({:message, t}, :repeated, _n, v), do: [sample(t, v), sample(t, v + 1)]
  defp sample_value({:message, t}, _card, _n, v), do: sample(t, v + 1)
  defp sample_value(_t, :map, n, v), do: %{"k#{n}" => "v#{v}", "é" => "ü ✓", "empty" => ""}
  defp sample_value(:bytes, :repeated, _n, v), do: [<<0, 255, v>>, "", :binary.copy(<<7>>, 300)]

  defp sample_value(t, :repeated, n, v),
    do: [sample_value(t, :single, n, v), sample_value(t, :single, n, v + 1)]

  defp sample_value(:string, _card, n, v), do: "s#{n}-#{v} ünïcode ✓"
  defp sample_value(:bytes, _card, _n, v), do: <<v, 0, 255>>
  defp sample_value(:bool, _card, _n, _v), do: true
  defp sample_value(:double, _card, n, v), do: n + v / 4 + 0.125

  defp sample_value(:int32, _card, _n, v),
    do: Enum.at([-1, 2_147_483_647, -2_147_483_648, 42], rem(v, 4))

  defp sample_value(:int64, _card, _n, v),
    do:
      Enum.at(
        [-1, 9_223_372_036_854_775_807, -9_223_372_036_854_775_808, 1_700_000_000_000],
        rem(v, 4)
      )

  defp sample_value(:uint32, _card, _n, v), do: Enum.at([4_294_967_295, 1, 300, 128], rem(v, 4))

  defp sample_value(:uint64, _card, _n, v),
    do: Enum.at([18_446_744_073_709_551_615, 1, 0, 1 <<< 40], rem(v, 4))

  # JSON view of a decoded map: bytes as hex, as the Python side prints them.
  defp plain(type, message) do
    Map.new(Proto.schemas()[type], fn {name, _, ftype, card} ->
      value = Map.fetch!(message, name)

      plain_value =
        case {ftype, card, value} do
          {_, _, nil} -> :null
          {{:message, t}, :repeated, list} -> Enum.map(list, &plain(t, &1))
          {{:message, t}, _, m} -> plain(t, m)
          {:bytes, :repeated, list} -> Enum.map(list, &Base.encode16(&1, case: :lower))
          {:bytes, _, b} -> Base.encode16(b, case: :lower)
          {_, _, v} -> v
        end

      {Atom.to_string(name), plain_value}
    end)
  end

  test "the schema table matches the proto descriptors (names, numbers, types, labels)" do
    described =
      python(
        """
        types = {FD.TYPE_STRING: "string", FD.TYPE_BYTES: "bytes", FD.TYPE_BOOL: "bool", FD.TYPE_INT32: "int32",
                 FD.TYPE_INT64: "int64", FD.TYPE_UINT32: "uint32", FD.TYPE_UINT64: "uint64", FD.TYPE_DOUBLE: "double"}
        out = {}
        for name, cls in CLASSES.items():
            fields = []
            for f in cls.DESCRIPTOR.fields:
                if is_map(f):
                    t, card = types[f.message_type.fields_by_name["value"].type], "map"
                elif f.message_type:
                    t, card = "message:" + snake(f.message_type.name), "repeated" if is_repeated(f) else "single"
                else:
                    t = types[f.type]
                    card = "repeated" if is_repeated(f) else ("optional" if f.containing_oneof is not None else "single")
                fields.append([f.name, f.number, t, card])
            out[name] = fields
        print(json.dumps(out))
        """,
        []
      )

    ours =
      Map.new(Proto.schemas(), fn {type, fields} ->
        {Atom.to_string(type),
         Enum.map(fields, fn {name, number, ftype, card} ->
           t =
             case ftype,
               do:
                 (
                   {:message, m} -> "message:#{m}"
                   other -> Atom.to_string(other)
                 )

           [Atom.to_string(name), number, t, Atom.to_string(card)]
         end)}
      end)

    assert ours == described
  end

  test "every message round trips through encode/decode" do
    for type <- Proto.message_types(), variant <- 0..3 do
      message = sample(type, variant)

      assert {:ok, ^message} =
               Proto.decode(type, IO.iodata_to_binary(Proto.encode(type, message))),
             "#{type}"
    end
  end

  test "Python parses every message we encode to the same values" do
    input =
      for type <- Proto.message_types(), variant <- [0, 2] do
        message = sample(type, variant)

        %{
          type: type,
          hex: Base.encode16(IO.iodata_to_binary(Proto.encode(type, message)), case: :lower),
          expected: plain(type, message)
        }
      end

    seen =
      python(
        """
        print(json.dumps([plain(CLASSES[d["type"]].FromString(bytes.fromhex(d["hex"]))) for d in data]))
        """,
        input
      )

    for {%{type: type, expected: expected}, got} <- Enum.zip(input, seen) do
      assert got == expected, "#{type}"
    end
  end

  test "we decode every message Python encodes" do
    input =
      for type <- Proto.message_types(), variant <- [1, 3] do
        %{type: type, fields: plain(type, sample(type, variant)), variant: variant}
      end

    hexes =
      python(
        """
        print(json.dumps([build(CLASSES[d["type"]], d["fields"]).SerializeToString().hex() for d in data]))
        """,
        input
      )

    for {%{type: type, variant: variant}, hex} <- Enum.zip(input, hexes) do
      type = String.to_existing_atom(to_string(type))
      assert {:ok, decoded} = Proto.decode(type, Base.decode16!(hex, case: :lower))
      assert decoded == sample(type, variant), "#{type}"
    end
  end

  describe "defaults" do
    test "an empty message decodes to proto3 defaults" do
      assert {:ok, decoded} = Proto.decode(:execute_tool_request, "")

      assert decoded == %{
               tool_name: "",
               args_json: "",
               blobs: [],
               session_id: "",
               request_id: "",
               metadata: %{},
               seed: nil,
               shm_result_prefix: "",
               shm_result_min_bytes: 0
             }

      assert {:ok, %{error: nil, ok: false, blobs: []}} = Proto.decode(:batch_result, "")
      assert {:ok, %{duration_ms: +0.0}} = Proto.decode(:execute_tool_response, "")
      assert Proto.default(:get_stats_response).tools == []
    end

    test "defaults are not encoded, but a set optional field and an empty message are" do
      assert IO.iodata_to_binary(
               Proto.encode(:execute_tool_request, %{
                 tool_name: "",
                 blobs: [],
                 metadata: %{},
                 seed: nil
               })
             ) == ""

      assert IO.iodata_to_binary(Proto.encode(:tool_stats, %{calls: 0, mean_ms: 0.0})) == ""

      assert IO.iodata_to_binary(Proto.encode(:execute_tool_request, %{seed: 0})) ==
               <<7 <<< 3, 0>>

      assert IO.iodata_to_binary(Proto.encode(:batch_result, %{error: %{}})) ==
               <<4 <<< 3 ||| 2, 0>>

      assert {:ok, %{seed: 0}} = Proto.decode(:execute_tool_request, <<56, 0>>)
      assert {:ok, %{error: %{code: 0, message: ""}}} = Proto.decode(:batch_result, <<34, 0>>)
    end
  end

  describe "wire format" do
    test "varints" do
      assert Protobuf.encode_varint(0) == <<0>>
      assert Protobuf.encode_varint(300) == <<0xAC, 0x02>>
      assert Protobuf.encode_varint(-1) == <<255, 255, 255, 255, 255, 255, 255, 255, 255, 1>>
      assert {:ok, 300, "x"} = Protobuf.decode_varint(<<0xAC, 0x02, ?x>>)
      assert {:error, :bad_varint} = Protobuf.decode_varint(<<0xAC>>)
      assert {:error, :bad_varint} = Protobuf.decode_varint(:binary.copy(<<0xFF>>, 11))
    end

    test "unknown fields of every wire type are skipped" do
      unknown =
        IO.iodata_to_binary([
          [Protobuf.encode_key(99, 0), Protobuf.encode_varint(150)],
          [Protobuf.encode_key(98, 1), <<0::64>>],
          [Protobuf.encode_key(97, 2), <<3, "abc">>],
          [Protobuf.encode_key(96, 5), <<0::32>>]
        ])

      assert {:ok, %{message: "hi"}} =
               Proto.decode(:ping_request, unknown <> <<10, 2, "hi">> <> unknown)
    end

    test "packed and unpacked repeated scalars both decode" do
      assert {:ok, {:packed, [1, 300, 2]}} =
               Protobuf.decode_scalar(:uint64, 2, <<1, 0xAC, 0x02, 2>>)

      assert {:ok, {:packed, [1.5, -2.0]}} =
               Protobuf.decode_scalar(:double, 2, <<1.5::float-little-64, -2.0::float-little-64>>)

      assert {:ok, {:packed, [-1]}} =
               Protobuf.decode_scalar(:int32, 2, Protobuf.encode_varint(-1))
    end

    test "a repeated message field keeps order; a repeated singular message merges" do
      a = IO.iodata_to_binary(Proto.encode(:tool_error, %{code: 1, type: "A"}))
      b = IO.iodata_to_binary(Proto.encode(:tool_error, %{message: "B"}))
      bytes = <<34, byte_size(a)>> <> a <> <<34, byte_size(b)>> <> b

      assert {:ok, %{error: %{code: 1, type: "A", message: "B"}}} =
               Proto.decode(:batch_result, bytes)
    end

    test "scalars: last value wins; later map entries override" do
      assert {:ok, %{message: "b"}} = Proto.decode(:ping_request, <<10, 1, "a", 10, 1, "b">>)
      e1 = <<10, 1, "k", 18, 1, "1">>
      e2 = <<10, 1, "k", 18, 1, "2">>

      assert {:ok, %{metadata: %{"k" => "2"}}} =
               Proto.decode(:execute_tool_request, <<50, 6>> <> e1 <> <<50, 6>> <> e2)
    end

    test "non-finite doubles" do
      for {atom, bits} <- [
            infinity: 0x7FF0000000000000,
            neg_infinity: 0xFFF0000000000000,
            nan: 0x7FF8000000000000
          ] do
        bytes = <<4 <<< 3 ||| 1, bits::little-64>>
        assert {:ok, %{duration_ms: ^atom}} = Proto.decode(:execute_tool_response, bytes)

        assert IO.iodata_to_binary(Proto.encode(:execute_tool_response, %{duration_ms: atom})) ==
                 bytes
      end
    end

    test "malformed input is an error, never a crash" do
      assert {:error, _} = Proto.decode(:ping_request, <<10, 5, "hi">>)
      assert {:error, _} = Proto.decode(:ping_request, <<8, 1>>)
      assert {:error, _} = Proto.decode(:ping_request, <<10, 2, 0xFF, 0xFE>>)
      assert {:error, _} = Proto.decode(:ping_request, <<11>>)
      assert {:error, _} = Proto.decode(:ping_request, <<0, 1>>)
      assert {:error, _} = Proto.decode(:batch_result, <<34, 2, 10, 5>>)
      assert {:error, {:unknown_message_type, :nope}} = Proto.decode(:nope, "")

      for _ <- 1..500 do
        garbage = :crypto.strong_rand_bytes(:rand.uniform(40))

        assert match?({:ok, _}, Proto.decode(:get_stats_response, garbage)) or
                 match?({:error, _}, Proto.decode(:get_stats_response, garbage))
      end
    end

    test "encode rejects unknown keys and values that do not fit" do
      assert_raise ArgumentError, fn -> Proto.encode(:ping_request, %{mesage: "typo"}) end
      assert_raise ArgumentError, fn -> Proto.encode(:tool_error, %{code: 2_147_483_648}) end
      assert_raise ArgumentError, fn -> Proto.encode(:tool_chunk, %{sequence: -1}) end
      assert_raise ArgumentError, fn -> Proto.encode(:ping_request, %{message: <<0xFF>>}) end
      assert_raise ArgumentError, fn -> Proto.encode(:nope, %{}) end
    end
  end
end
