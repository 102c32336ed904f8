defmodule Snakepit.HPACKTest do
  use ExUnit.Case, async: true

  alias Snakepit.HPACK
  alias Snakepit.HPACK.{Huffman, StaticTable, Table}

  defp hex(text), do: text |> String.replace(~r/\s+/, "") |> Base.decode16!(case: :lower)

  defp entries(%HPACK{table: table}), do: table.entries
  defp size(%HPACK{table: table}), do: table.size

  # Encodes with `mode`, checks the exact bytes, decodes them back with a separate context, and
  # checks both contexts' dynamic tables against the RFC's.
  defp check_sequence(steps, opts) do
    enc = HPACK.new_encoder(max_table_size: opts[:table], huffman: opts[:huffman])
    dec = HPACK.new_decoder(max_table_size: opts[:table])

    Enum.reduce(steps, {enc, dec}, fn {label, headers, block, table, table_size}, {enc, dec} ->
      {encoded, enc} = HPACK.encode(enc, headers)
      assert IO.iodata_to_binary(encoded) == hex(block), "#{label}: encoded bytes differ"

      assert {:ok, decoded, dec} = HPACK.decode(dec, hex(block))
      assert decoded == headers, "#{label}: decoded headers differ"

      for ctx <- [enc, dec] do
        assert entries(ctx) == table, "#{label}: dynamic table differs"
        assert size(ctx) == table_size, "#{label}: table size differs"
      end

      {enc, dec}
    end)
  end

  describe "RFC 7541 C.1 integer representation" do
    test "C.1.1: 10 with a 5-bit prefix" do
      assert HPACK.encode_integer(10, 5, 0) == <<0b01010>>
      assert {:ok, 10, ""} = HPACK.decode_integer(<<0b11101010>>, 5)
    end

    test "C.1.2: 1337 with a 5-bit prefix" do
      assert HPACK.encode_integer(1337, 5, 0) == <<31, 154, 10>>
      assert {:ok, 1337, "x"} = HPACK.decode_integer(<<31, 154, 10, ?x>>, 5)
    end

    test "C.1.3: 42 at an octet boundary" do
      assert HPACK.encode_integer(42, 8, 0) == <<42>>
      assert {:ok, 42, ""} = HPACK.decode_integer(<<42>>, 8)
    end

    test "prefix boundary and round trips" do
      for prefix <- 1..8, value <- [0, 1, 30, 31, 126, 127, 128, 255, 256, 16_383, 1_000_000] do
        encoded = HPACK.encode_integer(value, prefix, 0)
        assert {:ok, ^value, ""} = HPACK.decode_integer(encoded, prefix)
      end
    end

    test "truncated and oversized integers are errors" do
      assert {:error, {:compression_error, :truncated_integer}} =
               HPACK.decode_integer(<<31, 154>>, 5)

      assert {:error, {:compression_error, :integer_overflow}} =
               HPACK.decode_integer(<<31, 255, 255, 255, 255, 255, 1>>, 5)
    end
  end

  describe "RFC 7541 C.2 header field representation" do
    test "C.2.1 literal with indexing" do
      check_sequence(
        [
          {"C.2.1", [{"custom-key", "custom-header"}],
           "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
           [{"custom-key", "custom-header"}], 55}
        ],
        table: 4096,
        huffman: :never
      )
    end

    test "C.2.2 literal without indexing" do
      block = hex("040c 2f73 616d 706c 652f 7061 7468")

      {encoded, enc} =
        HPACK.encode(HPACK.new_encoder(huffman: :never), [{":path", "/sample/path", :no_index}])

      assert IO.iodata_to_binary(encoded) == block
      assert entries(enc) == []

      assert {:ok, [{":path", "/sample/path"}], dec} = HPACK.decode(HPACK.new_decoder(), block)
      assert entries(dec) == [] and size(dec) == 0
    end

    test "C.2.3 literal never indexed" do
      block = hex("1008 7061 7373 776f 7264 0673 6563 7265 74")

      {encoded, enc} =
        HPACK.encode(HPACK.new_encoder(huffman: :never), [{"password", "secret", :never_index}])

      assert IO.iodata_to_binary(encoded) == block
      assert entries(enc) == []

      assert {:ok, [{"password", "secret"}], dec} = HPACK.decode(HPACK.new_decoder(), block)
      assert entries(dec) == []
    end

    test "C.2.4 indexed field" do
      {encoded, enc} = HPACK.encode(HPACK.new_encoder(), [{":method", "GET"}])
      assert IO.iodata_to_binary(encoded) == hex("82")
      assert entries(enc) == []
      assert {:ok, [{":method", "GET"}], dec} = HPACK.decode(HPACK.new_decoder(), hex("82"))
      assert entries(dec) == []
    end
  end

  @req1 [
    {":method", "GET"},
    {":scheme", "http"},
    {":path", "/"},
    {":authority", "www.example.com"}
  ]
  @req2 @req1 ++ [{"cache-control", "no-cache"}]
  @req3 [
    {":method", "GET"},
    {":scheme", "https"},
    {":path", "/index.html"},
    {":authority", "www.example.com"},
    {"custom-key", "custom-value"}
  ]

  @t1 [{":authority", "www.example.com"}]
  @t2 [{"cache-control", "no-cache"} | @t1]
  @t3 [{"custom-key", "custom-value"} | @t2]

  test "C.3 requests without Huffman coding" do
    check_sequence(
      [
        {"C.3.1", @req1, "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d", @t1, 57},
        {"C.3.2", @req2, "8286 84be 5808 6e6f 2d63 6163 6865", @t2, 110},
        {"C.3.3", @req3,
         "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65", @t3, 164}
      ],
      table: 4096,
      huffman: :never
    )
  end

  test "C.4 requests with Huffman coding" do
    check_sequence(
      [
        {"C.4.1", @req1, "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff", @t1, 57},
        {"C.4.2", @req2, "8286 84be 5886 a8eb 1064 9cbf", @t2, 110},
        {"C.4.3", @req3, "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf", @t3, 164}
      ],
      table: 4096,
      huffman: :always
    )
  end

  @date1 "Mon, 21 Oct 2013 20:13:21 GMT"
  @date2 "Mon, 21 Oct 2013 20:13:22 GMT"
  @loc "https://www.example.com"
  @cookie "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"

  @resp1 [{":status", "302"}, {"cache-control", "private"}, {"date", @date1}, {"location", @loc}]
  @resp2 [{":status", "307"}, {"cache-control", "private"}, {"date", @date1}, {"location", @loc}]
  @resp3 [
    {":status", "200"},
    {"cache-control", "private"},
    {"date", @date2},
    {"location", @loc},
    {"content-encoding", "gzip"},
    {"set-cookie", @cookie}
  ]

  # Table states from the RFC; the 256-byte limit evicts entries in C.5.2 and C.5.3.
  @rt1 [{"location", @loc}, {"date", @date1}, {"cache-control", "private"}, {":status", "302"}]
  @rt2 [{":status", "307"}, {"location", @loc}, {"date", @date1}, {"cache-control", "private"}]
  @rt3 [{"set-cookie", @cookie}, {"content-encoding", "gzip"}, {"date", @date2}]

  test "C.5 responses without Huffman coding, with eviction" do
    check_sequence(
      [
        {"C.5.1", @resp1,
         """
         4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
         2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
         6c65 2e63 6f6d
         """, @rt1, 222},
        {"C.5.2", @resp2, "4803 3330 37c1 c0bf", @rt2, 222},
        {"C.5.3", @resp3,
         """
         88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d
         54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049
         5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e
         3d31
         """, @rt3, 215}
      ],
      table: 256,
      huffman: :never
    )
  end

  test "C.6 responses with Huffman coding, with eviction" do
    check_sequence(
      [
        {"C.6.1", @resp1,
         """
         4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6
         2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3
         """, @rt1, 222},
        {"C.6.2", @resp2, "4883 640e ffc1 c0bf", @rt2, 222},
        {"C.6.3", @resp3,
         """
         88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab
         77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f
         9587 3160 65c0 03ed 4ee5 b106 3d50 07
         """, @rt3, 215}
      ],
      table: 256,
      huffman: :always
    )
  end

  describe "static table" do
    test "has the 61 entries of Appendix A" do
      assert StaticTable.size() == 61
      assert StaticTable.get(1) == {":authority", ""}
      assert StaticTable.get(8) == {":status", "200"}
      assert StaticTable.get(24) == {"cache-control", ""}
      assert StaticTable.get(33) == {"date", ""}
      assert StaticTable.get(55) == {"set-cookie", ""}
      assert StaticTable.get(61) == {"www-authenticate", ""}
      assert StaticTable.get(62) == nil
    end

    test "matches the static table of Python's hpack" do
      script =
        "import hpack.table as t, json; print(json.dumps([[n.decode(), v.decode()] for n, v in t.HeaderTable.STATIC_TABLE]))"

      {output, 0} = System.cmd("python3", ["-c", script])
      ours = for i <- 1..StaticTable.size(), do: Tuple.to_list(StaticTable.get(i))
      assert :jiffy.decode(output, [:return_maps]) == ours
    end
  end

  describe "Huffman" do
    test "round trips every byte value" do
      all = :binary.list_to_bin(Enum.to_list(0..255))
      assert {:ok, ^all} = Huffman.decode(Huffman.encode(all))
      assert byte_size(Huffman.encode(all)) == Huffman.encoded_size(all)
    end

    test "round trips random strings" do
      for _ <- 1..200 do
        s = :crypto.strong_rand_bytes(:rand.uniform(64))
        assert {:ok, ^s} = Huffman.decode(Huffman.encode(s))
      end
    end

    test "www.example.com (RFC 7541 C.4.1)" do
      assert Huffman.encode("www.example.com") == hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff")
    end

    test "rejects padding longer than 7 bits, padding that is not all ones, and EOS" do
      # "0" is code 00000 (5 bits); a full extra 0xff byte of padding is too long.
      assert {:ok, "0"} = Huffman.decode(<<0b00000111>>)
      assert {:error, :invalid_huffman} = Huffman.decode(<<0b00000111, 0xFF>>)
      assert {:error, :invalid_huffman} = Huffman.decode(<<0b00000101>>)
      # EOS is 30 ones.
      assert {:error, :invalid_huffman} = Huffman.decode(<<0xFF, 0xFF, 0xFF, 0xFF>>)
    end
  end

  describe "dynamic table" do
    test "an entry larger than the table empties it" do
      table = Table.new(100) |> Table.add("a", "b")
      assert table.size == 34
      table = Table.add(table, "big", String.duplicate("x", 100))
      assert table.entries == [] and table.size == 0
    end

    test "resize evicts oldest first" do
      table = Table.new(4096) |> Table.add("a", "1") |> Table.add("b", "2") |> Table.add("c", "3")
      table = Table.resize(table, 70)
      assert table.entries == [{"c", "3"}, {"b", "2"}]
      assert table.size == 68
    end
  end

  describe "dynamic table size updates" do
    test "decoder applies an update at the start of a block" do
      {:ok, _, dec} = HPACK.decode(HPACK.new_decoder(max_table_size: 256), hex("4803 3330 37"))
      assert size(dec) == 42
      # 0x20 = size update to 0: evicts everything.
      assert {:ok, [{":method", "GET"}], dec} = HPACK.decode(dec, <<0x20, 0x82>>)
      assert entries(dec) == [] and dec.table.max_size == 0
    end

    test "decoder rejects an update above the advertised limit, or after a field" do
      dec = HPACK.new_decoder(max_table_size: 256)
      too_big = HPACK.encode_integer(257, 5, 0b001)

      assert {:error, {:compression_error, {:table_size_update_too_large, 257}}} =
               HPACK.decode(dec, too_big)

      assert {:error, {:compression_error, :table_size_update_after_field}} =
               HPACK.decode(dec, <<0x82, 0x20>>)
    end

    test "encoder signals a smaller peer table and the decoder follows" do
      enc = HPACK.new_encoder()
      {_, enc} = HPACK.encode(enc, [{"x-a", "1"}, {"x-b", "2"}])
      enc = enc |> HPACK.set_max_table_size(0) |> HPACK.set_max_table_size(40)
      assert entries(enc) == []
      {block, enc} = HPACK.encode(enc, [{"x-c", "3"}])
      block = IO.iodata_to_binary(block)
      # Minimum (0) then final (40) size, then the literal.
      assert <<0x20, 0x3F, 9, _::binary>> = block
      assert enc.table.max_size == 40

      dec = HPACK.new_decoder()
      assert {:ok, [{"x-c", "3"}], dec} = HPACK.decode(dec, block)
      assert dec.table.max_size == 40 and entries(dec) == [{"x-c", "3"}]
    end
  end

  describe "malformed input" do
    test "index 0 and out-of-range indices" do
      dec = HPACK.new_decoder()
      assert {:error, {:compression_error, :zero_index}} = HPACK.decode(dec, <<0x80>>)
      assert {:error, {:compression_error, {:invalid_index, 62}}} = HPACK.decode(dec, <<0xBE>>)
    end

    test "truncated string" do
      assert {:error, {:compression_error, :truncated_string}} =
               HPACK.decode(HPACK.new_decoder(), <<0x40, 0x05, "ab">>)
    end

    test "header list size limit" do
      dec = HPACK.new_decoder(max_header_list_size: 40)

      assert {:error, {:compression_error, :header_list_too_large}} =
               HPACK.decode(
                 dec,
                 IO.iodata_to_binary(
                   elem(HPACK.encode(HPACK.new_encoder(), [{"k", String.duplicate("v", 10)}]), 0)
                 )
               )
    end
  end

  test "decodes header blocks produced by Python's hpack encoder" do
    script = """
    import sys, hpack
    e = hpack.Encoder()
    hs = [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "0"),
          ("grpc-message", "caf\\u00e9 %25 done"), ("x-long", "y" * 300)]
    out = [e.encode(hs).hex(), e.encode(hs).hex(), e.encode(hs[:2] + [("x-new", "z")]).hex()]
    print(" ".join(out))
    """

    {output, 0} = System.cmd("python3", ["-c", script])
    [b1, b2, b3] = output |> String.trim() |> String.split(" ")
    dec = HPACK.new_decoder()

    expected = [
      {":status", "200"},
      {"content-type", "application/grpc"},
      {"grpc-status", "0"},
      {"grpc-message", "café %25 done"},
      {"x-long", String.duplicate("y", 300)}
    ]

    assert {:ok, ^expected, dec} = HPACK.decode(dec, Base.decode16!(b1, case: :lower))
    assert {:ok, ^expected, dec} = HPACK.decode(dec, Base.decode16!(b2, case: :lower))
    assert {:ok, [_, _, {"x-new", "z"}], _} = HPACK.decode(dec, Base.decode16!(b3, case: :lower))
  end

  test "Python's hpack decoder reads our blocks (Huffman and not, with dynamic references)" do
    headers = [
      {":method", "POST"},
      {":path", "/snakepit.bridge.BridgeService/Ping"},
      {"x-k", "ümlaut"}
    ]

    enc = HPACK.new_encoder()
    {b1, enc} = HPACK.encode(enc, headers)
    {b2, _enc} = HPACK.encode(enc, headers)
    hexes = Enum.map([b1, b2], &Base.encode16(IO.iodata_to_binary(&1), case: :lower))

    script = """
    import sys, hpack, json
    d = hpack.Decoder()
    res = []
    for h in sys.argv[1:]:
        res.append([[n, v] for n, v in d.decode(bytes.fromhex(h))])
    print(json.dumps(res))
    """

    {output, 0} = System.cmd("python3", ["-c", script | hexes])
    expected = Enum.map(headers, fn {n, v} -> [n, v] end)
    assert :jiffy.decode(output, [:return_maps]) == [expected, expected]
  end
end
