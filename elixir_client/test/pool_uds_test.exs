Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.PoolUDSTest do
  # Workers on Unix domain sockets (the default transport): where the sockets are, who may reach
  # them, and that none outlives its worker or its pool. Real Python workers.
  use ExUnit.Case, async: false
  import Snakepit.PoolHelpers

  alias Snakepit.Pool.SocketDir
  alias Snakepit.Worker

  @moduletag :slow
  @moduletag timeout: 120_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit)
    :ok
  end

  defp mode(path), do: Bitwise.band(File.lstat!(path).mode, 0o777)

  defp socket?(path), do: match?({:ok, %File.Stat{type: :other}}, File.lstat(path))

  test "workers listen on Unix sockets by default: execute, stream, batch and sessions work" do
    pool = start_pool!(pool_size: 2)
    workers = Snakepit.list_workers(pool)
    assert [%{uds: uds1, port: nil}, %{uds: uds2, port: nil}] = workers
    assert uds1 != uds2
    dir = Path.dirname(uds1)
    assert Path.dirname(uds2) == dir
    assert byte_size(uds1) <= 107

    # a private directory per pool; the sockets owner-only
    assert mode(dir) == 0o700
    for path <- [uds1, uds2], do: assert(socket?(path) and mode(path) == 0o600)

    assert {:ok, 5} = Snakepit.execute(pool, "add", %{a: 2, b: 3})

    assert [%{"step" => 1}, %{"step" => 2}, %{"step" => 3} | _] =
             Snakepit.execute_stream(pool, "progress", %{steps: 3}) |> Enum.to_list()

    assert {:ok, [{:ok, 3}, {:ok, 7}]} =
             Snakepit.execute_batch(pool, "add", [%{a: 1, b: 2}, %{a: 3, b: 4}])

    assert {:ok, 1} = Snakepit.execute_in_session(pool, "uds-session", "session_counter", %{})
    assert {:ok, 2} = Snakepit.execute_in_session(pool, "uds-session", "session_counter", %{})
  end

  test "stopping the pool removes its sockets and its directory" do
    pool = start_pool!(pool_size: 2)
    paths = Enum.map(Snakepit.list_workers(pool), & &1.uds)
    dir = Path.dirname(hd(paths))
    assert :ok = Snakepit.stop_pool(pool)
    refute File.exists?(dir)
    for path <- paths, do: refute(File.exists?(path) or File.exists?(path <> ".lock"))
  end

  test "a recycled worker's socket is gone once it exits; its replacement listens on a new one" do
    pool = start_pool!(pool_size: 1, worker_max_requests: 2, max_requests_jitter: 0)
    [old] = Snakepit.list_workers(pool)
    assert socket?(old.uds)

    for _ <- 1..2, do: assert({:ok, _} = Snakepit.execute(pool, "ping", %{}))

    [new] =
      eventually(fn ->
        match?([%{os_pid: p}] when p != old.os_pid, ready_workers(pool)) and ready_workers(pool)
      end)

    assert new.uds != old.uds
    assert socket?(new.uds) and mode(new.uds) == 0o600
    eventually(fn -> not os_alive?(old.os_pid) end)
    # the server removed them at its clean exit
    eventually(fn -> not File.exists?(old.uds) and not File.exists?(old.uds <> ".lock") end)
    assert {:ok, %{"pid" => pid}} = Snakepit.execute(pool, "ping", %{})
    assert pid == new.os_pid
  end

  test "a worker killed -9 is replaced on a fresh socket and the pool removes the stale one" do
    pool = start_pool!(pool_size: 1)
    [old] = Snakepit.list_workers(pool)
    kill9(old.os_pid)

    [new] =
      eventually(fn ->
        match?([%{os_pid: p}] when p != old.os_pid, ready_workers(pool)) and ready_workers(pool)
      end)

    assert new.uds != old.uds
    # the killed server could not clean up: the pool did, when its worker went
    refute File.exists?(old.uds)
    refute File.exists?(old.uds <> ".lock")
    assert {:ok, 5} = Snakepit.execute(pool, "add", %{a: 2, b: 3})
    assert {:ok, %{crashes: 1}} = Snakepit.get_stats(pool)
  end

  test "transport: :tcp workers listen on 127.0.0.1 and a port" do
    pool = start_pool!(pool_size: 1, transport: :tcp)
    assert [%{port: port, uds: nil}] = Snakepit.list_workers(pool)
    assert is_integer(port) and port > 0
    assert {:ok, 5} = Snakepit.execute(pool, "add", %{a: 2, b: 3})

    assert [%{"step" => 1} | _] =
             Snakepit.execute_stream(pool, "progress", %{steps: 2}) |> Enum.to_list()
  end

  test "the sockets go under $XDG_RUNTIME_DIR when it is usable, else the temporary directory" do
    xdg = Path.join(System.tmp_dir!(), "xdg-#{System.unique_integer([:positive])}")
    File.mkdir_p!(xdg)
    old = System.get_env("XDG_RUNTIME_DIR")

    try do
      System.put_env("XDG_RUNTIME_DIR", xdg)
      assert {:ok, ^xdg} = SocketDir.base()
      pool = start_pool!(pool_size: 1)
      [w] = Snakepit.list_workers(pool)
      assert Path.dirname(Path.dirname(w.uds)) == xdg
      assert {:ok, _} = Snakepit.execute(pool, "ping", %{})

      # too long for a socket path, or not a directory: the temporary directory
      long = Path.join(xdg, String.duplicate("d", 90))
      File.mkdir_p!(long)
      System.put_env("XDG_RUNTIME_DIR", long)
      assert {:ok, tmp} = SocketDir.base()
      assert tmp == System.tmp_dir!()
      System.put_env("XDG_RUNTIME_DIR", Path.join(xdg, "missing"))
      assert SocketDir.base() == {:ok, System.tmp_dir!()}
    after
      if old,
        do: System.put_env("XDG_RUNTIME_DIR", old),
        else: System.delete_env("XDG_RUNTIME_DIR")

      File.rm_rf!(xdg)
    end
  end

  test "a pool whose socket directory cannot hold a socket path fails to start saying why" do
    long = Path.join(System.tmp_dir!(), String.duplicate("t", 90))
    File.mkdir_p!(long)
    env = for var <- ["TMPDIR", "XDG_RUNTIME_DIR"], do: {var, System.get_env(var)}

    try do
      System.put_env("TMPDIR", long)
      System.delete_env("XDG_RUNTIME_DIR")

      assert {:error, %Snakepit.Error{reason: :worker_start_failed, message: message}} =
               Snakepit.start_pool(name: :uds_too_long, pool_size: 1)

      assert message =~ "107 bytes"
      assert message =~ "transport: :tcp"
      refute Snakepit.Pool.whereis(:uds_too_long)

      # TCP workers need no directory
      pool = start_pool!(pool_size: 1, transport: :tcp)
      assert {:ok, 5} = Snakepit.execute(pool, "add", %{a: 2, b: 3})
    after
      for {var, value} <- env,
          do: if(value, do: System.put_env(var, value), else: System.delete_env(var))

      File.rm_rf!(long)
    end
  end

  test "the sweep removes the socket directories of dead BEAMs only" do
    base = Path.join(System.tmp_dir!(), "sweep-#{System.unique_integer([:positive])}")
    File.mkdir_p!(base)
    on_exit(fn -> File.rm_rf!(base) end)
    uid = File.lstat!(base).uid

    # an OS pid that has just exited
    {out, 0} = System.cmd("sh", ["-c", "echo $$"])
    dead = String.trim(out)
    eventually(fn -> not File.exists?("/proc/#{dead}") end)

    dead_dir = Path.join(base, "snakepit-#{dead}-1")
    File.mkdir_p!(dead_dir)
    File.write!(Path.join(dead_dir, "w1.sock.lock"), "")
    own_dir = Path.join(base, "snakepit-#{System.pid()}-1")
    live_dir = Path.join(base, "snakepit-1-1")
    other = Path.join(base, "snakepit-notapid")
    for d <- [own_dir, live_dir, other], do: File.mkdir_p!(d)

    assert SocketDir.sweep(base, uid) == [dead_dir]
    refute File.exists?(dead_dir)
    for d <- [own_dir, live_dir, other], do: assert(File.dir?(d))

    # a dead pid's directory with a socket that still serves is someone else's (another pid
    # namespace): left alone
    File.mkdir_p!(dead_dir)
    path = Path.join(dead_dir, "w1.sock")
    {:ok, listener} = :gen_tcp.listen(0, [:binary, ifaddr: {:local, path}])
    assert SocketDir.sweep(base, uid) == []
    assert File.dir?(dead_dir)
    :gen_tcp.close(listener)
    assert SocketDir.sweep(base, uid) == [dead_dir]

    # another user's directory is not ours to remove
    File.mkdir_p!(dead_dir)
    assert SocketDir.sweep(base, uid + 1) == []
  end

  describe "the ready line" do
    @nonce "0123456789abcdef0123456789abcdef"

    test "names a Unix socket or a port, with the worker's nonce" do
      assert {:ok, {:uds, "/run/user/1/snakepit-1-2/w3.sock"}, 42} =
               Worker.parse_ready(
                 "SNAKEPIT_READY uds=/run/user/1/snakepit-1-2/w3.sock pid=42 nonce=#{@nonce}",
                 @nonce
               )

      assert {:ok, {:port, 50051}, 42} =
               Worker.parse_ready("SNAKEPIT_READY port=50051 pid=42 nonce=#{@nonce}", @nonce)
    end

    test "without the nonce, with a relative path or no endpoint, is not one" do
      for line <- [
            "SNAKEPIT_READY uds=/tmp/w1.sock pid=42",
            "SNAKEPIT_READY uds=/tmp/w1.sock pid=42 nonce=other",
            "SNAKEPIT_READY uds=w1.sock pid=42 nonce=#{@nonce}",
            "SNAKEPIT_READY port=0 pid=42 nonce=#{@nonce}",
            "SNAKEPIT_READY pid=42 nonce=#{@nonce}",
            "READY uds=/tmp/w1.sock pid=42 nonce=#{@nonce}"
          ] do
        assert Worker.parse_ready(line, @nonce) == :error, line
      end
    end
  end
end
