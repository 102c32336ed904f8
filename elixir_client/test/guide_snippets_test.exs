Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.GuideSnippetsTest do
  # The Elixir snippets of the threaded-workers guide, run verbatim: the config blocks are read by
  # Config.Reader and started by the :snakepit application, the call blocks are evaluated as written.
  use ExUnit.Case, async: false

  @moduletag :slow
  @moduletag timeout: 180_000

  @pool_config ~S'''
  # config/config.exs
  config :snakepit,
    pools: [
      %{
        name: :hpc_pool,
        worker_profile: :thread,
        pool_size: 4,  # 4 processes
        threads_per_worker: 16,  # 64 total capacity
        adapter_module: Snakepit.Adapters.GRPCPython,
        adapter_args: ["--mode", "threaded", "--max-workers", "16"],
        adapter_env: [
          {"OPENBLAS_NUM_THREADS", "16"},
          {"OMP_NUM_THREADS", "16"}
        ]
      }
    ]
  '''

  @execute ~S'''
  {:ok, result} = Snakepit.execute(:hpc_pool, "compute_intensive", %{data: [1,2,3]})
  '''

  @recycling_config ~S'''
  config :snakepit,
    pools: [
      %{
        name: :hpc_pool,
        worker_profile: :thread,
        worker_ttl: {3600, :seconds},  # Recycle hourly
        worker_max_requests: 1000       # Or after 1000 requests
      }
    ]
  '''

  @thread_stats ~S'''
  {:ok, stats} = Snakepit.execute(:hpc_pool, "get_thread_stats", %{})
  # => %{
  #   total_requests: 1234,
  #   active_requests: 8,
  #   max_workers: 16,
  #   thread_utilization: %{...}
  # }
  '''

  # The guide is the user's document; it lives in shared/seeds beside the checkout (as in CI).
  @guide_paths [
    Path.join(Snakepit.Config.repo_root(), "../shared/seeds/snakepit-threaded-workers-guide.md")
  ]

  defp run_config_block(block) do
    path =
      Path.join(System.tmp_dir!(), "snakepit_guide_#{System.unique_integer([:positive])}.exs")

    File.write!(path, "import Config\n" <> block)
    config = Config.Reader.read!(path)
    File.rm(path)

    :ok = Application.stop(:snakepit)

    for {key, value} <- config[:snakepit] do
      Application.put_env(:snakepit, key, value)
    end

    {:ok, _} = Application.ensure_all_started(:snakepit)
    :ok = Snakepit.await_ready(:hpc_pool, 60_000)
  end

  setup do
    old = Application.get_env(:snakepit, :pools)

    on_exit(fn ->
      Application.stop(:snakepit)

      if old,
        do: Application.put_env(:snakepit, :pools, old),
        else: Application.delete_env(:snakepit, :pools)

      Application.ensure_all_started(:snakepit)
    end)
  end

  test "the snippets here are the guide's Elixir blocks, verbatim" do
    case Enum.find(@guide_paths, &File.exists?/1) do
      nil ->
        IO.puts(:stderr, "guide not found in #{inspect(@guide_paths)}; comparing skipped")

      path ->
        blocks =
          Regex.scan(~r/```elixir\n(.*?)```/s, File.read!(path), capture: :all_but_first)
          |> Enum.map(fn [b] -> b end)

        assert blocks == [@pool_config, @execute, @recycling_config, @thread_stats]
    end
  end

  test "guide: configure a pool of 4 thread workers x 16 threads and execute compute_intensive" do
    run_config_block(@pool_config)
    workers = Snakepit.list_workers(:hpc_pool)
    assert length(workers) == 4
    assert Enum.all?(workers, &(&1.capacity == 16))
    assert {:ok, %{capacity: 64}} = Snakepit.get_stats(:hpc_pool)

    {_, binding} = Code.eval_string(@execute)
    assert binding[:result] != nil
  end

  test "guide: recycling config and get_thread_stats" do
    run_config_block(@recycling_config)
    [w | _] = Snakepit.list_workers(:hpc_pool)
    assert w.status == :ready

    {_, binding} = Code.eval_string(@thread_stats)
    stats = binding[:stats]
    # The guide's shape: every key it shows, with the worker's real values.
    assert %{
             "total_requests" => total,
             "active_requests" => active,
             "max_workers" => max_workers,
             "thread_utilization" => utilization
           } = stats

    assert max_workers == w.capacity
    assert is_integer(total) and total >= 0
    assert active >= 1 and active <= max_workers, "the get_thread_stats call itself is active"
    assert is_map(utilization)
  end

  test "pools from config start with the application and stop_pool stops them" do
    run_config_block(@recycling_config)
    os_pids = Enum.map(Snakepit.list_workers(:hpc_pool), & &1.os_pid)
    assert :ok = Snakepit.stop_pool(:hpc_pool)
    assert Snakepit.Pool.whereis(:hpc_pool) == nil
    Process.sleep(300)

    assert Snakepit.Pool.whereis(:hpc_pool) == nil,
           "the application supervisor restarted the pool"

    Snakepit.PoolHelpers.eventually(
      fn -> Enum.all?(os_pids, &(not Snakepit.PoolHelpers.os_alive?(&1))) end,
      10_000
    )
  end
end
