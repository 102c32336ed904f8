defmodule Snakepit.HPACK.StaticTable do
  @moduledoc "The HPACK static table (RFC 7541 Appendix A), indices 1..61."

  @entries [
    {":authority", ""},
    {":method", "GET"},
    {":method", "POST"},
    {":path", "/"},
    {":path", "/index.html"},
    {":scheme", "http"},
    {":scheme", "https"},
    {":status", "200"},
    {":status", "204"},
    {":status", "206"},
    {":status", "304"},
    {":status", "400"},
    {":status", "404"},
    {":status", "500"},
    {"accept-charset", ""},
    {"accept-encoding", "gzip, deflate"},
    {"accept-language", ""},
    {"accept-ranges", ""},
    {"accept", ""},
    {"access-control-allow-origin", ""},
    {"age", ""},
    {"allow", ""},
    {"authorization", ""},
    {"cache-control", ""},
    {"content-disposition", ""},
    {"content-encoding", ""},
    {"content-language", ""},
    {"content-length", ""},
    {"content-location", ""},
    {"content-range", ""},
    {"content-type", ""},
    {"cookie", ""},
    {"date", ""},
    {"etag", ""},
    {"expect", ""},
    {"expires", ""},
    {"from", ""},
    {"host", ""},
    {"if-match", ""},
    {"if-modified-since", ""},
    {"if-none-match", ""},
    {"if-range", ""},
    {"if-unmodified-since", ""},
    {"last-modified", ""},
    {"link", ""},
    {"location", ""},
    {"max-forwards", ""},
    {"proxy-authenticate", ""},
    {"proxy-authorization", ""},
    {"range", ""},
    {"referer", ""},
    {"refresh", ""},
    {"retry-after", ""},
    {"server", ""},
    {"set-cookie", ""},
    {"strict-transport-security", ""},
    {"transfer-encoding", ""},
    {"user-agent", ""},
    {"vary", ""},
    {"via", ""},
    {"www-authenticate", ""}
  ]

  @size length(@entries)
  @tuple List.to_tuple(@entries)
  # The first index wins for names that appear several times (e.g. ":method").
  @by_pair @entries |> Enum.with_index(1) |> Enum.reverse() |> Map.new()
  @by_name @entries
           |> Enum.with_index(1)
           |> Enum.reverse()
           |> Map.new(fn {{name, _}, index} -> {name, index} end)

  @doc "Number of static entries (61)."
  @spec size() :: pos_integer()
  def size, do: @size

  @doc "The `{name, value}` at `index` (1-based), or `nil`."
  @spec get(integer()) :: {binary(), binary()} | nil
  def get(index) when index >= 1 and index <= @size, do: elem(@tuple, index - 1)
  def get(_index), do: nil

  @doc "Index of the exact `{name, value}` pair, or `nil`."
  @spec find_pair(binary(), binary()) :: pos_integer() | nil
  def find_pair(name, value), do: Map.get(@by_pair, {name, value})

  @doc "Lowest index whose name is `name`, or `nil`."
  @spec find_name(binary()) :: pos_integer() | nil
  def find_name(name), do: Map.get(@by_name, name)
end
