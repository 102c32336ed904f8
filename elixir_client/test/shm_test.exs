Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.ShmTest do
  # Shared-memory regions between a pool and its local workers (Snakepit.Shm): large bytes and
  # arrays go both ways as files in the pool's private directory, and none is left behind,
  # whatever happens to the call, its worker, its caller or the BEAM.
  use ExUnit.Case, async: false
  import ExUnit.CaptureLog
  require Logger
  import Snakepit.PoolHelpers

  alias Snakepit.{Error, NDArray, Proto}

  @moduletag timeout: 120_000
  # regions from 1 KiB: the tests' arrays need not be large
  @min_bytes 1024

  defp shm_pool!(extra \\ %{}) do
    start_pool!(
      test_adapter("SharedMemoryAdapter")
      |> Map.merge(%{
        worker_profile: :thread,
        pool_size: 1,
        threads_per_worker: 4,
        shm_min_bytes: @min_bytes
      })
      |> Map.merge(extra)
    )
  end

  defp dir(pool), do: Snakepit.Pool.shm(pool).dir
  defp regions(pool), do: File.ls!(dir(pool))

  defp random_array(dtype, shape) do
    n = NDArray.size(shape) * NDArray.itemsize(dtype)
    %NDArray{data: :crypto.strong_rand_bytes(n), dtype: dtype, shape: shape}
  end

  # `fun`'s result and the files this process read meanwhile (the caller reads result regions)
  defp files_read(fun) do
    me = self()
    collector = spawn_link(fn -> collect_reads([]) end)
    :erlang.trace(me, true, [:call, {:tracer, collector}])
    :erlang.trace_pattern({File, :read, 1}, true, [:local])

    result =
      try do
        fun.()
      after
        :erlang.trace(me, false, [:call])
        :erlang.trace_pattern({File, :read, 1}, false, [:local])
      end

    ref = :erlang.trace_delivered(me)
    assert_receive {:trace_delivered, ^me, ^ref}
    send(collector, {:reads, me})
    assert_receive {:reads, paths}
    {result, paths}
  end

  defp collect_reads(acc) do
    receive do
      {:trace, _pid, :call, {File, :read, [path]}} -> collect_reads([path | acc])
      {:reads, to} -> send(to, {:reads, Enum.reverse(acc)})
    end
  end

  defp result_regions_read(paths, pool),
    do: Enum.count(paths, &(Path.dirname(&1) == dir(pool)))

  # The server's count of tool calls running (its GetStats): 0 once an abandoned tool has ended
  # (and written whatever result regions it wrote).
  defp server_calls_active(pool) do
    {:ok, %{workers: [worker]}} = Snakepit.get_stats(pool)
    worker.python.requests_active
  end

  # A call that holds its arguments `seconds` in a process of its own; returns once its argument
  # region is in the pool's directory.
  defp holding_call(pool, seconds, opts \\ []) do
    test = self()
    x = {:bytes, :binary.copy(<<7>>, 100_000)}

    pid =
      spawn(fn ->
        send(test, {:held, Snakepit.execute(pool, "hold", %{x: x, seconds: seconds}, opts)})
      end)

    eventually(fn -> regions(pool) != [] end)
    pid
  end

  describe "a pool of local workers" do
    test "uses shared memory by default: its workers get --shm-dir, Ping reports it" do
      pool = start_pool!(worker_profile: :thread, pool_size: 1, threads_per_worker: 2)
      shm = Snakepit.Pool.shm(pool)
      assert %Snakepit.Shm{min_bytes: 65_536} = shm
      assert String.starts_with?(shm.dir, "/dev/shm/snakepit-#{System.pid()}-")
      assert %File.Stat{type: :directory, access: :read_write, mode: mode} = File.stat!(shm.dir)
      assert Bitwise.band(mode, 0o777) == 0o700
      assert {:ok, %{shm_dir: dir}} = Snakepit.get_stats(pool)
      assert dir == shm.dir

      [worker] = Snakepit.list_workers(pool)

      {:ok, bin, _} =
        Snakepit.GRPC.Channel.unary(
          worker.channel,
          "/snakepit.bridge.BridgeService/Ping",
          Proto.encode(:ping_request, %{message: "hi"}),
          timeout: 5_000
        )

      assert {:ok, %{shm_dir: ^dir}} = Proto.decode(:ping_response, bin)
    end

    test "of process workers passes regions both ways too" do
      pool = shm_pool!(%{worker_profile: :process})
      nd = random_array("<f8", [10_000])
      assert {:ok, %{"mapped" => true}} = Snakepit.execute(pool, "array_origin", %{x: nd})
      {result, reads} = files_read(fn -> Snakepit.execute(pool, "echo", %{x: nd}) end)
      assert {:ok, %{"x" => ^nd}} = result
      assert result_regions_read(reads, pool) == 1
      assert regions(pool) == []
    end

    test "deletes its directory when it stops" do
      pool = shm_pool!()
      dir = dir(pool)
      holder = holding_call(pool, 30)
      on_exit(fn -> Process.exit(holder, :kill) end)

      :ok = Snakepit.stop_pool(pool, grace: 0)
      refute File.exists?(dir)
    end

    test "at start deletes the directories of gone BEAMs of its pid namespace, no other" do
      {:ok, link} = File.read_link("/proc/self/ns/pid")
      [_, ns] = Regex.run(~r/\[(\d+)\]/, link)
      # no process has a pid above pid_max
      gone = "99999999"
      hex = fn -> Base.encode16(:crypto.strong_rand_bytes(8), case: :lower) end
      make = fn name -> Path.join("/dev/shm", name) |> tap(&File.mkdir!/1) end
      gone_here = make.("snakepit-#{gone}-1-#{ns}-old-#{hex.()}-#{hex.()}")
      gone_elsewhere = make.("snakepit-#{gone}-1-#{ns}1-old-#{hex.()}-#{hex.()}")
      File.write!(Path.join(gone_here, "region"), "x")
      on_exit(fn -> Enum.each([gone_here, gone_elsewhere], &File.rm_rf!/1) end)

      shm_pool!()
      refute File.exists?(gone_here)
      # another container's BEAM, sharing this tmpfs: its pid means nothing here
      assert File.dir?(gone_elsewhere)
    end

    test "killed and restarted by its supervisor, deletes the directory of its earlier run" do
      pool = shm_pool!()
      old_pid = Snakepit.Pool.whereis(pool)
      old_dir = dir(pool)
      Process.exit(old_pid, :kill)

      eventually(fn ->
        pid = Snakepit.Pool.whereis(pool)
        pid != nil and pid != old_pid and Snakepit.Pool.shm(pool) != nil
      end)

      refute File.exists?(old_dir)
      assert dir(pool) != old_dir
      assert File.dir?(dir(pool))
    end

    test "with shm: false sends everything inline and has no directory" do
      pool = shm_pool!(%{shm: false})
      assert Snakepit.Pool.shm(pool) == nil
      assert {:ok, %{shm_dir: nil}} = Snakepit.get_stats(pool)

      nd = random_array("<f8", [10_000])
      assert {:ok, %{"mapped" => false}} = Snakepit.execute(pool, "array_origin", %{x: nd})

      {{:ok, %{"x" => back}}, reads} =
        files_read(fn -> Snakepit.execute(pool, "echo", %{x: nd}) end)

      assert back == nd
      assert reads == []
    end

    test "on a file system that is not a tmpfs still works, and says so in its log" do
      # the build directory is on a disk, not a tmpfs
      base = Path.join(Mix.Project.build_path(), "shm_base_#{System.unique_integer([:positive])}")
      File.mkdir_p!(base)
      on_exit(fn -> File.rm_rf!(base) end)

      log =
        capture_log(fn ->
          pool = shm_pool!(%{shm_base_dir: base})
          send(self(), {:pool, pool})
        end)

      assert_received {:pool, pool}
      assert log =~ "#{base} is not a tmpfs"
      assert Path.dirname(dir(pool)) == base
      nd = random_array("<f8", [10_000])
      assert {:ok, %{"mapped" => true}} = Snakepit.execute(pool, "array_origin", %{x: nd})
      assert {:ok, %{"x" => ^nd}} = Snakepit.execute(pool, "echo", %{x: nd})
      assert regions(pool) == []
    end
  end

  describe "round trips through regions" do
    setup do
      %{pool: shm_pool!()}
    end

    test "arrays of several dtypes and shapes come back exactly, both ways through regions",
         %{pool: pool} do
      arrays = [
        random_array("<f8", [20_000]),
        random_array("<i4", [20, 30, 40]),
        random_array("<c16", [64, 3]),
        random_array("|u1", [4096]),
        random_array("<u2", [2, 2, 2, 512]),
        random_array("<f4", [1, 1024])
      ]

      for nd <- arrays do
        assert {:ok, %{"mapped" => true}} = Snakepit.execute(pool, "array_origin", %{x: nd})
        {result, reads} = files_read(fn -> Snakepit.execute(pool, "echo", %{x: nd}) end)
        assert {:ok, %{"x" => ^nd}} = result
        assert result_regions_read(reads, pool) == 1
      end

      assert regions(pool) == []
    end

    test "bytes come back exactly; strings and small values stay inline", %{pool: pool} do
      big = :crypto.strong_rand_bytes(300_000)
      text = String.duplicate("é", 10_000)
      small = %NDArray{data: <<1.5::float-little-64>>, dtype: "<f8", shape: []}

      args = %{
        b: {:bytes, big},
        raw: <<255, 0>> <> big,
        text: text,
        small: small,
        tiny: {:bytes, "abc"}
      }

      {result, reads} = files_read(fn -> Snakepit.execute(pool, "echo", args) end)
      assert {:ok, back} = result
      assert back["b"] == big
      assert back["raw"] == <<255, 0>> <> big
      assert back["text"] == text
      assert back["small"] == small
      assert back["tiny"] == "abc"
      # b and raw went to regions and came back in regions; the string and the small ones inline
      assert result_regions_read(reads, pool) == 2

      assert {:ok, %{"mapped" => false}} = Snakepit.execute(pool, "array_origin", %{x: small})

      assert {:ok, %{"b" => {:bytes, ^big}}} =
               Snakepit.execute(pool, "echo", %{b: {:bytes, big}}, bytes: :tagged)

      assert regions(pool) == []
    end

    test "a big-endian array is sent as it is and comes back little-endian with equal values",
         %{pool: pool} do
      values = Enum.map(1..2_000, &(&1 / 4))
      nd = NDArray.from_list(values, ">f8")
      assert {:ok, %{"x" => back}} = Snakepit.execute(pool, "echo", %{x: nd})
      assert back.dtype == "<f8"
      assert NDArray.to_flat_list(back) == values
    end

    test "stream chunks come through regions, with a callback and lazily", %{pool: pool} do
      args = %{count: 3, n: 1_000}
      test = self()

      {result, reads} =
        files_read(fn ->
          Snakepit.execute_stream(pool, "array_chunks", args, &send(test, {:chunk, &1}))
        end)

      assert result == {:ok, "done"}
      assert result_regions_read(reads, pool) == 3

      for index <- 0..2 do
        assert_received {:chunk, %NDArray{shape: [1_000]} = nd}
        assert NDArray.to_flat_list(nd) == List.duplicate(index * 1.0, 1_000)
      end

      chunks = pool |> Snakepit.execute_stream("array_chunks", args) |> Enum.to_list()
      assert Enum.map(chunks, &hd(NDArray.to_flat_list(&1))) == [0.0, 1.0, 2.0]
      assert regions(pool) == []
    end

    test "a stream halted early leaves no region once its tool has ended", %{pool: pool} do
      [first] =
        pool |> Snakepit.execute_stream("array_chunks", %{count: 50, n: 1_000}) |> Enum.take(1)

      assert hd(NDArray.to_flat_list(first)) == 0.0
      eventually(fn -> server_calls_active(pool) == 0 end)
      eventually(fn -> regions(pool) == [] end)
    end

    test "batch items take and return regions", %{pool: pool} do
      items = for i <- 1..4, do: %{x: random_array("<f8", [1_000 * i])}
      {result, reads} = files_read(fn -> Snakepit.execute_batch(pool, "echo", items) end)
      assert {:ok, results} = result
      assert results == Enum.map(items, fn %{x: x} -> {:ok, %{"x" => x}} end)
      assert result_regions_read(reads, pool) == 4
      assert regions(pool) == []

      mixed = [%{x: random_array("<f8", [1_000])}, %{x: random_array("<f8", [1_000]), y: 1}]

      assert {:ok, [{:ok, _}, {:error, %Error{reason: :invalid_argument}}]} =
               Snakepit.execute_batch(pool, "array_origin", mixed)

      assert regions(pool) == []
    end
  end

  describe "nothing is left behind" do
    setup do
      %{pool: shm_pool!(%{health_check_interval: 300})}
    end

    test "when the tool fails after its argument regions were written", %{pool: pool} do
      x = random_array("<f8", [10_000])
      assert {:error, %Error{reason: :tool_error}} = Snakepit.execute(pool, "fail_with", %{x: x})
      assert regions(pool) == []
    end

    test "when the result cannot be encoded after a result region was written", %{pool: pool} do
      assert {:error, %Error{}} = Snakepit.execute(pool, "big_then_unencodable", %{n: 10_000})
      assert regions(pool) == []
    end

    test "when a stream fails after a chunk came through a region", %{pool: pool} do
      test = self()

      assert {:error, %Error{reason: :tool_error}} =
               Snakepit.execute_stream(pool, "array_then_fail", %{n: 10_000}, &send(test, &1))

      assert_received %NDArray{shape: [10_000]}
      assert regions(pool) == []
    end

    test "when the arguments cannot be encoded", %{pool: pool} do
      args = %{x: random_array("<f8", [10_000]), bad: self()}
      assert {:error, %Error{reason: :invalid_argument}} = Snakepit.execute(pool, "echo", args)
      assert regions(pool) == []
    end

    test "when the worker is killed with SIGKILL during the call", %{pool: pool} do
      [worker] = Snakepit.list_workers(pool)
      holding_call(pool, 30)
      kill9(worker.os_pid)

      assert_receive {:held, {:error, %Error{reason: :worker_crashed}}}, 10_000
      assert regions(pool) == []
    end

    test "when the call times out and its tool writes its result later", %{pool: pool} do
      holding_call(pool, 1.0, timeout: 300)
      assert_receive {:held, {:error, %Error{reason: :timeout}}}, 5_000
      # the tool returns its argument, a region, after its caller gave up
      eventually(fn -> server_calls_active(pool) == 0 end)
      eventually(fn -> regions(pool) == [] end)
    end

    test "when the caller is killed during the call", %{pool: pool} do
      caller = holding_call(pool, 1.0)
      Process.exit(caller, :kill)
      # its argument region at once, the result its tool writes later once the tool has ended
      eventually(fn -> regions(pool) == [] end)
      eventually(fn -> server_calls_active(pool) == 0 end)
      eventually(fn -> regions(pool) == [] end)

      assert {:ok, %{"x" => _}} =
               Snakepit.execute(pool, "echo", %{x: random_array("<f8", [10_000])})
    end
  end

  describe "a BEAM killed with SIGKILL" do
    @describetag :slow

    test "leaves a directory that the next pool to start deletes, and only that one" do
      live = shm_pool!()

      ebins =
        [Application.app_dir(:snakepit, "ebin")] ++
          (:code.get_path()
           |> Enum.map(&to_string/1)
           |> Enum.filter(&String.contains?(&1, "jiffy")))

      %{python_adapter: adapter, adapter_env: env} = test_adapter("SharedMemoryAdapter")

      script = """
      # should this test fail before its kill -9, the child halts when the test's port closes its stdin
      spawn(fn -> IO.read(:stdio, :line); System.halt(0) end)
      {:ok, _} = Application.ensure_all_started(:snakepit)
      {:ok, _} = Snakepit.start_pool(name: :doomed, worker_profile: :thread, pool_size: 1,
        threads_per_worker: 2, python_adapter: #{inspect(adapter)}, adapter_env: #{inspect(env)})
      dir = Snakepit.Pool.shm(:doomed).dir
      [%{os_pid: py}] = Snakepit.list_workers(:doomed)
      spawn(fn -> Snakepit.execute(:doomed, "hold", %{x: {:bytes, :binary.copy(<<1>>, 100_000)}, seconds: 60}) end)
      Stream.repeatedly(fn -> Process.sleep(10); File.ls!(dir) end) |> Enum.find(&(&1 != []))
      IO.puts("SHM_DIR " <> dir <> " " <> System.pid() <> " " <> Integer.to_string(py))
      Process.sleep(:infinity)
      """

      args = Enum.flat_map(ebins, &["-pa", &1]) ++ ["-e", script]

      port =
        Port.open({:spawn_executable, System.find_executable("elixir")}, [
          :binary,
          :exit_status,
          :stderr_to_stdout,
          {:line, 4096},
          args: args
        ])

      {dead_dir, beam_pid, python_pid} =
        read_child(port, System.monotonic_time(:millisecond) + 60_000)

      on_exit(fn -> Enum.each([beam_pid, python_pid], &kill9/1) end)

      kill9(beam_pid)
      eventually(fn -> not os_alive?(beam_pid) end)
      assert [_region] = File.ls!(dead_dir)

      # the sweep is logged at :info, below the tests' level
      level = Logger.level()
      Logger.configure(level: :info)
      on_exit(fn -> Logger.configure(level: level) end)
      log = capture_log([level: :info], fn -> shm_pool!() end)
      refute File.exists?(dead_dir)
      assert log =~ Path.basename(dead_dir)
      # a pool of a BEAM that lives keeps its directory
      assert File.dir?(dir(live))
    end

    defp read_child(port, deadline) do
      receive do
        {^port, {:data, {:eol, "SHM_DIR " <> rest}}} ->
          [dir, beam, python] = String.split(rest, " ")
          {dir, String.to_integer(beam), String.to_integer(python)}

        {^port, {:data, _}} ->
          read_child(port, deadline)

        {^port, {:exit_status, status}} ->
          flunk("child BEAM exited with #{status}")
      after
        max(deadline - System.monotonic_time(:millisecond), 0) ->
          flunk("child BEAM did not report its shared-memory directory")
      end
    end
  end
end
