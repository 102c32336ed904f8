defmodule Snakepit.CodecTest do
  use ExUnit.Case, async: true

  alias Snakepit.{Codec, NDArray}

  defp json(term), do: term |> Codec.encode() |> elem(0) |> :jiffy.decode([:return_maps])
  defp roundtrip(term), do: term |> Codec.encode() |> then(fn {j, b} -> Codec.decode!(j, b) end)

  describe "encode" do
    test "integers stay integers and floats keep a fraction" do
      assert {"[3,1.0,-2.5,123456789012345678901234567890]", []} =
               Codec.encode([3, 1.0, -2.5, 123_456_789_012_345_678_901_234_567_890])
    end

    test "nil, booleans and strings map to JSON" do
      assert Codec.encode([nil, true, false, "héllo"]) == {~s([null,true,false,"héllo"]), []}
    end

    test "atom keys become string keys and atom values strings" do
      assert json(%{:a => :ok, "b" => 1, 3 => 2}) == %{"a" => "ok", "b" => 1, "3" => 2}
    end

    test "binaries that are not valid UTF-8 become bytes blobs" do
      assert {json, [<<255, 0, 1>>]} = Codec.encode(%{"data" => <<255, 0, 1>>})

      assert :jiffy.decode(json, [:return_maps]) == %{
               "data" => %{"__snakepit__" => "bytes", "blob" => 0}
             }
    end

    test "{:bytes, bin} forces a blob even for valid UTF-8" do
      assert {json, ["abc"]} = Codec.encode({:bytes, "abc"})
      assert :jiffy.decode(json, [:return_maps]) == %{"__snakepit__" => "bytes", "blob" => 0}
    end

    test "blob indexes follow the order of appearance" do
      {json, blobs} = Codec.encode([{:bytes, "a"}, %{x: {:bytes, "b"}}, {:bytes, "c"}])
      assert blobs == ["a", "b", "c"]

      assert :jiffy.decode(json, [:return_maps]) == [
               %{"__snakepit__" => "bytes", "blob" => 0},
               %{"x" => %{"__snakepit__" => "bytes", "blob" => 1}},
               %{"__snakepit__" => "bytes", "blob" => 2}
             ]
    end

    test "ndarrays carry dtype, shape and the raw buffer" do
      nd = NDArray.from_list([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], "<f8")
      assert nd.shape == [2, 3]
      {json, [buf]} = Codec.encode(%{m: nd})
      assert byte_size(buf) == 48

      assert :jiffy.decode(json, [:return_maps]) == %{
               "m" => %{
                 "__snakepit__" => "ndarray",
                 "blob" => 0,
                 "dtype" => "<f8",
                 "shape" => [2, 3]
               }
             }
    end

    test "an ndarray whose buffer disagrees with its shape is rejected" do
      assert_raise ArgumentError, ~r/disagrees/, fn ->
        Codec.encode(%NDArray{data: <<0::64>>, dtype: "<f8", shape: [2]})
      end
    end

    test "non-finite floats are tagged" do
      assert json([:nan, :infinity, :neg_infinity]) == [
               %{"__snakepit__" => "float", "value" => "nan"},
               %{"__snakepit__" => "float", "value" => "inf"},
               %{"__snakepit__" => "float", "value" => "-inf"}
             ]
    end

    test "a map with a __snakepit__ key is wrapped as an object" do
      assert json(%{"__snakepit__" => "bytes", "blob" => 9}) == %{
               "__snakepit__" => "object",
               "value" => %{"__snakepit__" => "bytes", "blob" => 9}
             }
    end

    test "tuples become lists" do
      assert json({1, "a"}) == [1, "a"]
    end

    test "unencodable values raise ArgumentError" do
      assert_raise ArgumentError, fn -> Codec.encode(self()) end
      assert_raise ArgumentError, ~r/URI/, fn -> Codec.encode(URI.parse("http://x")) end
      assert_raise ArgumentError, ~r/collide/, fn -> Codec.encode(%{:a => 1, "a" => 2}) end
    end

    test "encode_args accepts maps, keyword lists and nil only" do
      assert Codec.encode_args(nil) == {"{}", []}
      assert Codec.encode_args(%{}) == {"{}", []}
      assert Codec.encode_args(a: 1) == {~s({"a":1}), []}
      assert_raise ArgumentError, fn -> Codec.encode_args([1, 2]) end
      assert_raise ArgumentError, fn -> Codec.encode_args("x") end
    end
  end

  describe "decode" do
    test "plain JSON values, string keys, null as nil" do
      assert Codec.decode(~s({"a": [1, 2.0, null, true, "x"], "b": {}}), []) ==
               {:ok, %{"a" => [1, 2.0, nil, true, "x"], "b" => %{}}}
    end

    test "empty JSON decodes to nil" do
      assert Codec.decode("", []) == {:ok, nil}
    end

    test "bytes tags resolve to their blob, or {:bytes, bin} with bytes: :tagged" do
      j = ~s({"x": {"__snakepit__": "bytes", "blob": 1}})
      assert Codec.decode(j, ["a", "b"]) == {:ok, %{"x" => "b"}}
      assert Codec.decode(j, ["a", "b"], bytes: :tagged) == {:ok, %{"x" => {:bytes, "b"}}}
    end

    test "ndarray tags become NDArray structs" do
      buf = <<1::little-64, 2::little-64>>
      j = ~s({"__snakepit__": "ndarray", "blob": 0, "dtype": "<i8", "shape": [2]})
      assert {:ok, %NDArray{data: ^buf, dtype: "<i8", shape: [2]} = nd} = Codec.decode(j, [buf])
      assert NDArray.to_list(nd) == [1, 2]
    end

    test "non-finite floats and object wrappers" do
      j =
        ~s([{"__snakepit__": "float", "value": "-inf"},
              {"__snakepit__": "object", "value": {"__snakepit__": "x", "v": {"__snakepit__": "float", "value": "nan"}}}])

      assert Codec.decode(j, []) == {:ok, [:neg_infinity, %{"__snakepit__" => "x", "v" => :nan}]}
    end

    test "errors name the problem" do
      assert {:error, msg} = Codec.decode(~s({"__snakepit__": "bytes", "blob": 2}), ["a"])
      assert msg =~ "blob index 2 out of range"
      assert {:error, msg} = Codec.decode(~s({"__snakepit__": "weird"}), [])
      assert msg =~ "unknown __snakepit__ tag \"weird\""

      assert {:error, msg} =
               Codec.decode(
                 ~s({"__snakepit__": "ndarray", "blob": 0, "dtype": "<f8", "shape": [3]}),
                 ["12345678"]
               )

      assert msg =~ "disagrees"
      assert {:error, "invalid JSON" <> _} = Codec.decode("{nope", [])
    end
  end

  test "round trips keep types" do
    value = %{
      "int" => 1,
      "float" => 1.0,
      "big" => 2 ** 80,
      "nil" => nil,
      "list" => [true, false, "s", <<0, 255>>],
      "nested" => %{"k" => [1.5e-9, :infinity]},
      "nd" => NDArray.from_list([1, 2, 3], "<i4")
    }

    assert roundtrip(value) == value
    assert roundtrip(%{a: 1}) == %{"a" => 1}
  end

  test "NDArray.from_list / to_list for common dtypes" do
    for dtype <- ["<f8", "<f4", "<i8", "<i4", "|u1", ">i2"] do
      nd = NDArray.from_list([[1, 2], [3, 4]], dtype)
      assert NDArray.to_list(nd) |> List.flatten() |> Enum.map(&round/1) == [1, 2, 3, 4]
    end

    assert NDArray.to_list(NDArray.from_list([true, false], "|b1")) == [true, false]
  end

  describe "shared-memory regions" do
    @regions %{prefix: "p0123456789abcdef", min_bytes: 100}

    # A reader over `regions` (name => binary) that records what it was asked for.
    defp reader(regions) do
      test = self()

      fn name, offset, nbytes ->
        send(test, {:read, name, offset, nbytes})

        case Map.fetch(regions, name) do
          {:ok, bin} -> {:ok, binary_part(bin, offset, nbytes)}
          :error -> {:error, "region #{name} does not exist"}
        end
      end
    end

    test "bytes and array buffers of min_bytes or more become placements named <prefix>.<n>" do
      big = :binary.copy(<<1>>, 100)
      nd = %NDArray{data: :binary.copy(<<0>>, 800), dtype: "<f8", shape: [10, 10]}
      value = [{:bytes, big}, {:bytes, "small"}, nd, "a valid UTF-8 string of any size", <<255>>]

      {json, blobs, placements} = Codec.encode_placing(value, @regions)
      assert blobs == ["small", <<255>>]
      assert placements == [{"p0123456789abcdef.0", big}, {"p0123456789abcdef.1", nd.data}]

      assert :jiffy.decode(json, [:return_maps]) == [
               %{
                 "__snakepit__" => "bytes",
                 "shm" => "p0123456789abcdef.0",
                 "offset" => 0,
                 "length" => 100
               },
               %{"__snakepit__" => "bytes", "blob" => 0},
               %{
                 "__snakepit__" => "ndarray",
                 "shm" => "p0123456789abcdef.1",
                 "offset" => 0,
                 "dtype" => "<f8",
                 "shape" => [10, 10]
               },
               "a valid UTF-8 string of any size",
               %{"__snakepit__" => "bytes", "blob" => 1}
             ]
    end

    test "without a region spec it is encode/1" do
      value = %{x: {:bytes, :binary.copy(<<1>>, 1000)}}
      {json, blobs} = Codec.encode(value)
      assert Codec.encode_placing(value, nil) == {json, blobs, []}
      assert Codec.encode_args_placing(nil, @regions) == {"{}", [], []}
    end

    test "region references decode through the reader, sized by length or dtype and shape" do
      regions = %{"r.0" => "xxhello", "r.1" => <<1.5::float-little-64, 2.5::float-little-64>>}

      json = ~s([{"__snakepit__": "bytes", "shm": "r.0", "offset": 2, "length": 5},
            {"__snakepit__": "ndarray", "shm": "r.1", "dtype": "<f8", "shape": [2]}])

      assert {:ok, ["hello", nd]} = Codec.decode(json, [], read_region: reader(regions))
      assert NDArray.to_flat_list(nd) == [1.5, 2.5]
      assert_received {:read, "r.0", 2, 5}
      assert_received {:read, "r.1", 0, 16}

      assert {:ok, [{:bytes, "hello"}, _]} =
               Codec.decode(json, [], read_region: reader(regions), bytes: :tagged)
    end

    test "a reference without a reader, or one the reader refuses, is an error naming the region" do
      json = ~s({"__snakepit__": "bytes", "shm": "r.9", "length": 1})
      assert {:error, msg} = Codec.decode(json, [])
      assert msg =~ ~s(bytes in shared-memory region "r.9")

      assert {:error, "region r.9 does not exist"} =
               Codec.decode(json, [], read_region: reader(%{}))
    end

    test "a malformed reference fails before anything is read" do
      for {json, why} <- [
            {~s({"__snakepit__": "bytes", "shm": "r.0"}), "length"},
            {~s({"__snakepit__": "bytes", "shm": "r.0", "length": 1, "offset": -1}), "offset"},
            {~s({"__snakepit__": "ndarray", "shm": "r.0", "dtype": "<x8", "shape": [1]}),
             "dtype"},
            {~s({"__snakepit__": "ndarray", "shm": "r.0", "dtype": "<f8", "shape": [-1]}),
             "shape"}
          ] do
        assert {:error, msg} = Codec.decode(json, [], read_region: reader(%{"r.0" => "12345678"}))
        assert msg =~ why
        refute_received {:read, _, _, _}
      end
    end
  end
end
