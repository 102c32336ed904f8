defmodule Snakepit.Proto do
  @moduledoc """
  Encoding and decoding of every message in `proto/snakepit_bridge.proto`, driven by one
  declarative schema per message.

  Messages are maps with atom keys named as the proto fields. Decoding fills proto3 defaults for
  absent fields: `""`, `0`, `0.0`, `false`, `[]` (repeated), `%{}` (maps) and `nil` (unset message
  fields and unset `optional` fields). Encoding omits default values (but always sends a set
  `optional` field or message field); keys may be left out of the input map, and unknown keys raise
  `ArgumentError`. `map<string, string>` fields are Elixir maps; `repeated bytes` are lists of
  binaries; `double` fields decode to floats (or `:nan`, `:infinity`, `:neg_infinity`).
  Unknown fields in received messages are skipped.

  Message types are snake_case atoms of the proto names: `:ping_request`, `:execute_tool_request`,
  `:tool_chunk`, `:get_stats_response`, ...
  """

  alias Snakepit.Protobuf

  # {name, number, type, cardinality}; cardinality is :single, :optional, :repeated or :map.
  @schemas %{
    ping_request: [{:message, 1, :string, :single}],
    ping_response: [
      {:message, 1, :string, :single},
      {:server_time_unix_ms, 2, :int64, :single},
      {:pid, 3, :int32, :single},
      {:worker_mode, 4, :string, :single},
      {:adapter, 5, :string, :single},
      {:shm_dir, 6, :string, :single}
    ],
    parameter_spec: [
      {:name, 1, :string, :single},
      {:type, 2, :string, :single},
      {:required, 3, :bool, :single},
      {:default_json, 4, :string, :single},
      {:description, 5, :string, :single}
    ],
    tool_spec: [
      {:name, 1, :string, :single},
      {:description, 2, :string, :single},
      {:parameters, 3, {:message, :parameter_spec}, :repeated},
      {:supports_streaming, 4, :bool, :single}
    ],
    describe_tools_request: [],
    describe_tools_response: [
      {:tools, 1, {:message, :tool_spec}, :repeated},
      {:adapter, 2, :string, :single}
    ],
    execute_tool_request: [
      {:tool_name, 1, :string, :single},
      {:args_json, 2, :string, :single},
      {:blobs, 3, :bytes, :repeated},
      {:session_id, 4, :string, :single},
      {:request_id, 5, :string, :single},
      {:metadata, 6, :string, :map},
      {:seed, 7, :uint64, :optional},
      {:shm_result_prefix, 8, :string, :single},
      {:shm_result_min_bytes, 9, :uint64, :single}
    ],
    execute_tool_response: [
      {:result_json, 1, :string, :single},
      {:blobs, 2, :bytes, :repeated},
      {:request_id, 3, :string, :single},
      {:duration_ms, 4, :double, :single}
    ],
    tool_chunk: [
      {:sequence, 1, :uint64, :single},
      {:data_json, 2, :string, :single},
      {:blobs, 3, :bytes, :repeated},
      {:is_final, 4, :bool, :single}
    ],
    tool_error: [
      {:code, 1, :int32, :single},
      {:type, 2, :string, :single},
      {:message, 3, :string, :single},
      {:traceback, 4, :string, :single},
      {:tool_name, 5, :string, :single}
    ],
    batch_item: [
      {:args_json, 1, :string, :single},
      {:blobs, 2, :bytes, :repeated}
    ],
    execute_batch_request: [
      {:tool_name, 1, :string, :single},
      {:items, 2, {:message, :batch_item}, :repeated},
      {:session_id, 3, :string, :single},
      {:request_id, 4, :string, :single},
      {:metadata, 5, :string, :map},
      {:max_parallelism, 6, :uint32, :single},
      {:shm_result_prefix, 7, :string, :single},
      {:shm_result_min_bytes, 8, :uint64, :single}
    ],
    batch_result: [
      {:ok, 1, :bool, :single},
      {:result_json, 2, :string, :single},
      {:blobs, 3, :bytes, :repeated},
      {:error, 4, {:message, :tool_error}, :single}
    ],
    execute_batch_response: [
      {:results, 1, {:message, :batch_result}, :repeated},
      {:request_id, 2, :string, :single}
    ],
    initialize_session_request: [
      {:session_id, 1, :string, :single},
      {:state_json, 2, :string, :single},
      {:blobs, 3, :bytes, :repeated},
      {:ttl_seconds, 4, :uint32, :single},
      {:seed, 5, :uint64, :optional},
      {:metadata, 6, :string, :map}
    ],
    initialize_session_response: [
      {:session_id, 1, :string, :single},
      {:created, 2, :bool, :single},
      {:ttl_seconds, 3, :uint32, :single}
    ],
    get_session_request: [{:session_id, 1, :string, :single}],
    get_session_response: [
      {:session_id, 1, :string, :single},
      {:state_json, 2, :string, :single},
      {:blobs, 3, :bytes, :repeated},
      {:created_at_unix_ms, 4, :int64, :single},
      {:last_used_unix_ms, 5, :int64, :single},
      {:request_count, 6, :uint64, :single},
      {:ttl_seconds, 7, :uint32, :single},
      {:metadata, 8, :string, :map}
    ],
    cleanup_session_request: [{:session_id, 1, :string, :single}],
    cleanup_session_response: [{:existed, 1, :bool, :single}],
    heartbeat_request: [{:session_id, 1, :string, :single}],
    heartbeat_response: [
      {:server_time_unix_ms, 1, :int64, :single},
      {:serving, 2, :bool, :single},
      {:session_alive, 3, :bool, :single}
    ],
    get_stats_request: [],
    tool_stats: [
      {:name, 1, :string, :single},
      {:calls, 2, :uint64, :single},
      {:failures, 3, :uint64, :single},
      {:mean_ms, 4, :double, :single},
      {:p50_ms, 5, :double, :single},
      {:p99_ms, 6, :double, :single},
      {:max_ms, 7, :double, :single}
    ],
    get_stats_response: [
      {:requests_total, 1, :uint64, :single},
      {:requests_active, 2, :uint64, :single},
      {:requests_failed, 3, :uint64, :single},
      {:threads, 4, :uint32, :single},
      {:max_workers, 5, :uint32, :single},
      {:uptime_seconds, 6, :double, :single},
      {:worker_mode, 7, :string, :single},
      {:gil_enabled, 8, :bool, :single},
      {:python_version, 9, :string, :single},
      {:pid, 10, :int32, :single},
      {:tools, 11, {:message, :tool_stats}, :repeated},
      {:sessions_active, 12, :uint64, :single},
      {:requests_queued, 13, :uint64, :single},
      {:adapter_stats_json, 14, :string, :single},
      {:thread_safety_json, 15, :string, :single}
    ]
  }

  @type message_type :: atom()

  @doc "The schema table: message type => `[{name, number, type, cardinality}]`."
  @spec schemas() :: %{message_type() => [{atom(), pos_integer(), term(), atom()}]}
  def schemas, do: @schemas

  @doc "Message types this module knows."
  @spec message_types() :: [message_type()]
  def message_types, do: Map.keys(@schemas)

  @doc "A message of `type` with every field at its proto3 default."
  @spec default(message_type()) :: map()
  def default(type),
    do:
      Map.new(schema!(type), fn {name, _, ftype, card} -> {name, default_value(ftype, card)} end)

  @doc """
  Encodes `message` (a map, possibly partial) as `type`. Raises `ArgumentError` for an unknown
  type, an unknown key or a value that does not fit its field.
  """
  @spec encode(message_type(), map()) :: iodata()
  def encode(type, message) when is_map(message) do
    fields = schema!(type)

    for key <- Map.keys(message), not List.keymember?(fields, key, 0) do
      raise ArgumentError, "unknown field #{inspect(key)} for #{type}"
    end

    for {name, number, ftype, card} <- fields,
        value = Map.get(message, name),
        not default?(value, ftype, card) do
      encode_field(number, ftype, card, value)
    end
  end

  defp default?(nil, _type, _card), do: true
  defp default?(_value, _type, :optional), do: false
  defp default?(value, _type, :repeated), do: value == []
  defp default?(value, _type, :map), do: value == %{}
  defp default?(_value, {:message, _}, :single), do: false
  defp default?(value, :string, :single), do: value == ""
  defp default?(value, :bytes, :single), do: value == ""
  defp default?(value, :bool, :single), do: value == false
  defp default?(value, :double, :single), do: value === 0.0 or value === 0
  defp default?(value, _int, :single), do: value === 0

  defp encode_field(number, {:message, type}, :repeated, values),
    do: Enum.map(values, &encode_field(number, {:message, type}, :single, &1))

  defp encode_field(number, {:message, type}, _card, value) do
    body = IO.iodata_to_binary(encode(type, value))
    [Protobuf.encode_key(number, 2), Protobuf.encode_varint(byte_size(body)), body]
  end

  defp encode_field(number, value_type, :map, map) when is_map(map) do
    # Each entry is a nested message {key = 1, value = 2}; sorted for deterministic bytes.
    for {key, value} <- Enum.sort(map) do
      entry =
        IO.iodata_to_binary([
          encode_field(1, :string, :single, key),
          encode_field(2, value_type, :single, value)
        ])

      [Protobuf.encode_key(number, 2), Protobuf.encode_varint(byte_size(entry)), entry]
    end
  end

  defp encode_field(number, type, :repeated, values)
       when type in [:string, :bytes] and is_list(values),
       do: Enum.map(values, &encode_field(number, type, :single, &1))

  defp encode_field(number, type, :repeated, values) when is_list(values) do
    # proto3 packs repeated scalars by default.
    packed = IO.iodata_to_binary(Enum.map(values, &Protobuf.encode_scalar(type, &1)))
    [Protobuf.encode_key(number, 2), Protobuf.encode_varint(byte_size(packed)), packed]
  end

  defp encode_field(number, type, card, value) when card in [:single, :optional],
    do: [
      Protobuf.encode_key(number, Protobuf.wire_type(type)),
      Protobuf.encode_scalar(type, value)
    ]

  defp encode_field(_number, type, card, value),
    do: raise(ArgumentError, "cannot encode #{inspect(value)} as #{card} #{inspect(type)}")

  @doc "Decodes `binary` as `type`, filling defaults for absent fields."
  @spec decode(message_type(), binary()) :: {:ok, map()} | {:error, term()}
  def decode(type, binary) when is_binary(binary) do
    case Map.fetch(@schemas, type) do
      {:ok, fields} -> decode_message(type, fields, binary)
      :error -> {:error, {:unknown_message_type, type}}
    end
  end

  defp decode_message(type, fields, binary) do
    with {:ok, raw} <- Protobuf.decode_fields(binary),
         {:ok, acc} <- collect(raw, fields, %{}) do
      finish(type, fields, acc)
    end
  end

  # Gathers raw values per field (lists reversed); nested messages are decoded in finish/3.
  defp collect([], _fields, acc), do: {:ok, acc}

  defp collect([{number, wire, raw} | rest], fields, acc) do
    case List.keyfind(fields, number, 1) do
      nil ->
        collect(rest, fields, acc)

      {name, _, ftype, card} ->
        case collect_value(ftype, card, wire, raw, Map.get(acc, name)) do
          {:ok, value} -> collect(rest, fields, Map.put(acc, name, value))
          {:error, reason} -> {:error, {name, reason}}
        end
    end
  end

  defp collect_value({:message, _}, card, 2, raw, previous) do
    case card do
      :repeated -> {:ok, [raw | previous || []]}
      # A singular message seen twice merges; concatenating the encodings is exactly that.
      _ -> {:ok, (previous || "") <> raw}
    end
  end

  defp collect_value(_type, :map, 2, raw, previous), do: {:ok, [raw | previous || []]}

  defp collect_value(type, card, wire, raw, previous) when not is_tuple(type) do
    case Protobuf.decode_scalar(type, wire, raw) do
      {:ok, {:packed, values}} when card == :repeated ->
        {:ok, Enum.reverse(values, previous || [])}

      {:ok, {:packed, _}} ->
        {:error, :packed_for_singular_field}

      {:ok, value} when card == :repeated ->
        {:ok, [value | previous || []]}

      {:ok, value} ->
        {:ok, value}

      {:error, _} = error ->
        error
    end
  end

  defp collect_value(type, _card, wire, _raw, _previous),
    do: {:error, {:wire_type_mismatch, type, wire}}

  defp finish(type, fields, acc) do
    Enum.reduce_while(fields, {:ok, %{}}, fn {name, _, ftype, card}, {:ok, out} ->
      case finish_value(ftype, card, Map.fetch(acc, name)) do
        {:ok, value} -> {:cont, {:ok, Map.put(out, name, value)}}
        {:error, reason} -> {:halt, {:error, {type, name, reason}}}
      end
    end)
  end

  defp finish_value(ftype, card, :error), do: {:ok, default_value(ftype, card)}

  defp finish_value({:message, type}, :repeated, {:ok, raws}) do
    raws
    |> Enum.reverse()
    |> Enum.reduce_while({:ok, []}, fn raw, {:ok, acc} ->
      case decode(type, raw) do
        {:ok, message} -> {:cont, {:ok, [message | acc]}}
        error -> {:halt, error}
      end
    end)
    |> case do
      {:ok, list} -> {:ok, Enum.reverse(list)}
      error -> error
    end
  end

  defp finish_value({:message, type}, _card, {:ok, raw}), do: decode(type, raw)

  defp finish_value(value_type, :map, {:ok, raws}) do
    raws
    |> Enum.reverse()
    |> Enum.reduce_while({:ok, %{}}, fn raw, {:ok, map} ->
      case decode_message(
             :map_entry,
             [{:key, 1, :string, :single}, {:value, 2, value_type, :single}],
             raw
           ) do
        # Later entries with the same key win, as protobuf specifies.
        {:ok, %{key: key, value: value}} -> {:cont, {:ok, Map.put(map, key, value)}}
        error -> {:halt, error}
      end
    end)
  end

  defp finish_value(_type, :repeated, {:ok, values}), do: {:ok, Enum.reverse(values)}
  defp finish_value(_type, _card, {:ok, value}), do: {:ok, value}

  defp default_value(_type, :repeated), do: []
  defp default_value(_type, :map), do: %{}
  defp default_value(_type, :optional), do: nil
  defp default_value({:message, _}, :single), do: nil
  defp default_value(:string, _), do: ""
  defp default_value(:bytes, _), do: ""
  defp default_value(:bool, _), do: false
  defp default_value(:double, _), do: 0.0
  defp default_value(_int, _), do: 0

  defp schema!(type) do
    case Map.fetch(@schemas, type) do
      {:ok, fields} -> fields
      :error -> raise ArgumentError, "unknown message type #{inspect(type)}"
    end
  end
end
