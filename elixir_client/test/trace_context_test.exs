defmodule Snakepit.TraceContextTest do
  # W3C traceparent parsing and which one a call sends; the same rules as the Python server's
  # snakepit_bridge/server/tracing.py (end to end: telemetry_test.exs).
  use ExUnit.Case, async: true

  alias Snakepit.TraceContext

  @trace_id "4bf92f3577b34da6a3ce929d0e0e4736"
  @valid "00-#{@trace_id}-00f067aa0ba902b7-01"

  test "a version-00 traceparent parses into its fields" do
    assert {:ok,
            %{
              header: @valid,
              version: "00",
              trace_id: @trace_id,
              parent_id: "00f067aa0ba902b7",
              flags: "01"
            }} = TraceContext.parse(@valid)

    assert TraceContext.trace_id(@valid) == @trace_id
  end

  test "surrounding whitespace is trimmed from what is sent" do
    assert {:ok, %{header: @valid}} = TraceContext.parse("  #{@valid}\t")
  end

  test "a later version may carry fields after the flags; version 00 may not" do
    future = "01-#{@trace_id}-00f067aa0ba902b7-01-what-comes-next"
    assert {:ok, %{version: "01", header: ^future}} = TraceContext.parse(future)
    assert TraceContext.parse(@valid <> "-extra") == :error
    assert TraceContext.parse("01-#{@trace_id}-00f067aa0ba902b7-01x") == :error
  end

  test "invalid traceparents do not parse" do
    for invalid <- [
          String.upcase(@valid),
          "ff-#{@trace_id}-00f067aa0ba902b7-01",
          "00-#{String.duplicate("0", 32)}-00f067aa0ba902b7-01",
          "00-#{@trace_id}-0000000000000000-01",
          "00-#{@trace_id}-00f067aa0ba902b7",
          "00-#{@trace_id}-00f067aa0ba902b-01",
          "00_#{@trace_id}_00f067aa0ba902b7_01",
          "0g-#{@trace_id}-00f067aa0ba902b7-01",
          "01-#{@trace_id}-00f067aa0ba902b7-01-" <> String.duplicate("x", 500),
          "",
          nil,
          42
        ] do
      assert TraceContext.parse(invalid) == :error, "#{inspect(invalid)} parsed"
    end
  end

  test "a call sends its traceparent option, else the process dictionary's; the option wins" do
    other = "00-#{String.duplicate("a", 32)}-#{String.duplicate("b", 16)}-00"
    assert TraceContext.resolve([]) == nil
    Process.put(:snakepit_traceparent, other)
    assert TraceContext.resolve([]) == other
    assert TraceContext.resolve(traceparent: @valid) == @valid
    assert TraceContext.resolve(traceparent: nil) == other
  end

  test "an invalid traceparent is not sent, also when the process dictionary has a valid one" do
    assert TraceContext.resolve(traceparent: "not-a-traceparent") == nil
    Process.put(:snakepit_traceparent, @valid)
    assert TraceContext.resolve(traceparent: String.upcase(@valid)) == nil
    Process.put(:snakepit_traceparent, "00-garbage")
    assert TraceContext.resolve([]) == nil
  end
end
