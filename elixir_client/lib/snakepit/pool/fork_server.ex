defmodule Snakepit.Pool.ForkServer do
  @moduledoc """
  The fork server of a `start_mode: :fork_server` pool: a process that owns the `Port` of one
  snakepit_bridge server started with `--fork-server` (the launcher's `fork_server_command/2`),
  which imports the server and the adapter's module once and forks a worker on request.

  Protocol (see `snakepit_bridge/server/forkserver.py`): the fork server prints
  `SNAKEPIT_FORKSERVER_READY pid=<pid> nonce=<n>` (the nonce this process put in
  `SNAKEPIT_READY_NONCE`) once its imports are done; requests on its stdin are
  `spawn <id> <json>` and `signal <id> <SIGNAME>`; events on its stdout are `<id> spawned <pid>`,
  `<id> out <line>`, `<id> err <line>`, `<id> exit <code | -signum>` and `error <id | -> <message>`.

  A `Snakepit.Worker` asks for a child with `spawn_child/3` and then receives that child's events
  as `{:snakepit_fork_event, child_id, event}` (`{:spawned, os_pid}`, `{:out, line}`,
  `{:err, line}`, `{:exit, status}`, `{:error, message}` when the fork failed). Spawn requests made
  before the fork server is ready wait here and are written once it is. Each child id is fresh
  (`w<n>`), so a late event can never reach a later worker.

  The port's stderr is merged into stdout (a `Port` cannot read it apart): the fork server's own
  logs, and whatever the adapter prints while it is imported, arrive between the events. A line is
  an event only when its first word is a child id this process gave out (or `error`); every other
  line is logged at `:debug` and kept for the error report of a fork server that fails to start.

  A worker that dies leaves its child to this process: the child gets SIGTERM, and SIGKILL when it
  is still alive `shutdown_grace + 2 s` later. This process stops when the fork server exits:
  `{:shutdown, {:start_failed, message}}` before it was ready, `{:shutdown, {:startup_timeout,
  message}}` when it is not ready within `startup_timeout`, `{:shutdown, {:fork_server_exited,
  status}}` after; every child dies with the fork server (PDEATHSIG), and each worker, which
  monitors this process, goes down with it. When this process stops, it sends the fork server
  SIGTERM (which stops every child: SIGTERM, then SIGKILL 2 s later) and waits for it to exit, so no
  Python process outlives a stopped pool. When the whole BEAM dies the fork server sees its stdin
  close and stops the same way.
  """

  use GenServer
  require Logger

  @log_lines 30
  # An event line is `<id> out ` plus at most 16 KiB of a child's line (and a "...(N more bytes)"
  # note); longer lines (fork server logs) keep this much.
  @max_line_bytes 32_768
  # The fork server's own stop: SIGTERM to its children, SIGKILL 2 s later, then it exits.
  @stop_wait_ms 5_000

  @type event ::
          {:spawned, pos_integer}
          | {:out, binary}
          | {:err, binary}
          | {:exit, integer}
          | {:error, String.t()}

  @doc """
  Starts the fork server of a pool (linked to the caller). `opts`: `:shm_dir`, as for a worker's
  command.
  """
  @spec start_link(Snakepit.Config.t(), keyword) :: GenServer.on_start()
  def start_link(config, opts \\ []), do: GenServer.start_link(__MODULE__, {config, opts})

  @doc """
  Asks for a child with the flags `args` (added to the fork server's) and the ready-line nonce
  `nonce`; the caller then receives the child's events. Returns the child's id.
  """
  @spec spawn_child(pid, [String.t()], String.t()) :: {:ok, String.t()} | {:error, String.t()}
  def spawn_child(server, args, nonce) do
    GenServer.call(server, {:spawn, self(), args, nonce})
  catch
    :exit, reason -> {:error, "the pool's fork server is not running: #{inspect(reason)}"}
  end

  @doc "Sends signal `name` (\"SIGTERM\", \"SIGKILL\") to a child, if it still runs."
  @spec signal_child(pid, String.t(), String.t()) :: :ok
  def signal_child(server, child_id, name), do: GenServer.cast(server, {:signal, child_id, name})

  @doc "The fork server's OS pid (nil when it could not be spawned)."
  @spec os_pid(pid) :: pos_integer | nil
  def os_pid(server), do: GenServer.call(server, :os_pid)

  @doc """
  Parses the fork server's ready line `SNAKEPIT_FORKSERVER_READY pid=<pid> nonce=<nonce>`:
  `{:ok, pid}` only when its nonce is `nonce`, else `:error`.
  """
  @spec parse_ready(String.t(), String.t()) :: {:ok, pos_integer} | :error
  def parse_ready("SNAKEPIT_FORKSERVER_READY " <> rest, nonce) do
    kv =
      for pair <- String.split(rest, " ", trim: true),
          [k, v] <- [String.split(pair, "=", parts: 2)],
          into: %{},
          do: {k, v}

    with true <- kv["nonce"] == nonce,
         {pid, ""} when pid > 0 <- Integer.parse(kv["pid"] || "") do
      {:ok, pid}
    else
      _ -> :error
    end
  end

  def parse_ready(_line, _nonce), do: :error

  @doc """
  Parses one line of the fork server's output into `{:event, child_id, event}`,
  `{:error, child_id | nil, message}` or `:other` (not an event: a log line). `known?` says
  whether a word is one of our child ids.
  """
  @spec parse_event(binary, (binary -> boolean)) ::
          {:event, String.t(), event} | {:error, String.t() | nil, String.t()} | :other
  def parse_event("error " <> rest, known?) do
    case String.split(rest, " ", parts: 2) do
      ["-", message] -> {:error, nil, message}
      [id, message] -> if known?.(id), do: {:error, id, message}, else: :other
      _ -> :other
    end
  end

  def parse_event(line, known?) do
    with [id, kind | rest] <- String.split(line, " ", parts: 3),
         true <- known?.(id),
         {:ok, event} <- event(kind, Enum.at(rest, 0, "")) do
      {:event, id, event}
    else
      _ -> :other
    end
  end

  defp event("out", text), do: {:ok, {:out, text}}
  defp event("err", text), do: {:ok, {:err, text}}

  defp event("spawned", pid) do
    case Integer.parse(pid) do
      {n, ""} when n > 0 -> {:ok, {:spawned, n}}
      _ -> :error
    end
  end

  defp event("exit", code) do
    case Integer.parse(code) do
      {n, ""} -> {:ok, {:exit, n}}
      _ -> :error
    end
  end

  defp event(_kind, _text), do: :error

  @doc "The `spawn` request line for a child (the JSON of its flags and nonce)."
  @spec spawn_request(String.t(), [String.t()], String.t()) :: iodata
  def spawn_request(child_id, args, nonce) do
    json = [
      "{\"args\":[",
      Enum.map_intersperse(args, ",", &json_string/1),
      "],\"nonce\":",
      json_string(nonce),
      "}"
    ]

    ["spawn ", child_id, " ", json, "\n"]
  end

  # JSON strings of the flags: quotes, backslashes and control characters escaped.
  defp json_string(s) do
    escaped =
      for <<c <- s>>, into: "" do
        case c do
          ?" -> "\\\""
          ?\\ -> "\\\\"
          c when c < 0x20 -> "\\u" <> String.pad_leading(Integer.to_string(c, 16), 4, "0")
          c -> <<c>>
        end
      end

    ["\"", escaped, "\""]
  end

  ## server

  @impl true
  def init({config, opts}) do
    Process.flag(:trap_exit, true)

    {command_opts, pool_env} = Snakepit.Launcher.pool_options(config, opts)
    {exe, args, env} = config.launcher.fork_server_command(config, command_opts)
    {nonce, nonce_env} = Snakepit.Launcher.ready_nonce()
    env = env ++ pool_env ++ [nonce_env]
    Logger.metadata(pool: config.name, fork_server: true)

    try do
      {port, os_pid} =
        Snakepit.PythonPort.open(exe, args, env, config.script_dir, @max_line_bytes)

      timer = Process.send_after(self(), :startup_timeout, config.startup_timeout)

      Logger.debug(
        "snakepit fork server spawned os pid #{os_pid}: #{exe} #{Enum.join(args, " ")}"
      )

      {:ok,
       %{
         config: config,
         port: port,
         os_pid: os_pid,
         status: :starting,
         ready_nonce: nonce,
         startup_timer: timer,
         started_at: System.monotonic_time(:millisecond),
         # child id => %{worker: pid | nil, monitor: ref | nil}
         children: %{},
         # requests written once the fork server is ready, oldest first
         pending: [],
         next_child: 1,
         partial: "",
         lines: []
       }}
    rescue
      e ->
        {:stop,
         {:shutdown, {:start_failed, "cannot spawn the fork server: #{Exception.message(e)}"}}}
    end
  end

  @impl true
  def handle_call({:spawn, worker, args, nonce}, _from, s) do
    child_id = "w#{s.next_child}"
    monitor = Process.monitor(worker)
    children = Map.put(s.children, child_id, %{worker: worker, monitor: monitor})
    s = %{s | children: children, next_child: s.next_child + 1}
    {:reply, {:ok, child_id}, request(s, spawn_request(child_id, args, nonce))}
  end

  def handle_call(:os_pid, _from, s), do: {:reply, s.os_pid, s}

  @impl true
  def handle_cast({:signal, child_id, name}, s) do
    if Map.has_key?(s.children, child_id),
      do: {:noreply, request(s, ["signal ", child_id, " ", name, "\n"])},
      else: {:noreply, s}
  end

  @impl true
  def handle_info({port, {:data, {:noeol, chunk}}}, %{port: port} = s),
    do: {:noreply, %{s | partial: keep(s.partial, chunk)}}

  def handle_info({port, {:data, {:eol, chunk}}}, %{port: port} = s) do
    line = keep(s.partial, chunk)
    {:noreply, handle_line(%{s | partial: ""}, line)}
  end

  # A request written to a fork server that just died closes the port (EPIPE) before its
  # exit_status comes: the same death, its status unknown.
  def handle_info({:EXIT, port, reason}, %{port: port} = s) do
    kill(s.os_pid, "KILL")
    fork_server_exited(%{s | port: nil}, "unknown (its port closed: #{inspect(reason)})")
  end

  def handle_info({port, {:exit_status, status}}, %{port: port} = s),
    do: fork_server_exited(%{s | port: nil}, status)

  def handle_info(:startup_timeout, %{status: :starting} = s) do
    message =
      "the fork server (os pid #{s.os_pid}) printed no ready line within startup_timeout " <>
        "(#{s.config.startup_timeout} ms); last output: " <> (List.first(s.lines) || "none")

    Logger.error("snakepit " <> message)
    {:stop, {:shutdown, {:startup_timeout, message}}, s}
  end

  def handle_info(:startup_timeout, s), do: {:noreply, s}

  # A worker went away: its child is ours to stop (SIGTERM now, SIGKILL after the grace period).
  def handle_info({:DOWN, ref, :process, _pid, _reason}, s) do
    case Enum.find(s.children, fn {_id, c} -> c.monitor == ref end) do
      nil ->
        {:noreply, s}

      {child_id, _} ->
        Process.send_after(self(), {:kill_child, child_id}, s.config.shutdown_grace + 2_000)
        s = %{s | children: Map.put(s.children, child_id, %{worker: nil, monitor: nil})}
        {:noreply, request(s, ["signal ", child_id, " SIGTERM\n"])}
    end
  end

  def handle_info({:kill_child, child_id}, s) do
    case s.children[child_id] do
      %{worker: nil} -> {:noreply, request(s, ["signal ", child_id, " SIGKILL\n"])}
      _ -> {:noreply, s}
    end
  end

  def handle_info(_msg, s), do: {:noreply, s}

  @impl true
  def terminate(_reason, %{port: port} = s) when port != nil do
    # SIGTERM stops the fork server and every child (SIGKILL 2 s later); waiting for its exit means
    # that when the pool is gone, so are its Python processes.
    kill(s.os_pid, "TERM")

    receive do
      {^port, {:exit_status, _}} -> :ok
    after
      @stop_wait_ms -> kill(s.os_pid, "KILL")
    end

    try do
      Port.close(port)
    rescue
      _ -> :ok
    end

    :ok
  end

  def terminate(_reason, _s), do: :ok

  defp fork_server_exited(s, status) do
    tail = s.lines |> Enum.reverse() |> Enum.join("\n")

    case s.status do
      :starting ->
        message =
          "the fork server (os pid #{s.os_pid}) exited with status #{status} before it was ready: " <>
            (List.first(s.lines) || "it printed nothing")

        Logger.warning("snakepit " <> message <> "\n" <> tail)
        {:stop, {:shutdown, {:start_failed, message}}, s}

      :ready ->
        Logger.warning(
          "snakepit fork server (os pid #{s.os_pid}) exited with status #{status}; " <>
            "its #{map_size(s.children)} workers are gone\n#{tail}"
        )

        {:stop, {:shutdown, {:fork_server_exited, status}}, s}
    end
  end

  ## the lines

  defp handle_line(%{status: :starting} = s, line) do
    case parse_ready(line, s.ready_nonce) do
      {:ok, _pid} ->
        Process.cancel_timer(s.startup_timer)
        ms = System.monotonic_time(:millisecond) - s.started_at
        Logger.debug("snakepit fork server (os pid #{s.os_pid}) ready in #{ms} ms")
        s = %{s | status: :ready}
        Enum.reduce(s.pending, %{s | pending: []}, &request(&2, &1))

      :error ->
        other_line(s, line)
    end
  end

  defp handle_line(s, line) do
    case parse_event(line, &Map.has_key?(s.children, &1)) do
      {:event, child_id, {:exit, _} = event} ->
        {child, children} = Map.pop(s.children, child_id)
        if child.monitor, do: Process.demonitor(child.monitor, [:flush])
        forward(child, child_id, event)
        %{s | children: children}

      {:event, child_id, event} ->
        forward(s.children[child_id], child_id, event)
        s

      # A spawn that failed (no child, no exit event follows) or a signal that did.
      {:error, child_id, message} when child_id != nil ->
        Logger.warning("snakepit fork server: #{child_id}: #{message}")
        forward(s.children[child_id], child_id, {:error, message})
        s

      {:error, nil, message} ->
        Logger.warning("snakepit fork server: #{message}")
        s

      :other ->
        other_line(s, line)
    end
  end

  defp other_line(s, ""), do: s

  defp other_line(s, line) do
    Logger.debug("[python fork server #{s.os_pid}] " <> line)
    %{s | lines: Enum.take([line | s.lines], @log_lines)}
  end

  defp forward(%{worker: pid}, child_id, event) when is_pid(pid),
    do: send(pid, {:snakepit_fork_event, child_id, event})

  defp forward(_child, _child_id, _event), do: :ok

  defp request(%{status: :starting} = s, line), do: %{s | pending: s.pending ++ [line]}
  defp request(%{port: nil} = s, _line), do: s

  # (a port whose process just exited is closed before its exit_status message is handled here)
  defp request(s, line) do
    Port.command(s.port, line)
    s
  rescue
    ArgumentError -> s
  end

  defp keep(partial, chunk) do
    room = @max_line_bytes - byte_size(partial)

    if byte_size(chunk) <= room,
      do: partial <> chunk,
      else: partial <> binary_part(chunk, 0, max(room, 0))
  end

  defp kill(os_pid, sig) do
    System.cmd("kill", ["-" <> sig, Integer.to_string(os_pid)], stderr_to_stdout: true)
    :ok
  rescue
    _ -> :ok
  end
end
