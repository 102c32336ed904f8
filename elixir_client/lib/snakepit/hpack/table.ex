defmodule Snakepit.HPACK.Table do
  @moduledoc """
  An HPACK indexing table: the static table followed by a dynamic table (RFC 7541 §2.3).

  The dynamic table is a list, newest entry first, so dynamic index 62 is the head. Entry size is
  `byte_size(name) + byte_size(value) + 32` (§4.1); inserting evicts from the tail until it fits
  (§4.4). Pure data; one per direction (the encoder's and the decoder's tables are independent).
  """

  alias Snakepit.HPACK.StaticTable

  defstruct entries: [], size: 0, max_size: 4096, length: 0

  @type t :: %__MODULE__{
          entries: [{binary(), binary()}],
          size: non_neg_integer(),
          max_size: non_neg_integer(),
          length: non_neg_integer()
        }

  @entry_overhead 32

  @doc "An empty table whose dynamic part may hold `max_size` bytes."
  @spec new(non_neg_integer()) :: t()
  def new(max_size \\ 4096), do: %__MODULE__{max_size: max_size}

  @doc "Size of one entry as HPACK counts it."
  @spec entry_size(binary(), binary()) :: non_neg_integer()
  def entry_size(name, value), do: byte_size(name) + byte_size(value) + @entry_overhead

  @doc "Looks an index up in the static, then the dynamic table."
  @spec lookup(t(), integer()) :: {:ok, {binary(), binary()}} | :error
  def lookup(%__MODULE__{} = table, index) do
    static = StaticTable.size()

    cond do
      index >= 1 and index <= static ->
        {:ok, StaticTable.get(index)}

      index > static and index - static <= table.length ->
        {:ok, Enum.at(table.entries, index - static - 1)}

      true ->
        :error
    end
  end

  @doc """
  Adds an entry, evicting old ones. An entry larger than the whole table empties it and is not
  stored (§4.4), which is not an error.
  """
  @spec add(t(), binary(), binary()) :: t()
  def add(%__MODULE__{} = table, name, value) do
    size = entry_size(name, value)

    if size > table.max_size do
      %{table | entries: [], size: 0, length: 0}
    else
      evict(%{
        table
        | entries: [{name, value} | table.entries],
          size: table.size + size,
          length: table.length + 1
      })
    end
  end

  @doc "Sets a new maximum size, evicting entries that no longer fit (§4.3)."
  @spec resize(t(), non_neg_integer()) :: t()
  def resize(%__MODULE__{} = table, max_size), do: evict(%{table | max_size: max_size})

  @doc """
  Finds `{name, value}`: `{:full, index}` for an exact match, `{:name, index}` when only the name
  matches, or `:none`. Static indices are preferred, as they never change.
  """
  @spec find(t(), binary(), binary()) :: {:full, pos_integer()} | {:name, pos_integer()} | :none
  def find(%__MODULE__{} = table, name, value) do
    case StaticTable.find_pair(name, value) do
      nil ->
        case find_dynamic(table.entries, name, value, StaticTable.size() + 1, nil) do
          {:full, index} -> {:full, index}
          dynamic_name -> name_match(StaticTable.find_name(name), dynamic_name)
        end

      index ->
        {:full, index}
    end
  end

  defp name_match(nil, nil), do: :none
  defp name_match(nil, dynamic_index), do: {:name, dynamic_index}
  defp name_match(static_index, _), do: {:name, static_index}

  defp find_dynamic([], _name, _value, _index, name_index), do: name_index
  defp find_dynamic([{name, value} | _], name, value, index, _), do: {:full, index}

  defp find_dynamic([{name, _} | rest], name, value, index, nil),
    do: find_dynamic(rest, name, value, index + 1, index)

  defp find_dynamic([_ | rest], name, value, index, name_index),
    do: find_dynamic(rest, name, value, index + 1, name_index)

  defp evict(%__MODULE__{size: size, max_size: max} = table) when size <= max, do: table

  defp evict(%__MODULE__{} = table) do
    {name, value} = List.last(table.entries)

    evict(%{
      table
      | entries: List.delete_at(table.entries, -1),
        size: table.size - entry_size(name, value),
        length: table.length - 1
    })
  end
end
