defmodule Snakepit.Worker do
  @moduledoc """
  One Python worker: a process that owns the OS process (through a `Port`) and one multiplexed
  `Snakepit.GRPC.Channel` to it.

  Lifecycle: the port is opened at init (the server gets `--uds <path>` when the pool gives the
  worker a socket path (option `:uds`), else `--port 0`; `--exit-on-stdin-eof`; and a fresh random
  nonce in the environment variable `SNAKEPIT_READY_NONCE`); the worker is ready once the server
  prints `SNAKEPIT_READY uds=<path> pid=<pid> nonce=<that nonce>` (or `port=<p>`), then it connects
  the channel to that socket (or `127.0.0.1:<p>`) and tells its pool
  `{:snakepit_worker_ready, worker_pid, info}` (`info`: channel, os_pid, and `port` or `uds`, the
  other nil). A ready line without the nonce
  (an adapter printing one during its setup) is only logged. It stops (and the pool is told
  through the link) when the Python process exits, when the channel goes down, when
  `startup_timeout` passes before readiness, or when its pool exits. When its server sends GOAWAY
  (it is shutting down on its own, e.g. SIGTERM from outside), the channel drains: the worker tells
  its pool `{:snakepit_worker_draining, worker_pid, {:goaway, code}}` (the pool routes no new call
  to it) and stops, as above, when the channel or the Python process ends after the last call. A worker that ends before it
  is ready exits with `{:shutdown, {:start_failed, message}}` or `{:shutdown, {:startup_timeout,
  message}}`; `message` ends with the server's last line of output (snakepit_bridge's `error: ...`,
  or the last line of a Python traceback).

  With `start_mode: :fork_server` the pool gives the worker its fork server (option `:fork_server`,
  a `Snakepit.Pool.ForkServer`): the worker asks it for a child (the launcher's `fork_child_args/2`
  and the nonce, in the spawn request) instead of opening a port, and gets that child's os pid,
  output lines (the ready line among them) and exit status from it; SIGTERM and SIGKILL go through
  it too. The child dies with the fork server, so this worker stops when the fork server does
  (`{:shutdown, {:fork_server_down, reason}}`, or a start failure naming the fork server's error).

  Because the port holds the server's stdin, the server exits when this process dies, and also when
  the whole BEAM dies, even by `kill -9` (the OS closes the pipe).

  Output: the server's stdout and stderr (merged) are logged at `:debug`, line by line, and the last
  lines are kept for the error report of a worker that fails. A line longer than 16384 bytes (a
  huge dump, a carriage-return progress bar that never ends its line) keeps its first 16384 bytes;
  the rest is dropped (logged as truncated), so no output can fill the BEAM.

  Calls do not go through this process: callers use the channel directly (see `Snakepit.Pool`).
  """

  use GenServer, restart: :temporary
  require Logger

  alias Snakepit.Pool.ForkServer
  alias Snakepit.PythonPort

  @log_lines 30
  # Longest line kept of the server's output; the Port delivers longer lines in chunks of this size.
  @max_line_bytes 16_384

  @doc false
  def start_link(opts), do: GenServer.start_link(__MODULE__, opts)

  @doc "Stops the worker gracefully: SIGTERM (the server drains in-flight calls), then waits."
  def stop_gracefully(pid), do: GenServer.cast(pid, :stop_gracefully)

  @doc "Worker facts: os pid, where its server listens (`listen_port` or `listen_uds`), status, channel."
  def info(pid), do: GenServer.call(pid, :info)

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    config = Keyword.fetch!(opts, :config)
    pool = Keyword.fetch!(opts, :pool)
    id = Keyword.fetch!(opts, :id)
    uds = Keyword.get(opts, :uds)

    listen_opts = if uds, do: [uds: uds], else: []
    {nonce, nonce_env} = Snakepit.Launcher.ready_nonce()
    Logger.metadata(pool: config.name, worker: id)

    base = %{
      id: id,
      pool: pool,
      config: config,
      port: nil,
      fork: nil,
      os_pid: nil,
      listen_port: nil,
      listen_uds: nil,
      channel: nil,
      status: :starting,
      started_at: System.monotonic_time(:millisecond),
      startup_timer: nil,
      ready_nonce: nonce,
      partial: "",
      dropped_bytes: 0,
      lines: [],
      kill_timer: nil
    }

    case Keyword.get(opts, :fork_server) do
      nil -> init_spawned(base, opts, listen_opts, nonce_env)
      server -> init_forked(base, server, listen_opts)
    end
  end

  # Its own Python process, a Port of this process.
  defp init_spawned(s, opts, listen_opts, nonce_env) do
    config = s.config
    {command_opts, pool_env} = Snakepit.Launcher.pool_options(config, opts)
    {exe, args, env} = config.launcher.command(config, command_opts ++ listen_opts)
    env = env ++ pool_env ++ [nonce_env]

    try do
      {port, os_pid} = PythonPort.open(exe, args, env, config.script_dir, @max_line_bytes)
      timer = Process.send_after(self(), :startup_timeout, config.startup_timeout)
      send(s.pool, {:snakepit_worker_spawned, self(), os_pid})

      Logger.debug(
        "snakepit worker #{s.id} spawned os pid #{os_pid}: #{exe} #{Enum.join(args, " ")}"
      )

      {:ok, %{s | port: port, os_pid: os_pid, startup_timer: timer}}
    rescue
      e -> {:stop, {:spawn_failed, Exception.message(e)}}
    end
  end

  # A child of the pool's fork server (start_mode: :fork_server): its output, os pid and exit come
  # as {:snakepit_fork_event, child_id, event} messages; the fork server's death is this child's.
  defp init_forked(s, server, listen_opts) do
    args = s.config.launcher.fork_child_args(s.config, listen_opts)

    case ForkServer.spawn_child(server, args, s.ready_nonce) do
      {:ok, child_id} ->
        Process.monitor(server)
        timer = Process.send_after(self(), :startup_timeout, s.config.startup_timeout)
        Logger.debug("snakepit worker #{s.id}: fork server child #{child_id} asked for")
        {:ok, %{s | fork: %{server: server, child: child_id}, startup_timer: timer}}

      {:error, message} ->
        {:stop, {:spawn_failed, message}}
    end
  end

  @impl true
  def handle_call(:info, _from, s) do
    {:reply,
     Map.take(s, [:id, :os_pid, :listen_port, :listen_uds, :channel, :status, :started_at]), s}
  end

  @impl true
  def handle_cast(:stop_gracefully, %{status: :stopping} = s), do: {:noreply, s}

  def handle_cast(:stop_gracefully, s) do
    if s.channel, do: safe_close(s.channel)
    signal(s, "TERM")
    timer = Process.send_after(self(), :kill_now, s.config.shutdown_grace + 2_000)
    {:noreply, %{s | status: :stopping, kill_timer: timer}}
  end

  @impl true
  def handle_info({port, {:data, {:noeol, chunk}}}, %{port: port} = s),
    do: {:noreply, append_partial(s, chunk)}

  def handle_info({port, {:data, {:eol, chunk}}}, %{port: port} = s) do
    s = append_partial(s, chunk)
    line = s.partial

    if s.dropped_bytes > 0,
      do:
        Logger.warning(
          "snakepit worker #{s.id} (os pid #{s.os_pid}): output line truncated to #{@max_line_bytes} bytes (#{s.dropped_bytes} bytes dropped)"
        )

    output_line(%{s | partial: "", dropped_bytes: 0}, line)
  end

  def handle_info({:snakepit_fork_event, child, event}, %{fork: %{child: child}} = s),
    do: fork_event(s, event)

  def handle_info({:DOWN, _ref, :process, server, reason}, %{fork: %{server: server}} = s),
    do: fork_server_down(s, reason)

  def handle_info({port, {:exit_status, status}}, %{port: port} = s),
    do: python_exited(%{s | port: nil}, status)

  def handle_info(:startup_timeout, %{status: :starting} = s) do
    tail = s.lines |> Enum.reverse() |> Enum.join("\n")

    Logger.error(
      "snakepit worker #{s.id} not ready after #{s.config.startup_timeout} ms\n#{tail}"
    )

    message =
      "worker #{s.id} (os pid #{s.os_pid}) printed no ready line within startup_timeout " <>
        "(#{s.config.startup_timeout} ms); last output: " <>
        (last_output_line(s.lines) || "none")

    {:stop, {:shutdown, {:startup_timeout, message}}, s}
  end

  def handle_info(:startup_timeout, s), do: {:noreply, s}

  def handle_info(:kill_now, s) do
    signal(s, "KILL")
    {:stop, :normal, s}
  end

  def handle_info({:EXIT, pid, reason}, %{pool: pid} = s), do: {:stop, reason, s}

  def handle_info({:EXIT, ch, reason}, %{channel: ch} = s) when ch != nil do
    case s.status do
      :stopping -> {:noreply, %{s | channel: nil}}
      _ -> {:stop, {:shutdown, {:channel_down, reason}}, %{s | channel: nil}}
    end
  end

  # The server sent GOAWAY (it is shutting down: SIGTERM from outside, ...): the channel lets the
  # calls on it finish and stops after the last one, and this worker with it. The pool takes it
  # out of rotation meanwhile.
  def handle_info({:snakepit_grpc_draining, ch, reason}, %{channel: ch, status: :ready} = s) do
    Logger.debug(
      "snakepit worker #{s.id} (os pid #{s.os_pid}): channel draining: #{inspect(reason)}"
    )

    send(s.pool, {:snakepit_worker_draining, self(), reason})
    {:noreply, %{s | status: :draining}}
  end

  def handle_info({:EXIT, _other, _reason}, s), do: {:noreply, s}
  def handle_info(_msg, s), do: {:noreply, s}

  @impl true
  def terminate(_reason, s) do
    if s.channel, do: safe_close(s.channel)

    if s.port do
      # Closing the port closes the server's stdin: --exit-on-stdin-eof makes it exit.
      try do
        Port.close(s.port)
      rescue
        _ -> :ok
      end

      signal(s, "TERM")
    end

    # (a forked child left running is stopped by the fork server, which monitors this process)
    :ok
  end

  # One line of the server's output: its ready line, or output kept for the error report.
  defp output_line(s, line) do
    cond do
      line == "" ->
        {:noreply, s}

      s.status == :starting and match?({:ok, _, _}, parse_ready(line, s.ready_nonce)) ->
        {:ok, endpoint, _pid} = parse_ready(line, s.ready_nonce)
        become_ready(s, endpoint)

      true ->
        Logger.debug("[python #{s.os_pid}] " <> line)
        {:noreply, %{s | lines: Enum.take([line | s.lines], @log_lines)}}
    end
  end

  defp fork_event(s, {:spawned, os_pid}) do
    send(s.pool, {:snakepit_worker_spawned, self(), os_pid})
    Logger.debug("snakepit worker #{s.id}: forked os pid #{os_pid}")
    {:noreply, %{s | os_pid: os_pid}}
  end

  defp fork_event(s, {stream, line}) when stream in [:out, :err] do
    # the fork server cuts a long line itself and says so at its end (its protocol)
    case Regex.run(~r/\.\.\.\((\d+) more bytes\)$/, line) do
      [_, dropped] ->
        Logger.warning(
          "snakepit worker #{s.id} (os pid #{s.os_pid}): output line truncated by the fork server (#{dropped} bytes dropped)"
        )

      nil ->
        :ok
    end

    output_line(s, line)
  end

  defp fork_event(s, {:exit, status}), do: python_exited(%{s | fork: nil}, status)

  defp fork_event(%{status: :starting} = s, {:error, message}) do
    message = "worker #{s.id}: the fork server cannot fork it: #{message}"
    {:stop, {:shutdown, {:start_failed, message}}, %{s | fork: nil}}
  end

  defp fork_event(s, {:error, _message}), do: {:noreply, s}

  # The fork server is gone, and its children with it (PDEATHSIG): so is this worker's server.
  defp fork_server_down(s, reason) do
    s = %{s | fork: nil}

    case {s.status, reason} do
      {:stopping, _} ->
        {:stop, :normal, s}

      {:starting, {:shutdown, {kind, message}}} when kind in [:start_failed, :startup_timeout] ->
        {:stop, {:shutdown, {kind, "worker #{s.id}: " <> message}}, s}

      {:starting, _} ->
        message =
          "worker #{s.id}: the fork server went down before it was ready: #{inspect(reason)}"

        {:stop, {:shutdown, {:start_failed, message}}, s}

      {other, _} ->
        Logger.warning(
          "snakepit worker #{s.id} (os pid #{s.os_pid}): the fork server went down while #{other}: #{inspect(reason)}"
        )

        {:stop, {:shutdown, {:fork_server_down, reason}}, s}
    end
  end

  # The server exited: a clean stop when asked, else a crash or a start failure.
  defp python_exited(s, status) do
    case s.status do
      :stopping ->
        {:stop, :normal, s}

      other ->
        tail = s.lines |> Enum.reverse() |> Enum.join("\n")

        Logger.warning(
          "snakepit worker #{s.id} (os pid #{s.os_pid}) exited with status #{status} while #{other}\n#{tail}"
        )

        if other == :starting do
          message =
            "worker #{s.id} (os pid #{s.os_pid}) exited with status #{status} before it was ready: " <>
              (last_output_line(s.lines) || "it printed nothing")

          {:stop, {:shutdown, {:start_failed, message}}, s}
        else
          {:stop, {:shutdown, {:python_exited, status}}, s}
        end
    end
  end

  defp become_ready(s, endpoint) do
    Process.cancel_timer(s.startup_timer)

    metadata =
      case s.config.auth_token do
        nil -> []
        tok -> [{"authorization", "Bearer " <> tok}]
      end

    {address, port, uds, where} =
      case endpoint do
        {:uds, path} -> {[host: {:local, path}], nil, path, "socket #{path}"}
        {:port, p} -> {[host: "127.0.0.1", port: p], p, nil, "port #{p}"}
      end

    max_message_size = s.config.max_message_mb * 1024 * 1024

    case Snakepit.GRPC.Channel.start_link(
           address ++ [metadata: metadata, max_message_size: max_message_size]
         ) do
      {:ok, ch} ->
        info = %{channel: ch, os_pid: s.os_pid, port: port, uds: uds}
        send(s.pool, {:snakepit_worker_ready, self(), info})
        ms = System.monotonic_time(:millisecond) - s.started_at
        Logger.debug("snakepit worker #{s.id} ready on #{where} in #{ms} ms")

        {:noreply, %{s | status: :ready, channel: ch, listen_port: port, listen_uds: uds}}

      {:error, reason} ->
        message =
          "worker #{s.id} (os pid #{s.os_pid}) cannot connect to its server on #{where}: " <>
            inspect(reason)

        {:stop, {:shutdown, {:start_failed, message}}, s}
    end
  end

  # The last non-blank line of output; of a carriage-return progress bar, its last state.
  defp last_output_line(lines) do
    Enum.find_value(lines, fn line ->
      line
      |> printable()
      |> String.split("\r")
      |> Enum.map(&String.trim/1)
      |> Enum.reverse()
      |> Enum.find(&(&1 != ""))
    end)
  end

  # Output is bytes: keep the valid UTF-8, replace the rest (a line cut inside a character).
  defp printable(bytes) do
    case :unicode.characters_to_binary(bytes) do
      text when is_binary(text) ->
        text

      {_, good, <<_bad, rest::binary>>} ->
        good <> "\uFFFD" <> printable(rest)

      {_, good, _} ->
        good
    end
  end

  # Keeps at most @max_line_bytes of the line being read; counts what it drops.
  defp append_partial(s, chunk) do
    room = @max_line_bytes - byte_size(s.partial)

    cond do
      byte_size(chunk) <= room ->
        %{s | partial: s.partial <> chunk}

      room > 0 ->
        kept = binary_part(chunk, 0, room)

        %{
          s
          | partial: s.partial <> kept,
            dropped_bytes: s.dropped_bytes + byte_size(chunk) - room
        }

      true ->
        %{s | dropped_bytes: s.dropped_bytes + byte_size(chunk)}
    end
  end

  @doc """
  Parses the server's ready line `SNAKEPIT_READY uds=<path> pid=<pid> nonce=<nonce>` or
  `SNAKEPIT_READY port=<port> pid=<pid> nonce=<nonce>`: `{:ok, {:uds, path} | {:port, port}, pid}`
  only when its nonce is `nonce` (the one this worker gave the server), else `:error`.
  """
  @spec parse_ready(String.t(), String.t()) ::
          {:ok, {:uds, Path.t()} | {:port, pos_integer}, pos_integer} | :error
  def parse_ready("SNAKEPIT_READY " <> rest, nonce) do
    kv =
      rest
      |> String.split(" ", trim: true)
      |> Enum.flat_map(fn pair ->
        case String.split(pair, "=", parts: 2) do
          [k, v] -> [{k, v}]
          _ -> []
        end
      end)
      |> Map.new()

    with true <- is_binary(nonce) and kv["nonce"] == nonce,
         {:ok, endpoint} <- ready_endpoint(kv),
         {pid, ""} <- Integer.parse(kv["pid"] || "") do
      {:ok, endpoint, pid}
    else
      _ -> :error
    end
  end

  def parse_ready(_line, _nonce), do: :error

  # A socket path is absolute (the server makes it so); a port is positive.
  defp ready_endpoint(%{"uds" => "/" <> _ = path}), do: {:ok, {:uds, path}}

  defp ready_endpoint(%{"port" => port}) do
    case Integer.parse(port) do
      {p, ""} when p > 0 -> {:ok, {:port, p}}
      _ -> :error
    end
  end

  defp ready_endpoint(_kv), do: :error

  # To the server: through the fork server for a forked one (it knows whether its child still runs).
  defp signal(%{fork: %{server: server, child: child}}, sig),
    do: ForkServer.signal_child(server, child, "SIG" <> sig)

  defp signal(%{os_pid: nil}, _sig), do: :ok

  defp signal(%{os_pid: os_pid}, sig) do
    System.cmd("kill", ["-" <> sig, Integer.to_string(os_pid)], stderr_to_stdout: true)
    :ok
  rescue
    _ -> :ok
  end

  defp safe_close(ch) do
    Snakepit.GRPC.Channel.close(ch)
  catch
    _, _ -> :ok
  end
end
