defmodule Snakepit.Test.RemoteServers do
  @moduledoc false
  # Python servers the test starts itself on loopback addresses (127.0.0.2, .3, ...: every
  # 127/8 address is loopback on Linux) for `worker_profile: :remote` pools, and a tiny DNS server
  # whose A records the test sets.

  @repo Path.expand("../../..", __DIR__)

  @doc """
  Starts `grpc_server_threaded.py` on `host` (or on a Unix socket: `"unix:/path"`; port 0: a free one, or `port`; `adapter`: a class of
  `snakepit_bridge` or of test/support's `pool_test_adapters`; `flags`: more server flags); returns
  `%{port_ref, os_pid, host, port, endpoint}` once its ready line came. It exits when the calling
  process does (--exit-on-stdin-eof on the Port's stdin).
  """
  def start_server(host, opts \\ []) do
    python = System.get_env("SNAKEPIT_PYTHON") || Path.join(@repo, ".venv/bin/python")
    port = Keyword.get(opts, :port, 0)

    listen =
      case host do
        "unix:" <> path -> ["--uds", path]
        _ -> ["--host", host, "--port", Integer.to_string(port)]
      end

    args =
      [Path.join(@repo, "grpc_server_threaded.py")] ++
        listen ++
        [
          "--max-workers",
          Integer.to_string(Keyword.get(opts, :max_workers, 4)),
          "--adapter",
          Keyword.get(
            opts,
            :adapter,
            "snakepit_bridge.adapters.threaded_showcase.ThreadedShowcaseAdapter"
          ),
          "--exit-on-stdin-eof",
          "--grace",
          "5"
        ] ++ Keyword.get(opts, :flags, [])

    port_ref =
      Port.open({:spawn_executable, python}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        {:line, 16_384},
        {:args, args},
        {:cd, @repo},
        # (test/support: the test adapters of pool_test_adapters.py)
        {:env, [{~c"PYTHONPATH", String.to_charlist(Path.expand(".", __DIR__))}]}
      ])

    await_ready(port_ref, host, System.monotonic_time(:millisecond) + 30_000)
  end

  defp await_ready(port_ref, host, deadline) do
    receive do
      {^port_ref, {:data, {:eol, "SNAKEPIT_READY " <> rest}}} ->
        kv = rest |> String.split(" ") |> Map.new(&List.to_tuple(String.split(&1, "=", parts: 2)))
        port = kv["port"] && String.to_integer(kv["port"])
        endpoint = if kv["uds"], do: "unix:" <> kv["uds"], else: "#{host}:#{port}"

        %{
          port_ref: port_ref,
          os_pid: String.to_integer(kv["pid"]),
          host: host,
          port: port,
          endpoint: endpoint
        }

      {^port_ref, {:data, _}} ->
        await_ready(port_ref, host, deadline)

      {^port_ref, {:exit_status, status}} ->
        raise "server on #{host} exited with #{status} before it was ready"
    after
      max(deadline - System.monotonic_time(:millisecond), 0) ->
        raise "server on #{host} not ready in 30 s"
    end
  end

  @doc """
  `start_server/2` in a process of its own that owns the server's Port until `stop/1` (or until
  the process that called this exits): the server then exits (its stdin closes).
  """
  def start_owned(host, opts \\ []) do
    caller = self()

    owner =
      spawn(fn ->
        ref = Process.monitor(caller)
        send(caller, {:remote_server, self(), start_server(host, opts)})

        receive do
          {:DOWN, ^ref, _, _, _} -> :ok
          :stop -> :ok
        end
      end)

    receive do
      {:remote_server, ^owner, server} -> Map.put(server, :owner, owner)
    after
      40_000 -> raise "server on #{host} not started"
    end
  end

  @doc "Stops a server of `start_owned/2` (its stdin closes: it drains and exits)."
  def stop(%{owner: owner}), do: send(owner, :stop)

  @doc "A TCP port free on every one of `hosts` (the same port on each, as DNS discovery needs)."
  def free_port(hosts) do
    {:ok, s} = :gen_tcp.listen(0, ip: ip(hd(hosts)), reuseaddr: true)
    {:ok, port} = :inet.port(s)
    :gen_tcp.close(s)

    if Enum.all?(hosts, &port_free?(&1, port)), do: port, else: free_port(hosts)
  end

  defp port_free?(host, port) do
    case :gen_tcp.listen(port, ip: ip(host), reuseaddr: true) do
      {:ok, s} -> :gen_tcp.close(s) == :ok
      _ -> false
    end
  end

  defp ip(host) do
    {:ok, ip} = :inet.parse_address(String.to_charlist(host))
    ip
  end

  @doc "Sends `signal` (\"KILL\", \"USR1\", ...) to a server."
  def signal(%{os_pid: os_pid}, signal),
    do: System.cmd("kill", ["-" <> signal, Integer.to_string(os_pid)], stderr_to_stdout: true)

  defmodule DNS do
    @moduledoc false
    # A DNS server on 127.0.0.1 (UDP, an ephemeral port) answering A queries for one name with the
    # addresses the test sets (`set/2`); AAAA and other names get an empty answer (NOERROR).
    use GenServer

    def start_link(name, addresses), do: GenServer.start_link(__MODULE__, {name, addresses})
    def port(pid), do: GenServer.call(pid, :port)
    def set(pid, addresses), do: GenServer.call(pid, {:set, addresses})

    @impl true
    def init({name, addresses}) do
      {:ok, socket} = :gen_udp.open(0, [:binary, ip: {127, 0, 0, 1}, active: true])
      {:ok, %{socket: socket, name: String.downcase(name), addresses: addresses}}
    end

    @impl true
    def handle_call(:port, _from, s), do: {:reply, elem(:inet.port(s.socket), 1), s}
    def handle_call({:set, addresses}, _from, s), do: {:reply, :ok, %{s | addresses: addresses}}

    @impl true
    def handle_info({:udp, socket, ip, port, packet}, s) do
      :gen_udp.send(socket, ip, port, answer(packet, s))
      {:noreply, s}
    end

    # header: id, flags, 1 question; the question echoed; one A record per address (name as a
    # pointer to the question's, offset 12)
    defp answer(<<id::16, _flags::16, 1::16, _an::16, _ns::16, _ar::16, rest::binary>>, s) do
      {labels, <<qtype::16, _qclass::16, _::binary>>} = read_name(rest, [])
      name_len = Enum.sum(Enum.map(labels, &(byte_size(&1) + 1))) + 1
      question = binary_part(rest, 0, name_len + 4)
      name = labels |> Enum.join(".") |> String.downcase()

      records =
        if qtype == 1 and name == s.name do
          for {a, b, c, d} <- s.addresses,
              do: <<0xC00C::16, 1::16, 1::16, 0::32, 4::16, a, b, c, d>>
        else
          []
        end

      <<id::16, 0x8180::16, 1::16, length(records)::16, 0::16, 0::16>> <>
        question <> IO.iodata_to_binary(records)
    end

    defp read_name(<<0, rest::binary>>, acc), do: {Enum.reverse(acc), rest}

    defp read_name(<<n, label::binary-size(n), rest::binary>>, acc),
      do: read_name(rest, [label | acc])
  end
end
