Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.AuthAndErrorsTest do
  # Bearer-token auth, streaming/unary mismatches and per-call logging, with real workers.
  use ExUnit.Case, async: false
  import Snakepit.PoolHelpers
  import ExUnit.CaptureLog
  alias Snakepit.Error

  @moduletag timeout: 120_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit)
    :ok
  end

  test "a pool with auth_token calls a server that requires it" do
    pool =
      start_pool!(
        worker_profile: :thread,
        pool_size: 1,
        threads_per_worker: 2,
        auth_token: "s3cret-token"
      )

    assert {:ok, 3} = Snakepit.execute(pool, "add", %{a: 1, b: 2})
    assert {:ok, %{workers: [%{python: %{worker_mode: "threaded"}}]}} = Snakepit.get_stats(pool)
  end

  test "a wrong token is :unauthenticated" do
    # the server reads its token from RIGHT_TOKEN (the last --auth-token-env wins); the pool sends another
    pool =
      start_pool!(
        worker_profile: :process,
        pool_size: 1,
        auth_token: "wrong",
        adapter_args: ["--auth-token-env", "RIGHT_TOKEN"],
        adapter_env: [{"RIGHT_TOKEN", "right"}]
      )

    assert {:error, %Error{reason: :unauthenticated, grpc_status: :unauthenticated}} =
             Snakepit.execute(pool, "ping", %{})
  end

  test "streaming tool through execute, and a unary tool through execute_stream, are :failed_precondition" do
    pool = start_pool!(worker_profile: :process, pool_size: 1)

    assert {:error, %Error{reason: :failed_precondition, message: m1}} =
             Snakepit.execute(pool, "progress", %{steps: 1})

    assert m1 =~ "progress"

    assert {:error, %Error{reason: :failed_precondition}} =
             Snakepit.execute_stream(pool, "add", %{a: 1, b: 2}, fn _ -> :ok end)

    assert {:ok, 3} = Snakepit.execute(pool, "add", %{a: 1, b: 2})
  end

  test "each call logs pool, worker, tool and duration as logger metadata" do
    pool = start_pool!(worker_profile: :process, pool_size: 1)
    Logger.configure(level: :debug)
    old = Application.get_env(:logger, :console)[:metadata]
    Logger.configure_backend(:console, metadata: [:pool, :worker, :tool, :duration_ms])

    log =
      try do
        capture_log([level: :debug], fn ->
          {:ok, _} = Snakepit.execute(pool, "add", %{a: 1, b: 2})
        end)
      after
        Logger.configure_backend(:console, metadata: old || [])
        Logger.configure(level: :warning)
      end

    assert log =~ "snakepit add ok"
    assert log =~ "pool=#{pool}"
    assert log =~ "tool=add"
    assert log =~ "duration_ms="
  end
end
