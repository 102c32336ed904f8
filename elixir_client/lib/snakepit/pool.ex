defmodule Snakepit.Pool do
  @moduledoc """
  A pool of Python workers and the capacity bookkeeping that dispatches calls to them.

  The pool process never does I/O for a call. A caller checks out a *slot* (`checkout/3`): the pool
  picks the least-loaded ready worker that has a free slot (a process worker has 1, a thread worker
  `threads_per_worker`) and answers with the worker's channel; the caller runs the gRPC call in its
  own process over that channel (one HTTP/2 connection per worker, many concurrent streams) and
  checks the slot back in (`checkin/3`). The pool monitors every caller holding or waiting for a
  slot, so a caller that dies frees its slot.

  When every slot is busy, callers wait FIFO, up to `queue_size` of them (more get `:queue_full`),
  each for at most `queue_timeout` ms (then `:queue_timeout`). While the pool has never had a ready
  worker (start-up), a waiter may wait up to `startup_timeout` instead.

  ## Workers and slots

  The pool keeps `pool_size` worker *slots*. A worker that crashes or fails to start is replaced
  after an exponential backoff (100 ms doubling up to `restart_backoff_max`, reset when a worker of
  that slot becomes ready).

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
  `worker_max_requests` calls. Its replacement is started first. On TTL the old worker keeps serving
  until the replacement is ready; on max requests it takes no new call at once (a worker never serves
  more than `worker_max_requests` calls). Either way, once it takes no new calls, its in-flight calls
  finish and it is stopped gracefully (SIGTERM, the server drains). No call fails because of a recycle.

  ## Sick workers

  A worker whose Python process lives but does not serve is replaced like a recycled one
  (replacement first, then the old one is stopped; SIGKILL when SIGTERM does not end it):

    * **Stuck calls.** A call its caller gave up on (deadline passed, caller died, stream cancelled;
      checked in as `:abandoned`) may still run in the server: a tool that ignores cancellation
      keeps its server slot. Such a call keeps its slot in the pool too (a process worker with one
      takes no call) until the server's `GetStats.requests_active`, compared with the calls the pool
      knows to be running there, shows it ended. One still running `stuck_call_grace` ms after it was
      given up is *stuck*; at `max_stuck_calls` stuck calls (or when every slot is stuck) the worker
      is replaced; its other calls finish normally.
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

  ## Why a worker went away

  Before the pool stops a worker on purpose while calls may still run on it, it records why (its
  *fate*: `{reason, message}`) in a public ETS table named by the lease; a caller whose call then
  fails on that worker's channel reports that reason (`worker_fate/1`).

  ## Sessions

  `session_id`s are pinned to the worker that first served them while it lives and serves; the
  checkout tells the caller when the session must be initialised on its worker (first use there).
  """

  use GenServer
  require Logger

  alias Snakepit.{Config, Error, Worker}
  alias Snakepit.Worker.Health

  @backoff_base 100
  # ms after a call was abandoned at which the server is asked whether it still runs it
  @stuck_check_delays [50, 150, 400]

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

  @type lease :: %{
          ref: reference,
          pool: pid,
          worker: pid,
          worker_id: pos_integer,
          channel: pid,
          init_session: boolean,
          call_timeout: pos_integer,
          pool_name: atom,
          fates: :ets.tid()
        }

  @doc """
  Checks out one call slot. Options: `:session_id` (pin to the session's worker), `:weight` (how
  many tool calls the server will count for this one, e.g. the items of a batch; default 1).
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
          GenServer.call(
            pid,
            {:checkout, self(), Keyword.get(opts, :session_id), Keyword.get(opts, :weight, 1)},
            :infinity
          )
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

  @doc "Pool counters and worker table (no Python calls)."
  def stats(pool),
    do: GenServer.call(whereis(pool) || raise(ArgumentError, "no pool #{inspect(pool)}"), :stats)

  @doc "Forgets a session's worker pinning; returns the worker channel it was on, if any."
  def forget_session(pool, session_id),
    do: GenServer.call(whereis(pool), {:forget_session, session_id})

  ## server

  @impl true
  def init(config) do
    Process.flag(:trap_exit, true)
    Logger.metadata(pool: config.name)

    slots =
      Map.new(1..config.pool_size, fn i ->
        {i, %{current: nil, pending: nil, failures: 0, scheduled: false}}
      end)

    state = %{
      config: config,
      name: config.name,
      slots: slots,
      workers: %{},
      queue: :queue.new(),
      queue_len: 0,
      waiters: %{},
      leases: %{},
      sessions: %{},
      ever_ready: false,
      # the last start failure, while no worker has become ready since (see "Start failures")
      start_error: nil,
      # nil, or while draining: %{grace, waiters, timer, workers_stopped}
      stopping: nil,
      fates: :ets.new(:snakepit_worker_fates, [:set, :public, read_concurrency: true]),
      ready_waiters: [],
      next_id: 1,
      stats: %{
        calls: 0,
        failures: 0,
        checkouts: 0,
        queued_total: 0,
        queue_full: 0,
        queue_timeouts: 0,
        recycles: 0,
        crashes: 0,
        workers_started: 0,
        stuck_replacements: 0,
        unhealthy_replacements: 0
      }
    }

    state = Enum.reduce(1..config.pool_size, state, fn slot, st -> start_worker(st, slot) end)
    {:ok, state}
  end

  @impl true
  def handle_call({:checkout, _caller, _session_id, _weight}, _from, %{stopping: %{}} = s),
    do: {:reply, {:error, stopped_error(s)}, s}

  def handle_call({:checkout, caller, session_id, weight}, from, s) do
    mref = Process.monitor(caller)

    case pick(s, session_id) do
      {:ok, wpid} ->
        {reply, s} = lease(s, wpid, mref, caller, session_id, weight)
        {:reply, {:ok, reply}, s}

      :none ->
        cond do
          s.start_error != nil and ready_count(s) == 0 ->
            Process.demonitor(mref, [:flush])
            {:reply, {:error, s.start_error}, s}

          s.queue_len >= s.config.queue_size ->
            Process.demonitor(mref, [:flush])
            s = bump(s, :queue_full)

            {:reply,
             {:error,
              Error.new(
                :queue_full,
                "pool #{inspect(s.name)}: all slots busy and #{s.queue_len} callers queued"
              )}, s}

          true ->
            wait =
              if s.ever_ready,
                do: s.config.queue_timeout,
                else: max(s.config.queue_timeout, s.config.startup_timeout)

            timer = Process.send_after(self(), {:queue_timeout, mref}, wait)

            waiter = %{
              from: from,
              caller: caller,
              session_id: session_id,
              weight: weight,
              timer: timer,
              wait: wait
            }

            s = %{
              s
              | queue: :queue.in(mref, s.queue),
                queue_len: s.queue_len + 1,
                waiters: Map.put(s.waiters, mref, waiter)
            }

            {:noreply, bump(s, :queued_total)}
        end
    end
  end

  def handle_call({:await_ready, min}, from, s) do
    min = if min == :all, do: s.config.pool_size, else: min

    cond do
      s.stopping != nil -> {:reply, {:error, stopped_error(s)}, s}
      ready_count(s) >= min -> {:reply, :ok, s}
      s.start_error != nil -> {:reply, {:error, s.start_error}, s}
      true -> {:noreply, %{s | ready_waiters: [{from, min} | s.ready_waiters]}}
    end
  end

  def handle_call(:stats, _from, s) do
    workers =
      for {pid, w} <- s.workers do
        %{
          pid: pid,
          id: w.id,
          slot: w.slot,
          status: w.status,
          os_pid: w.os_pid,
          port: w.port,
          channel: w.channel,
          in_flight: w.in_flight,
          capacity: w.capacity,
          abandoned_calls: length(w.abandoned),
          stuck_calls: w.stuck_calls,
          requests: w.requests,
          ttl_ms: w.ttl_ms,
          sessions: MapSet.size(w.sessions),
          uptime_ms: System.monotonic_time(:millisecond) - w.started_at
        }
      end
      |> Enum.sort_by(& &1.id)

    reply =
      Map.merge(s.stats, %{
        name: s.name,
        worker_profile: s.config.worker_profile,
        pool_size: s.config.pool_size,
        queued: s.queue_len,
        in_flight: Enum.sum(Enum.map(workers, & &1.in_flight)),
        capacity:
          s.workers
          |> Map.values()
          |> Enum.filter(&(&1.status in [:ready, :retiring]))
          |> Enum.map(&(&1.capacity - &1.stuck_calls))
          |> Enum.sum(),
        sessions: map_size(s.sessions),
        workers: workers
      })

    {:reply, reply, s}
  end

  def handle_call({:drain, _grace}, from, %{stopping: %{} = st} = s),
    do: {:noreply, %{s | stopping: %{st | waiters: [from | st.waiters]}}}

  def handle_call({:drain, grace}, from, s) do
    grace = grace || s.config.shutdown_grace
    Logger.info("snakepit pool #{inspect(s.name)}: stopping; in-flight calls get #{grace} ms")
    error = stopped_error(s)
    Enum.each(s.ready_waiters, fn {waiter, _min} -> GenServer.reply(waiter, {:error, error}) end)
    s = fail_waiters(%{s | ready_waiters: []}, error)
    timer = Process.send_after(self(), :drain_deadline, grace)
    stopping = %{grace: grace, waiters: [from], timer: timer, workers_stopped: false}
    {:noreply, maybe_end_drain(%{s | stopping: stopping})}
  end

  def handle_call({:forget_session, sid}, _from, s) do
    {wpid, sessions} = Map.pop(s.sessions, sid)

    {channel, s} =
      case wpid && s.workers[wpid] do
        nil -> {nil, s}
        w -> {w.channel, put_worker(s, %{w | sessions: MapSet.delete(w.sessions, sid)})}
      end

    {:reply, channel, %{s | sessions: sessions}}
  end

  @impl true
  def handle_cast({:checkin, mref, outcome}, s) do
    Process.demonitor(mref, [:flush])
    {:noreply, s |> release(mref, outcome) |> dispatch() |> maybe_end_drain()}
  end

  @impl true
  def handle_info({:snakepit_worker_ready, wpid, _info}, %{stopping: %{}} = s) do
    case s.workers[wpid] do
      nil -> {:noreply, s}
      w -> {:noreply, stop_worker(s, w)}
    end
  end

  def handle_info({:snakepit_worker_ready, wpid, info}, s) do
    case s.workers[wpid] do
      nil ->
        {:noreply, s}

      w ->
        w = %{w | status: :ready, channel: info.channel, os_pid: info.os_pid, port: info.port}
        s = put_worker(s, w)
        slot = s.slots[w.slot]

        s =
          if slot.pending == wpid do
            old = slot.current
            s = put_slot(s, w.slot, %{slot | current: wpid, pending: nil, failures: 0})

            case old && s.workers[old] do
              nil -> s
              %{status: :unhealthy} = ow -> stop_worker(s, ow)
              ow -> s |> put_worker(%{ow | status: :draining}) |> maybe_stop(old)
            end
          else
            put_slot(s, w.slot, %{slot | failures: 0})
          end

        s = put_worker(s, %{s.workers[wpid] | ttl_ms: schedule_ttl(s.config, wpid)})
        schedule_health_check(s.config, wpid)

        Logger.info(
          "snakepit pool #{inspect(s.name)}: worker #{w.id} ready (os pid #{info.os_pid}, port #{info.port})"
        )

        s = %{s | ever_ready: true, start_error: nil} |> notify_ready() |> dispatch()
        {:noreply, s}
    end
  end

  def handle_info({:snakepit_worker_spawned, wpid, os_pid}, s) do
    case s.workers[wpid] do
      nil -> {:noreply, s}
      w -> {:noreply, put_worker(s, %{w | os_pid: os_pid})}
    end
  end

  def handle_info({:EXIT, wpid, _reason}, %{stopping: %{}} = s) do
    s = %{s | workers: Map.delete(s.workers, wpid)} |> forget_fate(wpid)
    {:noreply, maybe_end_drain(s)}
  end

  def handle_info({:EXIT, wpid, reason}, s) do
    case Map.pop(s.workers, wpid) do
      {nil, _} ->
        # not a worker of ours (e.g. one whose init failed: start_worker handled it already)
        {:noreply, s}

      {w, workers} ->
        s = %{s | workers: workers}
        sessions = Map.reject(s.sessions, fn {_sid, p} -> p == wpid end)
        s = %{s | sessions: sessions}
        slot = s.slots[w.slot]
        clean? = w.status in [:draining, :stopping]

        s =
          cond do
            clean? ->
              Logger.debug("snakepit pool #{inspect(s.name)}: worker #{w.id} recycled")
              slot = if slot.current == wpid, do: %{slot | current: nil}, else: slot
              s = put_slot(s, w.slot, slot)

              if slot.current == nil and slot.pending == nil,
                do: schedule_start(s, w.slot, 0),
                else: s

            true ->
              Logger.warning(
                "snakepit pool #{inspect(s.name)}: worker #{w.id} (os pid #{inspect(w.os_pid)}) went down: #{inspect(reason)}"
              )

              s = bump(s, :crashes)
              s = if w.status == :starting, do: start_failed(s, start_error(w, reason)), else: s
              slot = %{slot | failures: slot.failures + 1}

              slot =
                cond do
                  slot.pending == wpid -> %{slot | pending: nil}
                  slot.current == wpid -> %{slot | current: nil}
                  true -> slot
                end

              s = put_slot(s, w.slot, slot)

              if slot.pending == nil do
                schedule_start(s, w.slot, backoff(slot.failures, s.config.restart_backoff_max))
              else
                s
              end
          end

        {:noreply, s |> forget_fate(wpid) |> dispatch()}
    end
  end

  def handle_info(:drain_deadline, %{stopping: %{workers_stopped: false} = st} = s) do
    message =
      "pool #{inspect(s.name)} was stopped: the call was still running after the #{st.grace} ms grace period"

    for {wpid, %{in_flight: n}} <- s.workers,
        n > 0,
        do: :ets.insert(s.fates, {wpid, :pool_stopped, message})

    {:noreply, stop_all_workers(s)}
  end

  def handle_info(:drain_give_up, %{stopping: %{waiters: [_ | _]} = st} = s) do
    Logger.error(
      "snakepit pool #{inspect(s.name)}: #{map_size(s.workers)} workers still running after the drain"
    )

    Enum.each(st.waiters, &GenServer.reply(&1, :ok))
    {:noreply, %{s | stopping: %{st | waiters: []}}}
  end

  def handle_info({:start_worker, _slot}, %{stopping: %{}} = s), do: {:noreply, s}

  def handle_info({:start_worker, slot}, s) do
    s = put_slot(s, slot, %{s.slots[slot] | scheduled: false})
    {:noreply, start_worker(s, slot)}
  end

  def handle_info({:ttl_expired, _wpid}, %{stopping: %{}} = s), do: {:noreply, s}

  def handle_info({:ttl_expired, wpid}, s) do
    case s.workers[wpid] do
      %{status: :ready} = w -> {:noreply, retire(s, w, :ttl)}
      _ -> {:noreply, s}
    end
  end

  def handle_info({:health_check, _wpid}, %{stopping: %{}} = s), do: {:noreply, s}

  def handle_info({:health_check, wpid}, s) do
    case s.workers[wpid] do
      %{status: st} = w when st in [:ready, :retiring] ->
        schedule_health_check(s.config, wpid)
        kind = if w.abandoned == [], do: :health, else: :active_calls
        {:noreply, start_check(s, w, kind)}

      _ ->
        {:noreply, s}
    end
  end

  def handle_info({:stuck_call_check, wpid}, s) do
    case s.workers[wpid] do
      %{status: st, abandoned: [_ | _]} = w when st in [:ready, :retiring] ->
        {:noreply, start_check(s, w, :active_calls)}

      _ ->
        {:noreply, s}
    end
  end

  def handle_info({:check_result, wpid, ref, result}, s) do
    case s.workers[wpid] do
      %{check: %{ref: ^ref} = check} = w ->
        w = %{w | check: nil}
        s = put_worker(s, w)

        s =
          case {w.status, result} do
            {st, _} when st not in [:ready, :retiring] -> s
            {_, :ok} -> s
            {_, {:ok, active}} -> settle_abandoned(s, w, active, check)
            {_, {:error, why}} -> unhealthy(s, w, check_failure(check.kind, why))
          end

        # a stuck-call check asked for while this one ran
        s =
          case s.workers[wpid] do
            %{check_again: true, status: st} = w when st in [:ready, :retiring] ->
              w = %{w | check_again: false}
              start_check(put_worker(s, w), w, :active_calls)

            _ ->
              s
          end

        {:noreply, dispatch(s)}

      _ ->
        {:noreply, s}
    end
  end

  def handle_info({:queue_timeout, mref}, s) do
    case Map.pop(s.waiters, mref) do
      {nil, _} ->
        {:noreply, s}

      {waiter, waiters} ->
        Process.demonitor(mref, [:flush])

        GenServer.reply(
          waiter.from,
          {:error,
           Error.new(
             :queue_timeout,
             "pool #{inspect(s.name)}: no free slot within #{waiter.wait} ms"
           )}
        )

        s = %{
          s
          | waiters: waiters,
            queue: :queue.delete(mref, s.queue),
            queue_len: s.queue_len - 1
        }

        {:noreply, bump(s, :queue_timeouts)}
    end
  end

  def handle_info({:DOWN, mref, :process, _pid, _reason}, s) do
    cond do
      # the channel cancels the dead caller's stream; its tool may go on running on the server
      Map.has_key?(s.leases, mref) ->
        {:noreply, s |> release(mref, :abandoned) |> dispatch() |> maybe_end_drain()}

      Map.has_key?(s.waiters, mref) ->
        {waiter, waiters} = Map.pop(s.waiters, mref)
        Process.cancel_timer(waiter.timer)

        {:noreply,
         %{s | waiters: waiters, queue: :queue.delete(mref, s.queue), queue_len: s.queue_len - 1}}

      true ->
        {:noreply, s}
    end
  end

  def handle_info(_msg, s), do: {:noreply, s}

  @impl true
  def terminate(_reason, s) do
    message = "pool #{inspect(s.name)} was stopped during the call"

    for {wpid, %{in_flight: n}} <- s.workers,
        n > 0,
        do: :ets.insert(s.fates, {wpid, :pool_stopped, message})

    for {pid, _w} <- s.workers, do: Process.exit(pid, :shutdown)

    for {pid, _w} <- s.workers do
      receive do
        {:EXIT, ^pid, _} -> :ok
      after
        5_000 -> Process.exit(pid, :kill)
      end
    end

    :ok
  end

  @doc "Restart delay (ms) after the `failures`-th consecutive failure of a slot: 100, 200, 400, ... up to `max`."
  @spec backoff(pos_integer, pos_integer) :: pos_integer
  def backoff(failures, max), do: min(@backoff_base * Integer.pow(2, min(failures - 1, 16)), max)

  ## internals

  defp start_worker(s, slot_id) do
    id = s.next_id

    case Worker.start_link(config: s.config, pool: self(), id: id) do
      {:ok, pid} ->
        add_worker(s, slot_id, id, pid)

      {:error, reason} ->
        Logger.error(
          "snakepit pool #{inspect(s.name)}: cannot start worker #{id}: #{inspect(reason)}"
        )

        message =
          case reason do
            {:spawn_failed, why} ->
              "cannot spawn worker #{id} (#{s.config.python_executable}): #{why}"

            other ->
              "cannot start worker #{id}: #{inspect(other)}"
          end

        slot = s.slots[slot_id]
        slot = %{slot | failures: slot.failures + 1}
        s = %{s | next_id: id + 1} |> put_slot(slot_id, slot) |> bump(:crashes)
        s = start_failed(s, Error.new(:worker_start_failed, message))
        schedule_start(s, slot_id, backoff(slot.failures, s.config.restart_backoff_max))
    end
  end

  defp start_error(_w, {:shutdown, {:start_failed, message}}),
    do: Error.new(:worker_start_failed, message)

  defp start_error(_w, {:shutdown, {:startup_timeout, message}}),
    do: Error.new(:startup_timeout, message)

  defp start_error(w, reason),
    do:
      Error.new(
        :worker_start_failed,
        "worker #{w.id} went down before it was ready: #{inspect(reason)}"
      )

  # Keeps the error and hands it to everyone waiting for a worker that is not there: await_ready
  # callers always, queued callers when no worker is ready (else a ready one will serve them).
  defp start_failed(s, %Error{} = error) do
    error = %{error | message: "pool #{inspect(s.name)}: #{error.message}"}
    Enum.each(s.ready_waiters, fn {from, _min} -> GenServer.reply(from, {:error, error}) end)
    s = %{s | start_error: error, ready_waiters: []}

    if ready_count(s) == 0, do: fail_waiters(s, error), else: s
  end

  # Fails every queued caller with `error`.
  defp fail_waiters(s, error) do
    for {mref, waiter} <- s.waiters do
      Process.cancel_timer(waiter.timer)
      Process.demonitor(mref, [:flush])
      GenServer.reply(waiter.from, {:error, error})
    end

    %{s | waiters: %{}, queue: :queue.new(), queue_len: 0}
  end

  defp add_worker(s, slot_id, id, pid) do
    w = %{
      pid: pid,
      id: id,
      slot: slot_id,
      status: :starting,
      channel: nil,
      os_pid: nil,
      port: nil,
      in_flight: 0,
      # tool calls the server counts for the leases in flight (a batch counts its items)
      load: 0,
      # when calls the caller gave up on were checked in (oldest first), while the server may
      # still run them; each keeps a slot (see "Stuck calls")
      abandoned: [],
      stuck_calls: 0,
      # the check in flight, %{ref, kind, load, sent_at}, and whether another is wanted after it
      check: nil,
      check_again: false,
      capacity: s.config.threads_per_worker,
      requests: 0,
      ttl_ms: nil,
      sessions: MapSet.new(),
      started_at: System.monotonic_time(:millisecond)
    }

    slot = s.slots[slot_id]

    slot =
      if slot.current != nil and Map.has_key?(s.workers, slot.current),
        do: %{slot | pending: pid},
        else: %{slot | current: pid}

    s = %{s | next_id: id + 1, workers: Map.put(s.workers, pid, w)}
    s |> put_slot(slot_id, slot) |> bump(:workers_started)
  end

  defp schedule_start(s, slot_id, delay) do
    slot = s.slots[slot_id]

    if slot.scheduled do
      s
    else
      Process.send_after(self(), {:start_worker, slot_id}, delay)
      put_slot(s, slot_id, %{slot | scheduled: true})
    end
  end

  # Returns the worker's jittered TTL in ms (or :infinity).
  defp schedule_ttl(%{worker_ttl: :infinity}, _pid), do: :infinity

  defp schedule_ttl(config, pid) do
    ttl = max(round(config.worker_ttl * (1.0 - :rand.uniform() * config.ttl_jitter)), 1)
    Process.send_after(self(), {:ttl_expired, pid}, ttl)
    ttl
  end

  # Starts the replacement (once) and stops routing to `w` (at once for :max_requests, when the
  # replacement is ready for :ttl and :stuck_calls).
  defp retire(s, w, why) do
    slot = s.slots[w.slot]
    already? = w.status in [:retiring, :draining, :stopping, :unhealthy]

    s =
      cond do
        already? -> s
        why == :stuck_calls -> bump(s, :stuck_replacements)
        true -> bump(s, :recycles)
      end

    if not already?,
      do:
        Logger.info(
          "snakepit pool #{inspect(s.name)}: recycling worker #{w.id} (#{why}, #{w.requests} requests)"
        )

    s =
      if slot.pending == nil and not slot.scheduled and slot.current == w.pid,
        do: start_worker(s, w.slot),
        else: s

    case why do
      :max_requests when w.status in [:ready, :retiring] ->
        s |> put_worker(%{w | status: :draining}) |> maybe_stop(w.pid)

      # :ttl, :stuck_calls: it serves what it can until its replacement is ready
      _ when w.status == :ready ->
        put_worker(s, %{w | status: :retiring})

      _ ->
        s
    end
  end

  defp schedule_health_check(%{health_check_interval: :infinity}, _wpid), do: :ok

  defp schedule_health_check(config, wpid),
    do: Process.send_after(self(), {:health_check, wpid}, config.health_check_interval)

  # Asks the worker's server, from a short-lived process, one `Snakepit.Worker.Health` question;
  # the answer (or, past the timeout, a failure) comes back as {:check_result, wpid, ref, result}.
  # One check per worker at a time: one asked for meanwhile runs after it.
  defp start_check(s, %{check: %{}} = w, :active_calls),
    do: put_worker(s, %{w | check_again: true})

  defp start_check(s, %{check: %{}}, :health), do: s

  defp start_check(s, w, kind) do
    pool = self()
    ref = make_ref()
    timeout = s.config.health_check_timeout
    channel = w.channel

    spawn(fn ->
      result =
        case kind do
          :health -> Health.check(channel, timeout)
          :active_calls -> Health.active_calls(channel, timeout)
        end

      send(pool, {:check_result, w.pid, ref, result})
    end)

    late = {:error, "no answer within #{timeout} ms"}
    Process.send_after(self(), {:check_result, w.pid, ref, late}, timeout + 1_000)
    check = %{ref: ref, kind: kind, load: w.load, sent_at: System.monotonic_time(:millisecond)}
    put_worker(s, %{w | check: check})
  end

  defp check_failure(:health, why), do: "failed its health check (#{why})"
  defp check_failure(:active_calls, why), do: "did not answer a stuck-call check (#{why})"

  # The server runs `active` tool calls; the pool knew of at most `check.load` (leases alive when
  # the check was sent, plus those started since). The rest are abandoned calls still running:
  # keep that many of the abandoned calls measured (oldest first), forget the others.
  defp settle_abandoned(s, w, active, check) do
    grace = s.config.stuck_call_grace
    still_running = max(active - check.load, 0)
    {measured, later} = Enum.split_with(w.abandoned, &(&1 <= check.sent_at))
    kept = Enum.take(measured, still_running)
    stuck = Enum.count(kept, &(check.sent_at - &1 >= grace))
    w = %{w | abandoned: kept ++ later, stuck_calls: stuck}
    s = put_worker(s, w)

    if stuck > 0 and stuck >= min(s.config.max_stuck_calls, w.capacity) do
      Logger.warning(
        "snakepit pool #{inspect(s.name)}: worker #{w.id} (os pid #{w.os_pid}) has #{stuck} calls " <>
          "still running more than #{grace} ms after their callers gave up; replacing it"
      )

      retire(s, w, :stuck_calls)
    else
      s
    end
  end

  # Takes `w` out of service: records why for its callers, starts its replacement, and stops it
  # when the replacement is ready (at once when no call is in flight on it).
  defp unhealthy(s, w, why) do
    message = "worker #{w.id} (os pid #{w.os_pid}) #{why} and was replaced"
    Logger.warning("snakepit pool #{inspect(s.name)}: #{message}")
    :ets.insert(s.fates, {w.pid, :worker_unhealthy, message})
    slot = s.slots[w.slot]

    s =
      if slot.pending == nil and not slot.scheduled and slot.current == w.pid,
        do: start_worker(s, w.slot),
        else: s

    s
    |> bump(:unhealthy_replacements)
    |> put_worker(%{w | status: :unhealthy})
    |> maybe_stop(w.pid)
  end

  # Draining: once no call is in flight, stop the workers; once they are gone, answer drain/2.
  defp maybe_end_drain(%{stopping: %{workers_stopped: false}} = s) do
    if map_size(s.leases) == 0, do: stop_all_workers(s), else: s
  end

  defp maybe_end_drain(%{stopping: %{workers_stopped: true, waiters: [_ | _]} = st} = s) do
    if map_size(s.workers) == 0 do
      Enum.each(st.waiters, &GenServer.reply(&1, :ok))
      %{s | stopping: %{st | waiters: []}}
    else
      s
    end
  end

  defp maybe_end_drain(s), do: s

  defp stop_all_workers(%{stopping: st} = s) do
    Process.cancel_timer(st.timer)
    Process.send_after(self(), :drain_give_up, s.config.shutdown_grace + 5_000)
    s = Enum.reduce(Map.values(s.workers), s, &stop_worker(&2, &1))
    maybe_end_drain(%{s | stopping: %{st | workers_stopped: true}})
  end

  defp stop_worker(s, %{status: :stopping}), do: s

  defp stop_worker(s, w) do
    Worker.stop_gracefully(w.pid)
    put_worker(s, %{w | status: :stopping})
  end

  defp stopped_error(s), do: Error.new(:pool_stopped, "pool #{inspect(s.name)} is stopping")

  # A fate is kept while a lease on its worker may still read it.
  defp forget_fate(s, wpid) do
    if not Map.has_key?(s.workers, wpid) and
         not Enum.any?(s.leases, &match?({_, {_, ^wpid, _}}, &1)),
       do: :ets.delete(s.fates, wpid)

    s
  end

  defp maybe_stop(s, wpid) do
    case s.workers[wpid] do
      %{status: st, in_flight: 0} = w when st in [:draining, :unhealthy] -> stop_worker(s, w)
      _ -> s
    end
  end

  # Slots taken: calls in flight, and abandoned calls the server may still be running.
  defp busy(w), do: w.in_flight + length(w.abandoned)

  defp pick(s, session_id) do
    pinned = session_id && Map.get(s.sessions, session_id)

    case pinned && s.workers[pinned] do
      %{status: st} = w when st in [:ready, :retiring] ->
        if busy(w) < w.capacity, do: {:ok, pinned}, else: :none

      _ ->
        pick_any(s)
    end
  end

  defp pick_any(s) do
    Enum.reduce(s.workers, nil, fn {pid, w}, best ->
      if w.status in [:ready, :retiring] and busy(w) < w.capacity do
        case best do
          nil -> {pid, busy(w)}
          {_, n} -> if busy(w) < n, do: {pid, busy(w)}, else: best
        end
      else
        best
      end
    end)
    |> case do
      nil -> :none
      {pid, _} -> {:ok, pid}
    end
  end

  defp lease(s, wpid, mref, caller, session_id, weight) do
    w = s.workers[wpid]
    init? = session_id != nil and not MapSet.member?(w.sessions, session_id)
    sessions = if init?, do: MapSet.put(w.sessions, session_id), else: w.sessions
    # a check in flight may see this call on the server: it must know of it
    check = w.check && %{w.check | load: w.check.load + weight}

    w = %{
      w
      | in_flight: w.in_flight + 1,
        load: w.load + weight,
        check: check,
        requests: w.requests + 1,
        sessions: sessions
    }

    s = put_worker(s, w)
    s = if session_id, do: %{s | sessions: Map.put(s.sessions, session_id, wpid)}, else: s
    s = %{s | leases: Map.put(s.leases, mref, {caller, wpid, weight})} |> bump(:checkouts)

    s =
      if s.config.worker_max_requests != :infinity and w.requests >= s.config.worker_max_requests,
        do: retire(s, w, :max_requests),
        else: s

    reply = %{
      ref: mref,
      pool: self(),
      pool_name: s.name,
      worker: wpid,
      worker_id: w.id,
      channel: w.channel,
      init_session: init?,
      call_timeout: s.config.call_timeout,
      fates: s.fates
    }

    {reply, s}
  end

  defp release(s, mref, outcome) do
    case Map.pop(s.leases, mref) do
      {nil, _} ->
        s

      {{_caller, wpid, weight}, leases} ->
        s = %{s | leases: leases}
        s = bump(s, :calls)
        s = if outcome == :ok, do: s, else: bump(s, :failures)

        case s.workers[wpid] do
          nil ->
            forget_fate(s, wpid)

          w ->
            sessions =
              case outcome do
                {:session_init_failed, sid} -> MapSet.delete(w.sessions, sid)
                _ -> w.sessions
              end

            w = %{w | in_flight: w.in_flight - 1, load: w.load - weight, sessions: sessions}
            s = if outcome == :abandoned, do: abandon(s, w, weight), else: put_worker(s, w)
            maybe_stop(s, wpid)
        end
    end
  end

  # The caller gave up on a call of `weight` tool calls: they keep their slots until a check of the
  # server shows them ended. Checks soon and more rarely after (a tool that honours cancellation
  # ends within milliseconds, one that polls for it within its polling period), and once
  # `stuck_call_grace` has passed.
  defp abandon(s, w, weight) do
    now = System.monotonic_time(:millisecond)
    w = %{w | abandoned: w.abandoned ++ List.duplicate(now, min(weight, w.capacity))}
    grace = s.config.stuck_call_grace

    for delay <- Enum.filter(@stuck_check_delays, &(&1 < grace)) ++ [grace + 10],
        do: Process.send_after(self(), {:stuck_call_check, w.pid}, delay)

    put_worker(s, w)
  end

  # Hands free slots to waiters, oldest first (a session waiter whose worker is busy keeps its place).
  defp dispatch(%{queue_len: 0} = s), do: s

  defp dispatch(s) do
    if pick_any(s) == :none, do: s, else: dispatch_loop(s, s.queue, [])
  end

  # Pops waiters from the front while there is free capacity; waiters that cannot be served now
  # (a session pinned to a busy worker) are skipped and keep their place. O(served + skipped).
  defp dispatch_loop(s, queue, skipped) do
    case :queue.out(queue) do
      {:empty, _} ->
        finish_dispatch(s, queue, skipped)

      {{:value, mref}, rest} ->
        waiter = s.waiters[mref]

        case pick(s, waiter.session_id) do
          {:ok, wpid} ->
            Process.cancel_timer(waiter.timer)
            {reply, s} = lease(s, wpid, mref, waiter.caller, waiter.session_id, waiter.weight)
            GenServer.reply(waiter.from, {:ok, reply})
            s = %{s | waiters: Map.delete(s.waiters, mref)}

            if pick_any(s) == :none,
              do: finish_dispatch(s, rest, skipped),
              else: dispatch_loop(s, rest, skipped)

          :none ->
            dispatch_loop(s, rest, [mref | skipped])
        end
    end
  end

  defp finish_dispatch(s, rest, skipped) do
    queue = :queue.join(:queue.from_list(Enum.reverse(skipped)), rest)
    %{s | queue: queue, queue_len: :queue.len(queue)}
  end

  defp ready_count(s), do: Enum.count(s.workers, fn {_, w} -> w.status in [:ready, :retiring] end)

  defp notify_ready(s) do
    n = ready_count(s)
    {done, waiting} = Enum.split_with(s.ready_waiters, fn {_from, min} -> n >= min end)
    Enum.each(done, fn {from, _} -> GenServer.reply(from, :ok) end)
    %{s | ready_waiters: waiting}
  end

  defp put_worker(s, w), do: %{s | workers: Map.put(s.workers, w.pid, w)}
  defp put_slot(s, id, slot), do: %{s | slots: Map.put(s.slots, id, slot)}
  defp bump(s, key), do: %{s | stats: Map.update!(s.stats, key, &(&1 + 1))}
end
