Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.MaxMessageTest do
  # `max_message_mb` bounds inline messages at both ends with one setting; the pool keeps serving
  # after a call over it, and shared memory is not bound by it.
  use ExUnit.Case, async: false
  import Snakepit.PoolHelpers

  alias Snakepit.{Error, NDArray}

  @moduletag timeout: 120_000

  defp pool!(extra) do
    start_pool!(Map.merge(%{worker_profile: :thread, pool_size: 1, max_message_mb: 1}, extra))
  end

  test "an argument over the limit is refused by the worker as resource_exhausted, and the pool keeps serving" do
    pool = pool!(%{shm: false})
    big = {:bytes, :binary.copy(<<7>>, 2 * 1024 * 1024)}

    assert {:error, %Error{reason: :resource_exhausted}} =
             Snakepit.execute(pool, "echo", %{x: big})

    assert {:ok, 3} = Snakepit.execute(pool, "add", %{a: 1, b: 2})
  end

  test "a result over the limit is refused, not taken, and the pool keeps serving" do
    pool = pool!(%{shm: false})
    # 6.4 KB in, a 400 x 400 float64 product (1.28 MB) back
    column = %NDArray{
      data: :binary.copy(<<1.0::float-little-64>>, 400),
      dtype: "<f8",
      shape: [400, 1]
    }

    row = %{column | shape: [1, 400]}

    assert {:error, %Error{} = error} = Snakepit.execute(pool, "matmul", %{a: column, b: row})
    assert error.reason == :resource_exhausted, inspect(error)
    assert {:ok, 3} = Snakepit.execute(pool, "add", %{a: 1, b: 2})

    small = %{column | data: :binary.copy(<<1.0::float-little-64>>, 100), shape: [100, 1]}

    assert {:ok, %NDArray{shape: [100, 100]}} =
             Snakepit.execute(pool, "matmul", %{a: small, b: %{small | shape: [1, 100]}})
  end

  test "through shared memory the same sizes pass" do
    pool = pool!(%{})
    big = :binary.copy(<<7>>, 2 * 1024 * 1024)
    assert {:ok, %{"x" => ^big}} = Snakepit.execute(pool, "echo", %{x: {:bytes, big}})
  end
end
