defmodule Snakepit.ReadmeQuickStartTest do
  # The iex session of README.md's "Quick start", run as written: each `#=> value` line is the value
  # the code above it must return.
  use ExUnit.Case, async: false

  @moduletag timeout: 120_000

  @readme Path.expand("../README.md", __DIR__)

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit)
    :ok
  end

  # The quick start's elixir block that starts a pool.
  defp session_block do
    [_, quick_start] = String.split(File.read!(@readme), "\n## Quick start\n", parts: 2)
    [quick_start | _] = String.split(quick_start, "\n## ", parts: 2)

    blocks =
      for [_, code] <- Regex.scan(~r/```elixir\n(.*?)```/s, quick_start),
          code =~ "Snakepit.start_pool(",
          do: code

    assert [block] = blocks, "README quick start: expected one iex block that starts a pool"
    block
  end

  # [{code, expected_value_source | nil}] in order
  defp steps(block) do
    {steps, code} =
      block
      |> String.split("\n")
      |> Enum.reduce({[], []}, fn line, {steps, code} ->
        case line do
          "#=> " <> expected -> {[{Enum.join(Enum.reverse(code), "\n"), expected} | steps], []}
          line -> {steps, [line | code]}
        end
      end)

    rest = code |> Enum.reverse() |> Enum.join("\n") |> String.trim()
    Enum.reverse(steps) ++ if(rest == "", do: [], else: [{rest, nil}])
  end

  test "the README quick start session runs as written and returns what it shows" do
    block = session_block()
    on_exit(fn -> Snakepit.stop_pool(:demo) end)
    assert [_ | _] = steps = steps(block)
    assert Enum.count(steps, fn {_, expected} -> expected end) >= 2

    Enum.reduce(steps, [], fn {code, expected}, binding ->
      {value, binding} = Code.eval_string(code, binding)

      if expected do
        {want, _} = Code.eval_string(expected)
        assert value == want, "README quick start: #{code}\nreturned #{inspect(value)}"
      end

      binding
    end)
  end
end
