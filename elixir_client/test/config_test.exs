defmodule Snakepit.ConfigTest do
  use ExUnit.Case, async: true

  alias Snakepit.Config

  test "only name is required; the rest gets defaults" do
    assert {:ok, c} = Config.new(name: :p)
    assert c.worker_profile == :process
    assert c.threads_per_worker == 1
    assert c.worker_ttl == :infinity
    assert c.worker_max_requests == :infinity
    assert c.launcher == Snakepit.Launcher.GRPCPython
    assert c.python_adapter == "snakepit_bridge.adapters.showcase.ShowcaseAdapter"
    assert File.exists?(Path.join(c.script_dir, "grpc_server_process.py"))
  end

  test "the guide's recycling config is accepted as a map" do
    assert {:ok, c} =
             Config.new(%{
               name: :hpc_pool,
               worker_profile: :thread,
               worker_ttl: {3600, :seconds},
               worker_max_requests: 1000
             })

    assert c.worker_ttl == 3_600_000
    assert c.worker_max_requests == 1000
    assert c.threads_per_worker == 8

    assert c.python_adapter ==
             "snakepit_bridge.adapters.threaded_showcase.ThreadedShowcaseAdapter"
  end

  test "sick-worker detection has defaults and can turn health checks off" do
    c = Config.new!(name: :p)
    assert {c.health_check_interval, c.health_check_timeout} == {10_000, 5_000}
    assert {c.stuck_call_grace, c.max_stuck_calls} == {1_000, 1}

    assert Config.new!(name: :p, health_check_interval: :infinity).health_check_interval ==
             :infinity
  end

  test "workers listen on Unix sockets unless transport: :tcp" do
    assert Config.new!(name: :p).transport == :uds
    assert Config.new!(name: :p, transport: :tcp).transport == :tcp

    assert {:error, msg} = Config.new(name: :p, transport: "uds")
    assert msg =~ "invalid pool config key :transport: must be :uds"
    assert msg =~ ":tcp"
  end

  defmodule SpawnOnlyLauncher do
    @behaviour Snakepit.Launcher
    @impl true
    def command(_config, _opts), do: {"/bin/true", [], []}
  end

  test "workers are forked from a fork server unless start_mode: :spawn or the launcher cannot fork" do
    assert Config.new!(name: :p).start_mode == :fork_server
    assert Config.new!(name: :p, start_mode: :spawn).start_mode == :spawn
    assert Config.new!(name: :p, start_mode: :fork_server).start_mode == :fork_server

    assert {:error, msg} = Config.new(name: :p, start_mode: :fork)
    assert msg =~ "invalid pool config key :start_mode: must be :spawn"

    assert {:error, msg} =
             Config.new(name: :p, start_mode: :fork_server, launcher: SpawnOnlyLauncher)

    assert msg =~ "invalid pool config key :start_mode"
    assert msg =~ "does not implement fork_server_command/2"
    assert Config.new!(name: :p, launcher: SpawnOnlyLauncher).start_mode == :spawn
  end

  test "each worker's max requests are jittered by up to 0.1 unless max_requests_jitter says otherwise" do
    assert Config.new!(name: :p).max_requests_jitter == 0.1
    assert Config.new!(name: :p, max_requests_jitter: 0).max_requests_jitter === 0.0
  end

  test "a process worker is given two calls at once unless process_pipeline_depth says otherwise" do
    assert Config.new!(name: :p).process_pipeline_depth == 2
    assert Config.new!(name: :p, process_pipeline_depth: 1).process_pipeline_depth == 1
  end

  test "ttl units" do
    assert Config.new!(name: :p, worker_ttl: {2, :minutes}).worker_ttl == 120_000
    assert Config.new!(name: :p, worker_ttl: {250, :milliseconds}).worker_ttl == 250
    assert Config.new!(name: :p, worker_ttl: {1, :hours}).worker_ttl == 3_600_000
  end

  test "process workers always get one slot" do
    assert Config.new!(name: :p, worker_profile: :process, threads_per_worker: 8).threads_per_worker ==
             1

    assert Config.new!(name: :p, worker_profile: :thread, threads_per_worker: 8).threads_per_worker ==
             8
  end

  test "invalid values fail with a message naming the key" do
    for {cfg, key} <- [
          {[pool_size: 4], ":name"},
          {[name: :p, pool_size: 0], ":pool_size"},
          {[name: :p, worker_profile: :threads], ":worker_profile"},
          {[name: :p, worker_ttl: {1, :days}], ":worker_ttl"},
          {[name: :p, worker_max_requests: -1], ":worker_max_requests"},
          {[name: :p, adapter_args: [:x]], ":adapter_args"},
          {[name: :p, adapter_env: [{"A", 1}]], ":adapter_env"},
          {[name: :p, adapter_module: NoSuchModule], ":adapter_module"},
          {[name: :p, queue_timeout: :soon], ":queue_timeout"},
          {[name: :p, health_check_interval: 0], ":health_check_interval"},
          {[name: :p, health_check_timeout: :infinity], ":health_check_timeout"},
          {[name: :p, stuck_call_grace: -1], ":stuck_call_grace"},
          {[name: :p, max_stuck_calls: 0], ":max_stuck_calls"},
          {[name: :p, shm: :yes], ":shm"},
          {[name: :p, shm_min_bytes: 0], ":shm_min_bytes"},
          {[name: :p, shm_base_dir: ""], ":shm_base_dir"},
          {[name: :p, transport: :unix], ":transport"},
          {[name: :p, max_requests_jitter: 1], ":max_requests_jitter"},
          {[name: :p, process_pipeline_depth: 0], ":process_pipeline_depth"},
          {[name: :p, pool_sise: 2], ":pool_sise"}
        ] do
      assert {:error, msg} = Config.new(cfg)
      assert msg =~ "invalid pool config key #{key}", "#{inspect(cfg)} gave #{msg}"
    end
  end

  test "python executable: config key, else SNAKEPIT_PYTHON, else .venv, else python3" do
    assert Config.new!(name: :p, python_executable: "/x/python").python_executable == "/x/python"
    old = System.get_env("SNAKEPIT_PYTHON")

    try do
      System.put_env("SNAKEPIT_PYTHON", "/opt/py/bin/python3")
      assert Config.new!(name: :p).python_executable == "/opt/py/bin/python3"
      System.delete_env("SNAKEPIT_PYTHON")
      venv = Path.join(Config.repo_root(), ".venv/bin/python")
      expected = if File.exists?(venv), do: venv, else: "python3"
      assert Config.new!(name: :p).python_executable == expected
    after
      if old,
        do: System.put_env("SNAKEPIT_PYTHON", old),
        else: System.delete_env("SNAKEPIT_PYTHON")
    end
  end

  test "the launcher rejects a missing python executable naming the key" do
    c = Config.new!(name: :p, python_executable: "/nonexistent/python")
    assert {:error, msg} = Snakepit.Launcher.GRPCPython.validate(c)
    assert msg =~ ":python_executable"
  end

  test "the launcher builds the server command line" do
    c =
      Config.new!(
        name: :p,
        worker_profile: :thread,
        threads_per_worker: 4,
        adapter_args: ["--mode", "threaded"]
      )

    {_exe, args, env} = Snakepit.Launcher.GRPCPython.command(c, [])
    assert hd(args) =~ "grpc_server_threaded.py"
    assert ["--port", "0"] == Enum.slice(args, Enum.find_index(args, &(&1 == "--port")), 2)
    assert "--exit-on-stdin-eof" in args

    assert ["--max-workers", "4"] ==
             Enum.slice(args, Enum.find_index(args, &(&1 == "--max-workers")), 2)

    assert List.last(args) == "threaded"
    assert {"PYTHONUNBUFFERED", "1"} in env

    # a worker given a socket path: --uds instead of --host/--port
    {_exe, uds_args, _env} = Snakepit.Launcher.GRPCPython.command(c, uds: "/tmp/s/w1.sock")

    assert ["--uds", "/tmp/s/w1.sock"] ==
             Enum.slice(uds_args, Enum.find_index(uds_args, &(&1 == "--uds")), 2)

    refute "--port" in uds_args or "--host" in uds_args
    assert "--exit-on-stdin-eof" in uds_args

    c2 = Config.new!(name: :p, worker_profile: :thread, adapter_args: ["--max-workers", "16"])
    {_, args2, _} = Snakepit.Launcher.GRPCPython.command(c2, [])
    assert Enum.count(args2, &(&1 == "--max-workers")) == 1
  end

  test "max_message_mb is one setting: the workers get it as --max-message-mb" do
    {_, args, _} = Snakepit.Launcher.GRPCPython.command(Config.new!(name: :p), [])

    assert ["--max-message-mb", "64"] ==
             Enum.slice(args, Enum.find_index(args, &(&1 == "--max-message-mb")), 2)

    {_, args, _} =
      Snakepit.Launcher.GRPCPython.command(Config.new!(name: :p, max_message_mb: 256), [])

    assert ["--max-message-mb", "256"] ==
             Enum.slice(args, Enum.find_index(args, &(&1 == "--max-message-mb")), 2)

    own = Config.new!(name: :p, max_message_mb: 8, adapter_args: ["--max-message-mb", "2"])
    {_, args, _} = Snakepit.Launcher.GRPCPython.command(own, [])
    assert Enum.count(args, &(&1 == "--max-message-mb")) == 1

    assert_raise ArgumentError, ~r/:max_message_mb/, fn ->
      Config.new!(name: :p, max_message_mb: 0)
    end
  end

  describe "the deprecated :adapter_module key" do
    import ExUnit.CaptureLog

    test "still sets the launcher, with a deprecation warning" do
      log =
        capture_log(fn ->
          assert {:ok, c} = Config.new(name: :p, adapter_module: Snakepit.Adapters.GRPCPython)
          assert c.launcher == Snakepit.Adapters.GRPCPython
          assert Snakepit.Application.launcher_validate(c) == :ok
        end)

      assert log =~ ":adapter_module is deprecated; use :launcher"
    end

    test "cannot be set together with :launcher" do
      assert {:error, msg} =
               Config.new(
                 name: :p,
                 launcher: Snakepit.Launcher.GRPCPython,
                 adapter_module: Snakepit.Launcher.GRPCPython
               )

      assert msg =~ ":adapter_module"
    end
  end

  test "a launcher that does not implement Snakepit.Launcher is rejected naming :launcher" do
    assert {:error, msg} = Config.new(name: :p, launcher: NoSuchModule)
    assert msg =~ ":launcher"
  end

  defmodule RemoteLauncher do
    @moduledoc false
    # a launcher whose servers may run anywhere: it does not promise to pass --shm-dir
    @behaviour Snakepit.Launcher
    @impl true
    def command(_config, _opts), do: {"/bin/true", [], []}
  end

  describe "shared memory" do
    test "is on by default for the default launcher's local workers, off for other launchers" do
      c = Config.new!(name: :p)
      assert c.shm == true
      assert c.shm_min_bytes == 65_536
      assert c.shm_base_dir == if(File.dir?("/dev/shm"), do: "/dev/shm", else: System.tmp_dir!())
      assert Config.new!(name: :p, launcher: RemoteLauncher).shm == false
      assert Config.new!(name: :p, launcher: RemoteLauncher, shm: true).shm == true
      assert Config.new!(name: :p, shm: false).shm == false
    end

    test "invalid values name the key and say what is expected" do
      assert {:error, msg} = Config.new(name: :p, shm: "true")
      assert msg =~ ":shm: must be true or false"
      assert {:error, msg} = Config.new(name: :p, shm_min_bytes: 1.5)
      assert msg =~ ":shm_min_bytes: must be a positive integer (bytes)"
    end

    test "the launcher passes the pool's directory as --shm-dir, and none without one" do
      c = Config.new!(name: :p)
      {_, args, _} = Snakepit.Launcher.GRPCPython.command(c, shm_dir: "/dev/shm/snakepit-x")
      i = Enum.find_index(args, &(&1 == "--shm-dir"))
      assert Enum.at(args, i + 1) == "/dev/shm/snakepit-x"
      {_, args, _} = Snakepit.Launcher.GRPCPython.command(c, [])
      refute "--shm-dir" in args
    end
  end
end
