defmodule Snakepit.Pool do
  @moduledoc """
  A pool of Python workers and the capacity bookkeeping that dispatches calls to them.

  The pool process never does I/O for a call. A caller checks out a *slot* (`checkout/3`): the pool
  picks the least-loaded ready worker that has a free slot (a process worker has
  `process_pipeline_depth`, a thread worker `threads_per_worker`) and answers with the worker's
  channel; the caller runs the gRPC call in its own process over that channel (one HTTP/2
  connection per worker, many concurrent streams) and checks the slot back in (`checkin/3`). The
  pool monitors every caller holding or waiting for a slot, so a caller that dies frees its slot.

  When every slot is busy, callers wait FIFO, up to `queue_size` of them (more get `:queue_full`),
  each for at most `queue_timeout` ms (then `:queue_timeout`). While the pool has never had a ready
  worker (start-up), a waiter may wait up to `startup_timeout` instead.

  ## Pipelining on process workers

  A process worker's server runs one tool call at a time and queues the others (its `--max-queue`).
  With one slot per process worker, the worker would idle while a reply travels back and the next
  request comes; with `process_pipeline_depth: 2` (the default) the pool gives it a second call,
  which waits in the server's queue and starts as soon as the first ends. Least-loaded first: a
  call goes to an idle worker before it is pipelined behind a busy one. The price: a pipelined call
  waits for the call ahead of it, however long that takes, even when another worker becomes idle
  meanwhile (its `timeout:` includes that wait). Pools of long or uneven calls, or callers that
  need the lowest latency over throughput, should set `process_pipeline_depth: 1`. A process
  worker with a call its caller gave up on that may still be running gets no call behind it
  (see "Stuck calls").

  ## Workers and slots

  The pool keeps `pool_size` worker *slots*. A worker that crashes or fails to start is replaced
  after an exponential backoff (100 ms doubling up to `restart_backoff_max`, reset when a worker of
  that slot becomes ready).

  ## Unix sockets

  With `transport: :uds` (the default) each worker's server listens on a Unix domain socket
  instead of a TCP port (`--uds`): no port to find or to collide on, and only this OS user can
  connect. The pool makes a private directory (mode 0700, `Snakepit.Pool.SocketDir`) under
  `$XDG_RUNTIME_DIR`, or the temporary directory, named after the BEAM's OS pid; worker `id`
  listens on `w<id>.sock` in it (mode 0600, made so by the server), a new name per spawn, so a
  replacement never contends for the lock of the worker it replaces. The server removes its socket
  when it exits cleanly; when a worker goes away the pool removes what is left (a `kill -9`ed
  server's socket and `.lock` file), and the directory when the pool stops. At start it removes the
  directories of BEAMs that are gone. `list_workers/1` shows each worker's `uds` (or, with
  `transport: :tcp`, its `port`). A pool whose directory cannot be made fails to start with
  `:worker_start_failed` saying why.

  ## Start failures

  A worker that exits before it is ready (its adapter fails to import, `setup()` raises, Python lacks
  grpc), cannot be spawned, or passes `startup_timeout` is a *start failure*: the pool keeps its error
  (`:worker_start_failed`, or `:startup_timeout`, with the server's last line of output, e.g.
  `error: cannot import adapter module ...`) until a worker becomes ready. While it has that error and
  no ready worker, queued callers, new callers and `await_ready/3` get it at once instead of waiting
  for `queue_timeout` / `startup_timeout`; restarts with backoff go on.

  ## Recycling

  A worker is recycled when its TTL passes (each worker's TTL is shortened by a random fraction of at
  most `ttl_jitter`, so workers started together do not recycle together) or when it has been given
  its `worker_max_requests` calls (each worker's limit is lowered likewise by up to
  `max_requests_jitter`). Its replacement is started first. On TTL the old worker keeps serving
  until the replacement is ready; on max requests it takes no new call at once when another worker
  has a free slot for it. When none has (`pool_size: 1`, every other worker busy under load, or
  recycling, starting or out of rotation) it keeps serving, past its limit, until its replacement
  is ready (each call it takes past its limit asks again), so a recycle never leaves the pool
  without a worker and takes no capacity from a loaded one. A worker may thus serve more calls
  than its limit: as many as arrive while its replacement starts (tens of ms with the default
  `start_mode: :fork_server`). Either way, once it takes no new calls, its in-flight
  calls finish and it is stopped gracefully (SIGTERM, the server drains). No call fails because of a
  recycle.

  ## Workers whose server shuts down

  A server that shuts down on its own (SIGTERM from outside the pool) sends GOAWAY and drains: the
  calls it runs finish, it takes no new one. Its worker then leaves rotation (status
  `:server_draining`: no new call, session or queued caller goes to it), the calls on it finish
  normally, and once it exits (after its last call) it is replaced like a worker that went down.

  ## Sick workers

  A worker whose Python process lives but does not serve is replaced like a recycled one
  (replacement first, then the old one is stopped; SIGKILL when SIGTERM does not end it):

    * **Stuck calls.** A call its caller gave up on (deadline passed, caller died, stream cancelled;
      checked in as `:abandoned`) may still run in the server: a tool that ignores cancellation
      keeps its server slot. Such a call keeps its slot in the pool too (a process worker with one
      takes no call, not even a pipelined one) until the server's `GetStats.requests_active`, compared with the calls the pool
      knows to be running there, shows it ended. One still running `stuck_call_grace` ms after it was
      given up is *stuck*; at `max_stuck_calls` stuck calls (or when every slot is stuck) the worker
      is replaced; its other calls finish normally, except when stuck calls hold every slot of its
      server (a process worker's one): the calls waiting behind them there cannot run, so it is
      stopped once its replacement is ready and they fail with `:worker_unhealthy`.
    * **Health checks.** Every `health_check_interval` ms each ready worker gets a
      `grpc.health.v1.Health/Check` on its channel. One that gets no SERVING answer within
      `health_check_timeout` (a SIGSTOPped or wedged server), like a stuck-call check without an
      answer, marks the worker unhealthy: it takes no new call, its replacement starts, and it is
      stopped once the replacement is ready (or at once when it has no call in flight). Calls still
      on it then fail with `:worker_unhealthy` and a message that says so.

  ## Stopping

  `drain/2` (what `Snakepit.stop_pool/2` calls) stops the pool taking calls: queued callers, new
  callers and `await_ready/3` callers get `:pool_stopped` at once. Calls in flight get a grace period
  (`shutdown_grace` unless given) to finish; then every worker is stopped, and a call still running
  fails with `:pool_stopped` (its message names the grace period), not `:worker_crashed`.

  ## Shared memory

  A pool with `shm: true` (the default for the default launcher) has a private directory for
  shared-memory regions (`Snakepit.Shm`), passed to each worker as `--shm-dir` and deleted when
  the pool stops; callers find it with `shm/1`. A checkout names the prefixes of its call's
  regions (`:regions`): when the caller dies during the call, the pool deletes them, and when a
  call was abandoned (caller gone, deadline passed, stream cancelled) while its tool may still
  write results, the pool deletes them again once the worker's server no longer runs it (see
  "Stuck calls") or the worker is gone.

  ## Why a worker went away

  Before the pool stops a worker on purpose while calls may still run on it, it records why (its
  *fate*: `{reason, message}`) in a public ETS table named by the lease; a caller whose call then
  fails on that worker's channel reports that reason (`worker_fate/1`).

  ## Sessions

  `session_id`s are pinned to the worker that first served them while it lives and serves; the
  checkout tells the caller when the session must be initialised on its worker (first use there).
  Until the call that initialises it there is checked in, the session's other calls wait (a call
  that skips the initialisation could otherwise reach the server before it). When that worker goes
  away, the session's next call goes to any worker and is initialised there.
  A call whose initialisation fails is checked in as `{:session_init_failed, session_id}`: the
  session then counts as not created on that worker.

  ## Remote workers

  With `worker_profile: :remote` the workers are Python servers the pool did not start, at
  `endpoints` and/or found by `discovery` (`Snakepit.Remote.Discovery`): one slot per endpoint,
  and for each a `Snakepit.Remote.Connection` instead of a `Snakepit.Worker` (connect, then
  Health/Watch SERVING = ready). Everything above holds, with these differences: an endpoint
  that turns NOT_SERVING leaves rotation (`:not_serving`) until SERVING again; DNS adds slots
  (`{:add_slot, slot}`) and removes them (`{:remove_slot, slot}`: the slot's connection drains and
  is not replaced); a failed connection is retried after a jittered backoff
  (`Snakepit.Remote.Backoff`); the TTL is `max_connection_age` (a new connection is made first, as
  for a recycled worker); there is no max-requests recycling, no Unix-socket directory and no
  shared memory; the pool picks by outstanding calls weighted by each endpoint's capacity. See the
  README, "Remote workers".

  ## Structure

  Every decision above is `Snakepit.Pool.State`, a pure state machine (events in, actions out).
  This process is its shell: it turns messages into events and performs the actions (worker
  processes, monitors, timers, replies, health checks, the fates table, logs, the worker events of
  `Snakepit.Telemetry`).
  """

  use GenServer
  require Logger

  alias Snakepit.{Config, Error, Shm, Worker}
  alias Snakepit.Pool.{ForkServer, SocketDir, State}
  alias Snakepit.Remote.{Connection, Discovery, Endpoint}
  alias Snakepit.Worker.Health

  ## client API

  @doc false
  def child_spec(config) do
    %{
      id: {__MODULE__, config.name},
      start: {__MODULE__, :start_link, [config]},
      type: :worker,
      shutdown: 15_000
    }
  end

  @doc "Starts a pool from a validated `Snakepit.Config`."
  def start_link(%Config{} = config) do
    GenServer.start_link(__MODULE__, config, name: via(config.name))
  end

  @doc false
  def via(name), do: {:via, Registry, {Snakepit.Registry, name}}

  @doc "The pid of a running pool, or nil."
  def whereis(pid) when is_pid(pid), do: pid

  def whereis(name) do
    case Registry.lookup(Snakepit.Registry, name) do
      [{pid, _}] -> pid
      [] -> nil
    end
  end

  # `:worker_exit_wait` (ms) overrides how long a call whose connection was lost waits for the
  # worker to exit (`Snakepit.CallEngine`; 2 s when absent); the pool leaves it out.
  @type lease :: %{
          optional(:worker_exit_wait) => pos_integer,
          ref: reference,
          pool: pid,
          worker: pid,
          worker_id: pos_integer,
          channel: pid,
          init_session: boolean,
          call_timeout: pos_integer,
          pool_name: atom,
          os_pid: pos_integer | nil,
          port: pos_integer | nil,
          uds: Path.t() | nil,
          queued: boolean,
          fates: :ets.tid()
        }

  @doc """
  Checks out one call slot. Options: `:session_id` (pin to the session's worker), `:weight` (how
  many tool calls the server will count for this one, e.g. the items of a batch; default 1),
  `:create_session` (default true; false for a call that only reads an existing session: the
  pool then does not count the session as created on the worker, and the lease's
  `init_session` says the worker does not know it), `:regions` (the prefixes of the call's
  shared-memory regions, `Snakepit.Shm.prefixes/1`: see "Shared memory"), `:queue` (default true;
  false: `:pool_saturated` at once instead of waiting when no slot is free, see `Snakepit.Cluster`).
  Returns `{:ok, lease}` or `{:error, %Snakepit.Error{}}` (`:queue_full`, `:queue_timeout`,
  `:pool_not_found`, `:unavailable`, `:pool_stopped`, `:worker_start_failed`, `:startup_timeout`).
  """
  @spec checkout(atom | pid, keyword) :: {:ok, lease} | {:error, Error.t()}
  def checkout(pool, opts \\ []) do
    case whereis(pool) do
      nil ->
        {:error, Error.new(:pool_not_found, "no snakepit pool named #{inspect(pool)}")}

      pid ->
        try do
          request = %{
            session_id: Keyword.get(opts, :session_id),
            weight: Keyword.get(opts, :weight, 1),
            create_session: Keyword.get(opts, :create_session, true),
            regions: Keyword.get(opts, :regions, []),
            queue: Keyword.get(opts, :queue, true)
          }

          GenServer.call(pid, {:checkout, self(), request}, :infinity)
        catch
          :exit, reason ->
            {:error,
             Error.new(:unavailable, "pool #{inspect(pool)} is not running: #{inspect(reason)}")}
        end
    end
  end

  @doc """
  Returns a slot. `outcome` is `:ok`, `:error` (the server ended the call), `:abandoned` (the caller
  gave up before the server ended it: deadline, cancellation; the server may still be running it,
  see "Stuck calls") or `{:session_init_failed, session_id}`.
  """
  @spec checkin(lease, :ok | :error | :abandoned | {:session_init_failed, String.t()}) :: :ok
  def checkin(%{pool: pool, ref: ref}, outcome) do
    GenServer.cast(pool, {:checkin, ref, outcome})
  end

  @doc """
  Waits until the pool has at least `min` ready workers (default: all `pool_size`). Returns
  `{:error, %Snakepit.Error{}}` (`:worker_start_failed`, `:startup_timeout`) as soon as a worker
  fails to start while fewer are ready.
  """
  @spec await_ready(atom | pid, timeout, pos_integer | :all) ::
          :ok | {:error, :timeout | :pool_not_found | Error.t()}
  def await_ready(pool, timeout \\ 30_000, min \\ :all) do
    case whereis(pool) do
      nil -> {:error, :pool_not_found}
      pid -> GenServer.call(pid, {:await_ready, min}, timeout)
    end
  catch
    :exit, {:timeout, _} -> {:error, :timeout}
  end

  @doc """
  Stops taking calls and waits for the calls in flight, at most `grace` ms (default: the pool's
  `shutdown_grace`), then stops every worker and returns `:ok` once they are gone. See "Stopping".
  The pool process itself is left to its supervisor to stop.
  """
  @spec drain(atom | pid, non_neg_integer | nil) :: :ok | {:error, :pool_not_found}
  def drain(pool, grace \\ nil) do
    case whereis(pool) do
      # bounded by the pool: it answers at the latest grace + shutdown_grace + 5 s after the call
      pid when is_pid(pid) -> GenServer.call(pid, {:drain, grace}, :infinity)
      nil -> {:error, :pool_not_found}
    end
  catch
    :exit, _ -> {:error, :pool_not_found}
  end

  @doc """
  Why the pool stopped the lease's worker on purpose, as `{reason, message}`, or nil (it did not, or
  the pool is gone).
  """
  @spec worker_fate(lease) :: {atom, String.t()} | nil
  def worker_fate(%{fates: fates, worker: wpid}) do
    case :ets.lookup(fates, wpid) do
      [{^wpid, reason, message}] -> {reason, message}
      [] -> nil
    end
  rescue
    ArgumentError -> nil
  end

  @doc "Whether the pool (a name or pid) is a running `worker_profile: :remote` pool."
  @spec remote?(atom | pid) :: boolean
  def remote?(pool) when is_pid(pool) do
    case Registry.keys(Snakepit.Registry, pool) do
      [name] -> remote?(name)
      _ -> false
    end
  end

  def remote?(name) do
    match?([{_pid, %{remote: true}}], Registry.lookup(Snakepit.Registry, name))
  end

  @doc """
  The pool's shared memory (`%Snakepit.Shm{dir, min_bytes}`), or nil: the pool has `shm: false`,
  could not make its directory, or is not running.
  """
  @spec shm(atom | pid) :: Snakepit.Shm.t() | nil
  def shm(pool) when is_pid(pool) do
    case Registry.keys(Snakepit.Registry, pool) do
      [name] -> shm(name)
      _ -> nil
    end
  end

  def shm(name) do
    case Registry.lookup(Snakepit.Registry, name) do
      [{_pid, %{shm: shm}}] -> shm
      _ -> nil
    end
  end

  @doc """
  Pool counters and worker table (no Python calls); `fork_server_os_pid`: the OS pid of the pool's
  fork server (`start_mode: :fork_server`), nil when it has none running.
  """
  def stats(pool),
    do: GenServer.call(whereis(pool) || raise(ArgumentError, "no pool #{inspect(pool)}"), :stats)

  @doc "Forgets a session's worker pinning; returns the worker channel it was on, if any."
  def forget_session(pool, session_id),
    do: GenServer.call(whereis(pool), {:forget_session, session_id})

  ## server

  # The shell's state: the machine, and what it needs to perform actions. `pids` maps worker ids to
  # pids (kept until the worker's fate is forgotten), `ids` the other way; `timers` holds the
  # cancellable timers by their event; `socket_dir` is the directory of the workers' Unix sockets
  # (nil for a TCP pool); `shm`: the pool's Snakepit.Shm, or nil.
  # `fork_server`: the pool's Snakepit.Pool.ForkServer with start_mode: :fork_server, started when a
  # worker is to start and there is none (at start-up, and after the last one went down).
  defstruct [
    :pool,
    :config,
    :fates,
    :socket_dir,
    :shm,
    :fork_server,
    :fork_server_os_pid,
    :discovery,
    pids: %{},
    ids: %{},
    timers: %{},
    # a remote pool's endpoints by slot, and the slots DNS discovery found (the others are static)
    endpoints: %{},
    discovered: MapSet.new(),
    next_slot: 1
  ]

  @impl true
  def init(config) do
    Process.flag(:trap_exit, true)
    Logger.metadata(pool: config.name)
    :ok = Snakepit.Cluster.join(config)

    case socket_dir(config) do
      {:ok, dir} ->
        shell = %__MODULE__{
          config: config,
          socket_dir: dir,
          fates: :ets.new(:snakepit_worker_fates, [:set, :public, read_concurrency: true]),
          shm: open_shm(config)
        }

        if config.worker_profile == :remote do
          Registry.update_value(Snakepit.Registry, config.name, fn _ -> %{remote: true} end)
          dns_name = with {:dns, name, _, _} <- config.discovery, do: name

          for warning <- Endpoint.plaintext_warnings(config.endpoints, dns_name, config.tls),
              do: Logger.warning("snakepit pool #{inspect(config.name)}: " <> warning)
        end

        endpoints = config.endpoints |> Enum.with_index(1) |> Map.new(fn {e, i} -> {i, e} end)
        shell = %{shell | endpoints: endpoints, next_slot: map_size(endpoints) + 1}
        {pool, actions} = State.new(config, now())
        {:ok, shell |> Map.put(:pool, pool) |> perform(actions) |> start_discovery()}

      {:error, message} ->
        {:stop, Error.new(:worker_start_failed, "pool #{inspect(config.name)}: #{message}")}
    end
  end

  defp socket_dir(%{worker_profile: :remote}), do: {:ok, nil}
  defp socket_dir(%{transport: :uds}), do: SocketDir.create()
  defp socket_dir(%{transport: :tcp}), do: {:ok, nil}

  @impl true
  def handle_call({:checkout, caller, request}, from, shell),
    do: {:noreply, apply_event(shell, {:checkout, Process.monitor(caller), from, request})}

  def handle_call({:await_ready, min}, from, shell),
    do: {:noreply, apply_event(shell, {:await_ready, from, min})}

  def handle_call({:drain, grace}, from, shell) do
    :ok = Snakepit.Cluster.leave(shell.config)
    {:noreply, apply_event(shell, {:drain, from, grace})}
  end

  def handle_call({:forget_session, sid}, from, shell),
    do: {:noreply, apply_event(shell, {:forget_session, from, sid})}

  def handle_call(:stats, _from, shell) do
    stats = State.stats(shell.pool, now())
    workers = Enum.map(stats.workers, &Map.put(&1, :pid, shell.pids[&1.id]))

    extra = %{
      workers: workers,
      shm_dir: shell.shm && shell.shm.dir,
      fork_server_os_pid: shell.fork_server_os_pid
    }

    {:reply, Map.merge(stats, extra), shell}
  end

  @impl true
  def handle_cast({:checkin, ref, outcome}, shell),
    do: {:noreply, apply_event(shell, {:checkin, ref, outcome})}

  @impl true
  def handle_info({:snakepit_worker_ready, wpid, info}, shell),
    do: {:noreply, worker_event(shell, wpid, &{:worker_ready, &1, info})}

  def handle_info({:snakepit_worker_draining, wpid, _reason}, shell),
    do: {:noreply, worker_event(shell, wpid, &{:worker_draining, &1})}

  def handle_info({:snakepit_worker_serving, wpid, serving?}, shell),
    do: {:noreply, worker_event(shell, wpid, &{:worker_serving, &1, serving?})}

  def handle_info({:snakepit_discovered, pid, result}, %{discovery: pid} = shell),
    do: {:noreply, discovered(shell, result)}

  def handle_info({:EXIT, pid, reason}, %{discovery: pid} = shell) do
    Logger.error(
      "snakepit pool #{inspect(shell.config.name)}: its DNS discovery went down (#{inspect(reason)}); restarting it"
    )

    {:noreply, start_discovery(%{shell | discovery: nil})}
  end

  def handle_info({:snakepit_worker_spawned, wpid, os_pid}, shell),
    do: {:noreply, worker_event(shell, wpid, &{:worker_spawned, &1, os_pid})}

  # Its workers monitor it and go down with it (their servers die with it): their restarts, with
  # backoff, start the next fork server.
  def handle_info({:EXIT, fork_server, reason}, %{fork_server: fork_server} = shell) do
    Logger.warning(
      "snakepit pool #{inspect(shell.config.name)}: its fork server went down: #{inspect(reason)}"
    )

    {:noreply, %{shell | fork_server: nil, fork_server_os_pid: nil}}
  end

  # (not a worker of ours, e.g. one whose init failed: its start failure was an event already)
  def handle_info({:EXIT, wpid, reason}, shell) do
    remove_socket(shell, shell.ids[wpid])
    {:noreply, worker_event(shell, wpid, &{:worker_exited, &1, reason})}
  end

  def handle_info({:DOWN, ref, :process, _pid, _reason}, shell),
    do: {:noreply, apply_event(shell, {:caller_down, ref})}

  def handle_info({:pool_event, event}, shell), do: {:noreply, apply_event(shell, event)}

  def handle_info({:pool_timer, event}, shell) do
    shell = %{shell | timers: Map.delete(shell.timers, event)}
    {:noreply, apply_event(shell, event)}
  end

  def handle_info(_msg, shell), do: {:noreply, shell}

  @impl true
  def terminate(_reason, shell) do
    shell = apply_event(shell, :terminating)
    pids = for id <- State.worker_ids(shell.pool), pid = shell.pids[id], do: pid

    for pid <- pids, do: Process.exit(pid, :shutdown)

    for pid <- pids do
      receive do
        {:EXIT, ^pid, _} -> :ok
      after
        5_000 -> Process.exit(pid, :kill)
      end
    end

    # (after the workers: it stops the children still running and waits for them)
    if shell.fork_server, do: stop_fork_server(shell.fork_server)

    Shm.remove_dir(shell.shm)
    if shell.socket_dir, do: SocketDir.remove(shell.socket_dir)
    :ok
  end

  @doc "Restart delay (ms) after the `failures`-th consecutive failure of a slot: 100, 200, 400, ... up to `max`."
  @spec backoff(pos_integer, pos_integer) :: pos_integer
  defdelegate backoff(failures, max), to: State

  ## the shell

  defp now, do: System.monotonic_time(:millisecond)

  # The pool's shared-memory directory, registered for its callers (Pool.shm/1). A pool that
  # cannot make one works inline.
  defp open_shm(%{shm: false}), do: nil

  defp open_shm(config) do
    case Shm.open_pool_dir(config.name, config.shm_base_dir, config.shm_min_bytes) do
      {:ok, shm} ->
        {_, _} = Registry.update_value(Snakepit.Registry, config.name, fn _ -> %{shm: shm} end)
        shm

      {:error, message} ->
        Logger.warning(
          "snakepit pool #{inspect(config.name)}: no shared memory, every blob goes inline: #{message}"
        )

        nil
    end
  end

  # What a worker's server left of its socket: nothing after a clean exit (it removes its own),
  # the socket and its lock file after a kill -9.
  defp remove_socket(%{socket_dir: nil}, _id), do: :ok
  defp remove_socket(_shell, nil), do: :ok
  defp remove_socket(shell, id), do: SocketDir.remove_socket(shell.socket_dir, id)

  defp apply_event(shell, event) do
    {pool, actions} = State.handle(shell.pool, event, now())
    perform(%{shell | pool: pool}, actions)
  end

  defp worker_event(shell, wpid, event) do
    case shell.ids[wpid] do
      nil -> shell
      id -> apply_event(shell, event.(id))
    end
  end

  defp perform(shell, actions), do: Enum.reduce(actions, shell, &perform_one(&2, &1))

  defp perform_one(shell, {:reply, from, reply}) do
    GenServer.reply(from, reply)
    shell
  end

  defp perform_one(shell, {:lease, from, lease}) do
    lease =
      Map.merge(lease, %{pool: self(), worker: shell.pids[lease.worker_id], fates: shell.fates})

    GenServer.reply(from, {:ok, lease})
    shell
  end

  defp perform_one(shell, {:demonitor, ref}) do
    Process.demonitor(ref, [:flush])
    shell
  end

  defp perform_one(%{config: %{worker_profile: :remote}} = shell, {:start_worker, id}) do
    endpoint = shell.endpoints[State.worker_slot(shell.pool, id)]

    case Connection.start_link(config: shell.config, pool: self(), id: id, endpoint: endpoint) do
      {:ok, pid} ->
        %{shell | pids: Map.put(shell.pids, id, pid), ids: Map.put(shell.ids, pid, id)}

      {:error, reason} ->
        apply_event(shell, {:worker_spawn_failed, id, reason})
    end
  end

  defp perform_one(shell, {:start_worker, id}) do
    shm_dir = shell.shm && shell.shm.dir
    uds = shell.socket_dir && SocketDir.socket_path(shell.socket_dir, id)

    with {:ok, shell} <- ensure_fork_server(shell),
         opts = [config: shell.config, pool: self(), id: id, shm_dir: shm_dir, uds: uds],
         {:ok, pid} <- Worker.start_link([fork_server: shell.fork_server] ++ opts) do
      %{shell | pids: Map.put(shell.pids, id, pid), ids: Map.put(shell.ids, pid, id)}
    else
      {:error, reason} -> apply_event(shell, {:worker_spawn_failed, id, reason})
    end
  end

  defp perform_one(shell, {:stop_worker, id}) do
    Worker.stop_gracefully(shell.pids[id])
    shell
  end

  defp perform_one(shell, {:schedule, delay, event}) do
    Process.send_after(self(), {:pool_event, event}, delay)
    shell
  end

  defp perform_one(shell, {:timer, delay, event}) do
    timer = Process.send_after(self(), {:pool_timer, event}, delay)
    %{shell | timers: Map.put(shell.timers, event, timer)}
  end

  defp perform_one(shell, {:cancel_timer, event}) do
    case Map.pop(shell.timers, event) do
      {nil, _} ->
        shell

      {timer, timers} ->
        Process.cancel_timer(timer)
        %{shell | timers: timers}
    end
  end

  # Asked from a short-lived process: the pool never waits on a server.
  defp perform_one(shell, {:check, id, ref, kind, channel, timeout}) do
    pool = self()

    spawn(fn ->
      result =
        case kind do
          :health -> Health.check(channel, timeout)
          :active_calls -> Health.active_calls(channel, timeout)
        end

      send(pool, {:pool_event, {:check_result, id, ref, result}})
    end)

    shell
  end

  defp perform_one(shell, {:record_fate, id, reason, message}) do
    :ets.insert(shell.fates, {shell.pids[id], reason, message})
    shell
  end

  defp perform_one(shell, {:forget_fate, id}) do
    {pid, pids} = Map.pop(shell.pids, id)
    :ets.delete(shell.fates, pid)
    %{shell | pids: pids, ids: Map.delete(shell.ids, pid)}
  end

  # (in a process of its own: the pool does no file I/O)
  defp perform_one(%{shm: %Shm{dir: dir}} = shell, {:delete_regions, prefixes}) do
    spawn(fn -> Shm.delete_prefixes(dir, prefixes) end)
    shell
  end

  defp perform_one(shell, {:delete_regions, _prefixes}), do: shell

  defp perform_one(shell, {:log, level, message}) do
    Logger.log(level, message)
    shell
  end

  defp perform_one(shell, {:telemetry, event, measurements, metadata}) do
    Snakepit.Telemetry.execute(
      event,
      Map.put(measurements, :system_time, System.system_time()),
      Map.put(metadata, :worker_pid, shell.pids[metadata.worker])
    )

    shell
  end

  # DNS discovery: the endpoints it finds now become slots at once (so start_pool/2 awaits them),
  # then a Discovery process resolves again every resolve_interval.
  defp start_discovery(%{config: %{discovery: nil}} = shell), do: shell

  defp start_discovery(%{config: config} = shell) do
    shell =
      if shell.discovery == nil and MapSet.size(shell.discovered) == 0,
        do: discovered(shell, first_resolution(config.discovery)),
        else: shell

    {:ok, pid} = Discovery.start_link(self(), config.discovery, config.resolve_interval)
    %{shell | discovery: pid}
  end

  # Bounded, so that a resolver that does not answer cannot hold the pool's start past its
  # start_link timeout: the Discovery process tries again after resolve_interval.
  @first_resolution_ms 3_000

  defp first_resolution(spec) do
    task = Task.async(fn -> Discovery.resolve(spec) end)

    case Task.yield(task, @first_resolution_ms) || Task.shutdown(task, :brutal_kill) do
      {:ok, result} -> result
      _ -> {:error, "no answer within #{@first_resolution_ms} ms"}
    end
  end

  # Endpoints that appeared get a slot (and a worker); discovered ones that went away are removed
  # (their workers drain). A static endpoint is never removed; one DNS also names is not doubled.
  defp discovered(shell, {:error, why}) do
    Logger.warning(
      "snakepit pool #{inspect(shell.config.name)}: DNS discovery: #{why}; keeping its #{MapSet.size(shell.discovered)} endpoints"
    )

    shell
  end

  defp discovered(shell, {:ok, found}) do
    found_texts = MapSet.new(found, & &1.text)
    known_texts = MapSet.new(Map.values(shell.endpoints), & &1.text)

    gone =
      Enum.filter(shell.discovered, &(not MapSet.member?(found_texts, shell.endpoints[&1].text)))

    new = Enum.reject(found, &MapSet.member?(known_texts, &1.text))
    name = inspect(shell.config.name)

    shell =
      Enum.reduce(gone, shell, fn slot, shell ->
        Logger.info(
          "snakepit pool #{name}: endpoint #{shell.endpoints[slot].text} left DNS; draining it"
        )

        %{
          shell
          | endpoints: Map.delete(shell.endpoints, slot),
            discovered: MapSet.delete(shell.discovered, slot)
        }
        |> apply_event({:remove_slot, slot})
      end)

    Enum.reduce(new, shell, fn endpoint, shell ->
      slot = shell.next_slot
      Logger.info("snakepit pool #{name}: endpoint #{endpoint.text} found by DNS")

      %{
        shell
        | endpoints: Map.put(shell.endpoints, slot, endpoint),
          discovered: MapSet.put(shell.discovered, slot),
          next_slot: slot + 1
      }
      |> apply_event({:add_slot, slot})
    end)
  end

  # The fork server workers are forked from; its spawn requests wait in it until it is ready.
  defp ensure_fork_server(%{config: %{start_mode: :spawn}} = shell), do: {:ok, shell}
  defp ensure_fork_server(%{fork_server: pid} = shell) when is_pid(pid), do: {:ok, shell}

  defp ensure_fork_server(shell) do
    case ForkServer.start_link(shell.config, shm_dir: shell.shm && shell.shm.dir) do
      {:ok, pid} -> {:ok, %{shell | fork_server: pid, fork_server_os_pid: ForkServer.os_pid(pid)}}
      {:error, {:shutdown, {:start_failed, message}}} -> {:error, {:spawn_failed, message}}
      {:error, reason} -> {:error, reason}
    end
  end

  defp stop_fork_server(pid) do
    GenServer.stop(pid, :shutdown, 15_000)
  catch
    :exit, _ -> :ok
  end
end
