defmodule Snakepit.Pool.State do
  @moduledoc """
  The pool's decisions as a pure state machine, in the sans-I/O style of `Snakepit.HTTP2.Conn`:
  worker status, capacity, the wait queue, session pinning, recycling, health-driven replacement
  and stopping. It starts no process, sends no message, reads no clock: `Snakepit.Pool` (the shell)
  turns messages into events, feeds them to `handle/3` with the current monotonic time in ms, and
  performs the actions that come back, in order.

      {state, actions} = State.new(config, now)
      {state, actions} = State.handle(state, {:checkout, ref, from, request}, now)

  ## Events

    * `{:checkout, ref, from, request}` - a caller (monitored by the shell under `ref`, which becomes
      the lease's ref) wants a slot; `request` is `t:request/0`
    * `{:checkin, ref, outcome}` - the lease `ref` is back (`t:outcome/0`); `{:caller_down, ref}` -
      the caller holding or waiting under `ref` died
    * `{:await_ready, from, min}`, `{:drain, from, grace}`, `{:forget_session, from, session_id}`
    * `{:worker_spawn_failed, id, reason}` - the `{:start_worker, id}` action failed at once;
      `{:worker_spawned, id, os_pid}`, `{:worker_ready, id, info}`, `{:worker_exited, id, reason}`
    * `{:worker_draining, id}` - the worker's server is shutting down on its own (it sent GOAWAY:
      its calls in flight finish, it takes no new one); the worker leaves rotation
      (`:server_draining`) and is replaced once it exits, like a worker that went down
    * `{:worker_serving, id, serving?}` - a remote endpoint's health changed (its Health/Watch
      said NOT_SERVING, or SERVING again): out of rotation (`:not_serving`: no new call, session
      or queued caller; calls in flight go on) or back in
    * `{:add_slot, slot}`, `{:remove_slot, slot}` - a remote pool's endpoints changed (DNS
      discovery): a new slot starts its worker; a removed slot's worker takes no new call, is
      stopped once its calls end, and is not replaced
    * `{:check_result, id, check_ref, result}` - the answer to a `{:check, ...}` action
    * timer events the machine scheduled itself: `{:start_worker, slot}`, `{:ttl_expired, id}`,
      `{:health_check, id}`, `{:stuck_call_check, id}`, `{:queue_timeout, ref}`,
      `:drain_deadline`, `:drain_give_up`
    * `:terminating` - the pool process is ending

  ## Actions

    * `{:reply, from, reply}`; `{:lease, from, lease}` - reply `{:ok, lease}`, the shell adds the
      pool pid, the worker pid and the fates table to `t:lease/0`
    * `{:demonitor, ref}`
    * `{:start_worker, id}`, `{:stop_worker, id}` (gracefully)
    * `{:schedule, delay, event}` - feed `event` back after `delay` ms; `{:timer, delay, event}` the
      same, cancellable by `{:cancel_timer, event}`
    * `{:check, id, check_ref, kind, channel, timeout}` - ask the worker's server one
      `Snakepit.Worker.Health` question (`:health` or `:active_calls`), answer as `:check_result`
    * `{:record_fate, id, reason, message}`, `{:forget_fate, id}` - the worker's fate (see
      `Snakepit.Pool`, "Why a worker went away")
    * `{:log, level, message}`
    * `{:delete_regions, prefixes}` - delete the shared-memory regions `"<prefix>.*"` of calls
      whose caller died, or that were abandoned and are known to have ended (see `Snakepit.Pool`,
      "Shared memory")
    * `{:telemetry, event, measurements, metadata}` - a worker event of `Snakepit.Telemetry`
      (`[:snakepit, :worker, :start | :recycle | :crash]`); the shell adds `system_time` to the
      measurements and `worker_pid` to the metadata, and emits it

  Workers are named by the integer ids the machine gives them; the shell maps them to pids.
  """

  alias Snakepit.{Config, Error}

  @backoff_base 100
  # ms after a call was abandoned at which the server is asked whether it still runs it
  @stuck_check_delays [50, 150, 400]

  defstruct [
    :config,
    :name,
    :rand,
    slots: %{},
    # id => worker
    workers: %{},
    # refs of waiters, oldest first
    queue: :queue.new(),
    queue_len: 0,
    # ref => waiter
    waiters: %{},
    # ref => %{worker, weight, session_id, init_session}
    leases: %{},
    # session_id => worker id it is pinned to
    sessions: %{},
    # sessions whose creating call (the lease that initialises them on their worker) is out
    sessions_being_created: MapSet.new(),
    ever_ready: false,
    # the last start failure, while no worker has become ready since (see "Start failures")
    start_error: nil,
    # nil, or while draining: %{grace, waiters, workers_stopped}
    stopping: nil,
    ready_waiters: [],
    next_id: 1,
    next_check: 1,
    now: 0,
    # actions of the event being handled, newest first
    actions: [],
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
      unhealthy_replacements: 0,
      # ms callers waited for a slot, over every checkout that got one (`checkouts`)
      queue_wait_total_ms: 0,
      queue_wait_max_ms: 0
    }
  ]

  @type t :: %__MODULE__{}
  @type worker_id :: pos_integer
  @type from :: GenServer.from()
  @type request :: %{
          session_id: String.t() | nil,
          weight: pos_integer,
          create_session: boolean,
          # optional: the prefixes of the call's shared-memory regions
          regions: [String.t()],
          # optional (default true): false answers :pool_saturated instead of queueing
          queue: boolean
        }
  @type outcome :: :ok | :error | :abandoned | {:session_init_failed, String.t()}
  @type lease :: %{
          ref: reference,
          worker_id: worker_id,
          channel: pid,
          init_session: boolean,
          call_timeout: pos_integer,
          pool_name: atom,
          os_pid: pos_integer | nil,
          port: pos_integer | nil,
          uds: Path.t() | nil,
          queued: boolean
        }
  @type event ::
          {:checkout, reference, from, request}
          | {:checkin, reference, outcome}
          | {:caller_down, reference}
          | {:await_ready, from, pos_integer | :all}
          | {:drain, from, non_neg_integer | nil}
          | {:forget_session, from, String.t()}
          | {:worker_spawn_failed, worker_id, term}
          | {:worker_spawned, worker_id, pos_integer}
          | {:worker_ready, worker_id,
             %{
               required(:channel) => pid,
               required(:os_pid) => pos_integer,
               required(:port) => pos_integer | nil,
               optional(:uds) => Path.t() | nil
             }}
          | {:worker_exited, worker_id, term}
          | {:worker_draining, worker_id}
          | {:check_result, worker_id, pos_integer, :ok | {:ok, non_neg_integer} | {:error, term}}
          | {:start_worker, pos_integer}
          | {:ttl_expired, worker_id}
          | {:health_check, worker_id}
          | {:stuck_call_check, worker_id}
          | {:queue_timeout, reference}
          | :drain_deadline
          | :drain_give_up
          | :terminating
  @type action ::
          {:reply, from, term}
          | {:lease, from, lease}
          | {:demonitor, reference}
          | {:start_worker, worker_id}
          | {:stop_worker, worker_id}
          | {:schedule, non_neg_integer, event}
          | {:timer, non_neg_integer, event}
          | {:cancel_timer, event}
          | {:check, worker_id, pos_integer, :health | :active_calls, pid, pos_integer}
          | {:record_fate, worker_id, atom, String.t()}
          | {:forget_fate, worker_id}
          | {:log, Logger.level(), String.t()}
          | {:delete_regions, [String.t()]}
          | {:telemetry, [atom, ...], map, map}

  @doc """
  A pool for `config` whose `pool_size` workers are being started. Option `:seed`: a `:rand` state
  for the TTL and max-requests jitter (default: a fresh one).
  """
  @spec new(Config.t(), integer, keyword) :: {t, [action]}
  def new(%Config{} = config, now, opts \\ []) do
    slots = Map.new(1..config.pool_size//1, &{&1, new_slot()})

    s = %__MODULE__{
      config: config,
      name: config.name,
      slots: slots,
      now: now,
      rand: Keyword.get_lazy(opts, :seed, fn -> :rand.seed_s(:exsss) end)
    }

    s =
      Enum.reduce(1..config.pool_size//1, s, fn slot, st -> start_worker(st, slot, :initial) end)

    flush(s)
  end

  defp new_slot,
    do: %{
      current: nil,
      pending: nil,
      failures: 0,
      scheduled: false,
      recycles: 0,
      crashes: 0,
      removed: false
    }

  @doc "The slot of worker `id` (a remote pool's shell maps slots to endpoints), or nil."
  @spec worker_slot(t, worker_id) :: pos_integer | nil
  def worker_slot(s, id), do: s.workers[id] && s.workers[id].slot

  @doc "Applies one event at monotonic time `now` (ms)."
  @spec handle(t, event, integer) :: {t, [action]}
  def handle(%__MODULE__{} = s, event, now), do: flush(event(%{s | now: now}, event))

  @doc "May this worker take a new call? (Ready, or retiring while its replacement starts.)"
  @spec routable?(map) :: boolean
  def routable?(%{status: status}), do: status in [:ready, :retiring]

  @doc "The ids of the workers alive now."
  @spec worker_ids(t) :: [worker_id]
  def worker_ids(s), do: Map.keys(s.workers)

  @doc "Pool counters and the worker table (workers without pids: the shell adds them)."
  @spec stats(t, integer) :: map
  def stats(s, now) do
    workers =
      for {_id, w} <- s.workers do
        %{
          id: w.id,
          slot: w.slot,
          status: w.status,
          os_pid: w.os_pid,
          port: w.port,
          uds: w.uds,
          endpoint: w.endpoint,
          channel: w.channel,
          in_flight: w.in_flight,
          capacity: w.capacity,
          abandoned_calls: length(w.abandoned),
          stuck_calls: w.stuck_calls,
          requests: w.requests,
          max_requests: w.max_requests,
          ttl_ms: w.ttl_ms,
          sessions: MapSet.size(w.sessions),
          uptime_ms: now - w.started_at,
          slot_recycles: s.slots[w.slot].recycles,
          slot_crashes: s.slots[w.slot].crashes
        }
      end
      |> Enum.sort_by(& &1.id)

    slots =
      for {id, slot} <- Enum.sort(s.slots) do
        %{slot: id, worker: slot.current, recycles: slot.recycles, crashes: slot.crashes}
      end

    Map.merge(s.stats, %{
      name: s.name,
      worker_profile: s.config.worker_profile,
      pool_size: slot_count(s),
      queued: s.queue_len,
      in_flight: Enum.sum(Enum.map(workers, & &1.in_flight)),
      capacity:
        s.workers
        |> Map.values()
        |> Enum.filter(&routable?/1)
        |> Enum.map(&usable_capacity/1)
        |> Enum.sum(),
      sessions: map_size(s.sessions),
      workers: workers,
      slots: slots
    })
  end

  @doc "Restart delay (ms) after the `failures`-th consecutive failure of a slot: 100, 200, 400, ... up to `max`."
  @spec backoff(pos_integer, pos_integer) :: pos_integer
  def backoff(failures, max), do: min(@backoff_base * Integer.pow(2, min(failures - 1, 16)), max)

  ## events

  defp event(%{stopping: %{}} = s, {:checkout, ref, from, _request}),
    do: s |> emit({:demonitor, ref}) |> reply(from, {:error, stopped_error(s)})

  defp event(s, {:checkout, ref, from, request}) do
    case pick(s, request.session_id) do
      {:ok, id} ->
        lease(s, id, ref, from, request)

      :none ->
        cond do
          s.start_error != nil and ready_count(s) == 0 ->
            s |> emit({:demonitor, ref}) |> reply(from, {:error, s.start_error})

          # a caller that would rather go elsewhere than wait (Snakepit.Cluster)
          Map.get(request, :queue, true) == false ->
            error = Error.new(:pool_saturated, "pool #{inspect(s.name)}: all slots busy")
            s |> emit({:demonitor, ref}) |> reply(from, {:error, error})

          s.queue_len >= s.config.queue_size ->
            error =
              Error.new(
                :queue_full,
                "pool #{inspect(s.name)}: all slots busy and #{s.queue_len} callers queued"
              )

            s |> emit({:demonitor, ref}) |> bump(:queue_full) |> reply(from, {:error, error})

          true ->
            wait =
              if s.ever_ready,
                do: s.config.queue_timeout,
                else: max(s.config.queue_timeout, s.config.startup_timeout)

            waiter = Map.merge(request, %{from: from, wait: wait, queued_at: s.now})

            %{
              s
              | queue: :queue.in(ref, s.queue),
                queue_len: s.queue_len + 1,
                waiters: Map.put(s.waiters, ref, waiter)
            }
            |> emit({:timer, wait, {:queue_timeout, ref}})
            |> bump(:queued_total)
        end
    end
  end

  defp event(s, {:checkin, ref, outcome}) do
    s |> emit({:demonitor, ref}) |> release(ref, outcome) |> dispatch() |> maybe_end_drain()
  end

  defp event(s, {:caller_down, ref}) do
    cond do
      # the channel cancels the dead caller's stream; its tool may go on running on the server
      Map.has_key?(s.leases, ref) ->
        s
        |> delete_regions(s.leases[ref].regions)
        |> release(ref, :abandoned)
        |> dispatch()
        |> maybe_end_drain()

      Map.has_key?(s.waiters, ref) ->
        %{s | queue: :queue.delete(ref, s.queue), queue_len: s.queue_len - 1}
        |> Map.update!(:waiters, &Map.delete(&1, ref))
        |> emit({:cancel_timer, {:queue_timeout, ref}})

      true ->
        s
    end
  end

  defp event(s, {:await_ready, from, min}) do
    min = if min == :all, do: slot_count(s), else: min

    cond do
      s.stopping != nil -> reply(s, from, {:error, stopped_error(s)})
      ready_count(s) >= min -> reply(s, from, :ok)
      s.start_error != nil -> reply(s, from, {:error, s.start_error})
      true -> %{s | ready_waiters: [{from, min} | s.ready_waiters]}
    end
  end

  defp event(%{stopping: %{} = st} = s, {:drain, from, _grace}),
    do: %{s | stopping: %{st | waiters: [from | st.waiters]}}

  defp event(s, {:drain, from, grace}) do
    grace = grace || s.config.shutdown_grace
    error = stopped_error(s)

    s =
      Enum.reduce(s.ready_waiters, s, fn {waiter, _min}, s ->
        reply(s, waiter, {:error, error})
      end)

    %{s | ready_waiters: []}
    |> log(:info, "snakepit pool #{inspect(s.name)}: stopping; in-flight calls get #{grace} ms")
    |> fail_waiters(error)
    |> emit({:timer, grace, :drain_deadline})
    |> Map.put(:stopping, %{grace: grace, waiters: [from], workers_stopped: false})
    |> maybe_end_drain()
  end

  defp event(s, {:forget_session, from, sid}) do
    {id, sessions} = Map.pop(s.sessions, sid)

    {channel, s} =
      case id && s.workers[id] do
        nil -> {nil, s}
        w -> {w.channel, put_worker(s, %{w | sessions: MapSet.delete(w.sessions, sid)})}
      end

    reply(%{s | sessions: sessions}, from, channel)
  end

  defp event(s, {:worker_spawn_failed, id, reason}) do
    case Map.pop(s.workers, id) do
      {nil, _} ->
        s

      {w, workers} ->
        message =
          case reason do
            {:spawn_failed, why} ->
              "cannot spawn worker #{id} (#{s.config.python_executable}): #{why}"

            other ->
              "cannot start worker #{id}: #{inspect(other)}"
          end

        slot = vacate(s.slots[w.slot], id)
        slot = %{slot | failures: slot.failures + 1}

        %{s | workers: workers}
        |> Map.update!(:stats, &Map.update!(&1, :workers_started, fn n -> n - 1 end))
        |> log(
          :error,
          "snakepit pool #{inspect(s.name)}: cannot start worker #{id}: #{inspect(reason)}"
        )
        |> put_slot(w.slot, slot)
        |> crashed(w, reason)
        |> start_failed(Error.new(:worker_start_failed, message))
        |> schedule_restart(w.slot, slot.failures)
        |> prune_slot(w.slot)
    end
  end

  defp event(s, {:worker_spawned, id, os_pid}) do
    case s.workers[id] do
      nil -> s
      w -> put_worker(s, %{w | os_pid: os_pid})
    end
  end

  defp event(%{stopping: %{}} = s, {:worker_ready, id, _info}) do
    case s.workers[id] do
      nil -> s
      w -> stop_worker(s, w)
    end
  end

  defp event(s, {:worker_ready, id, info}) do
    case s.workers[id] do
      nil ->
        s

      w ->
        w = %{
          w
          | status: :ready,
            channel: info.channel,
            os_pid: info.os_pid,
            port: info.port,
            uds: Map.get(info, :uds),
            endpoint: Map.get(info, :endpoint),
            capacity: Map.get(info, :capacity, w.capacity),
            server_slots: Map.get(info, :capacity, w.server_slots)
        }

        s = put_worker(s, w)
        slot = s.slots[w.slot]

        s =
          if slot.pending == id do
            old = slot.current
            s = put_slot(s, w.slot, %{slot | current: id, pending: nil, failures: 0})

            case old && s.workers[old] do
              nil -> s
              %{status: :unhealthy} = ow -> stop_worker(s, ow)
              ow -> s |> put_worker(%{ow | status: :draining}) |> maybe_stop(old)
            end
          else
            put_slot(s, w.slot, %{slot | failures: 0})
          end

        {ttl, s} = schedule_ttl(s, id)

        %{s | ever_ready: true, start_error: nil}
        |> put_worker(%{s.workers[id] | ttl_ms: ttl})
        |> schedule_health_check(id)
        |> log(
          :debug,
          "snakepit pool #{inspect(s.name)}: worker #{w.id} ready (os pid #{info.os_pid}, #{listens_on(w)})"
        )
        |> worker_telemetry(:start, w, %{reason: w.start_reason}, %{
          duration: native(s.now - w.started_at)
        })
        |> notify_ready()
        |> dispatch()
    end
  end

  # Its server drains on its own (SIGTERM from outside, a server shutting down): no new call goes
  # there; the calls on it finish (their checkins count as usual); it exits after the last one and
  # is replaced then, as a worker that went down (a session pinned to it moves on its next call).
  defp event(s, {:worker_draining, id}) do
    case s.workers[id] do
      %{} = w ->
        if routable?(w) do
          s
          |> log(
            :info,
            "snakepit pool #{inspect(s.name)}: worker #{w.id} (os pid #{inspect(w.os_pid)}) is shutting down " <>
              "(its server sent GOAWAY); it takes no new call, #{w.in_flight} in flight finish there"
          )
          |> put_worker(%{w | status: :server_draining})
          # session callers waiting for it may now go to other workers
          |> dispatch()
        else
          s
        end

      nil ->
        s
    end
  end

  defp event(%{stopping: %{}} = s, {:worker_exited, id, _reason}) do
    %{s | workers: Map.delete(s.workers, id)}
    |> delete_regions(orphan_regions(s, id))
    |> forget_fate(id)
    |> maybe_end_drain()
  end

  defp event(s, {:worker_exited, id, reason}) do
    case Map.pop(s.workers, id) do
      {nil, _} ->
        s

      {w, workers} ->
        # its sessions move to whichever worker serves them next (and are created there again)
        sessions = Map.reject(s.sessions, fn {_sid, wid} -> wid == id end)
        # nothing of it writes regions any more
        s = delete_regions(%{s | workers: workers, sessions: sessions}, w.orphan_regions)

        s =
          if w.status in [:draining, :stopping] do
            slot = s.slots[w.slot]
            slot = if slot.current == id, do: %{slot | current: nil}, else: slot

            s
            |> log(:debug, "snakepit pool #{inspect(s.name)}: worker #{w.id} recycled")
            |> put_slot(w.slot, slot)
            |> then(fn s ->
              if slot.current == nil and slot.pending == nil,
                do: schedule_start(s, w.slot, 0),
                else: s
            end)
          else
            s =
              s
              |> log(
                :warning,
                "snakepit pool #{inspect(s.name)}: worker #{w.id} (os pid #{inspect(w.os_pid)}) went down: #{inspect(reason)}"
              )
              |> crashed(w, reason)

            s = if w.status == :starting, do: start_failed(s, start_error(w, reason)), else: s
            slot = s.slots[w.slot]
            slot = vacate(%{slot | failures: slot.failures + 1}, id)
            s = put_slot(s, w.slot, slot)

            if slot.pending == nil,
              do: schedule_restart(s, w.slot, slot.failures),
              else: s
          end

        s |> forget_fate(id) |> prune_slot(w.slot) |> dispatch()
    end
  end

  defp event(%{stopping: %{workers_stopped: false} = st} = s, :drain_deadline) do
    message =
      "pool #{inspect(s.name)} was stopped: the call was still running after the #{st.grace} ms grace period"

    s
    |> record_busy_fates(:pool_stopped, message)
    |> stop_all_workers()
  end

  defp event(s, :drain_deadline), do: s

  defp event(%{stopping: %{waiters: [_ | _]} = st} = s, :drain_give_up) do
    s =
      log(
        s,
        :error,
        "snakepit pool #{inspect(s.name)}: #{map_size(s.workers)} workers still running after the drain"
      )

    s = Enum.reduce(st.waiters, s, &reply(&2, &1, :ok))
    %{s | stopping: %{st | waiters: []}}
  end

  defp event(s, :drain_give_up), do: s

  defp event(%{stopping: %{}} = s, {:start_worker, _slot}), do: s

  defp event(s, {:start_worker, slot}) do
    case s.slots[slot] do
      %{removed: false} = st ->
        s |> put_slot(slot, %{st | scheduled: false}) |> start_worker(slot, :restart)

      %{} = st ->
        s |> put_slot(slot, %{st | scheduled: false}) |> prune_slot(slot)

      nil ->
        s
    end
  end

  defp event(%{stopping: %{}} = s, {:add_slot, _slot}), do: s

  defp event(s, {:add_slot, slot}) do
    if Map.has_key?(s.slots, slot),
      do: s,
      else: s |> put_slot(slot, new_slot()) |> start_worker(slot, :initial)
  end

  # The endpoint went away (DNS no longer has it): its workers take no new call and stop once
  # their calls end; sessions on them move on their next call.
  defp event(s, {:remove_slot, slot_id}) do
    case s.slots[slot_id] do
      %{removed: false} = slot ->
        s = put_slot(s, slot_id, %{slot | removed: true})

        s.workers
        |> Map.values()
        |> Enum.filter(&(&1.slot == slot_id))
        |> Enum.reduce(s, fn w, s ->
          case w.status do
            :stopping -> s
            :starting -> stop_worker(s, w)
            _ -> s |> put_worker(%{w | status: :draining}) |> maybe_stop(w.id)
          end
        end)
        |> prune_slot(slot_id)
        |> dispatch()

      _ ->
        s
    end
  end

  # A remote endpoint's Health/Watch: NOT_SERVING takes it out of rotation at once (its calls in
  # flight go on), SERVING puts it back.
  defp event(s, {:worker_serving, id, false}) do
    case s.workers[id] do
      %{status: st} = w when st in [:ready, :retiring] ->
        s
        |> log(
          :info,
          "snakepit pool #{inspect(s.name)}: worker #{w.id} (#{w.endpoint}) is NOT_SERVING; " <>
            "out of rotation, #{w.in_flight} in flight go on"
        )
        |> put_worker(%{w | status: :not_serving, status_before: st})
        |> dispatch()

      _ ->
        s
    end
  end

  defp event(s, {:worker_serving, id, true}) do
    case s.workers[id] do
      %{status: :not_serving} = w ->
        s
        |> log(
          :info,
          "snakepit pool #{inspect(s.name)}: worker #{w.id} (#{w.endpoint}) is SERVING again"
        )
        |> put_worker(%{w | status: w.status_before})
        |> notify_ready()
        |> dispatch()

      _ ->
        s
    end
  end

  defp event(%{stopping: %{}} = s, {:ttl_expired, _id}), do: s

  defp event(s, {:ttl_expired, id}) do
    case s.workers[id] do
      %{status: :ready} = w -> retire(s, w, :ttl)
      _ -> s
    end
  end

  defp event(%{stopping: %{}} = s, {:health_check, _id}), do: s

  defp event(s, {:health_check, id}) do
    case routable_worker(s, id) do
      nil ->
        # out of rotation for now (NOT_SERVING): checked again once back
        if match?(%{status: :not_serving}, s.workers[id]),
          do: schedule_health_check(s, id),
          else: s

      w ->
        kind = if w.abandoned == [], do: :health, else: :active_calls
        s |> schedule_health_check(id) |> start_check(w, kind)
    end
  end

  defp event(s, {:stuck_call_check, id}) do
    case routable_worker(s, id) do
      %{abandoned: [_ | _]} = w -> start_check(s, w, :active_calls)
      _ -> s
    end
  end

  defp event(s, {:check_result, id, check_ref, result}) do
    case s.workers[id] do
      %{check: %{ref: ^check_ref} = check} = w ->
        w = %{w | check: nil}
        s = put_worker(s, w)

        s =
          cond do
            not routable?(w) -> s
            result == :ok -> s
            match?({:ok, _}, result) -> settle_abandoned(s, w, elem(result, 1), check)
            true -> unhealthy(s, w, check_failure(check.kind, elem(result, 1)))
          end

        # a stuck-call check asked for while this one ran
        s =
          case routable_worker(s, id) do
            %{check_again: true} = w ->
              w = %{w | check_again: false}
              start_check(put_worker(s, w), w, :active_calls)

            _ ->
              s
          end

        dispatch(s)

      _ ->
        s
    end
  end

  defp event(s, {:queue_timeout, ref}) do
    case Map.pop(s.waiters, ref) do
      {nil, _} ->
        s

      {waiter, waiters} ->
        error =
          Error.new(
            :queue_timeout,
            "pool #{inspect(s.name)}: no free slot within #{waiter.wait} ms"
          )

        %{
          s
          | waiters: waiters,
            queue: :queue.delete(ref, s.queue),
            queue_len: s.queue_len - 1
        }
        |> emit({:demonitor, ref})
        |> reply(waiter.from, {:error, error})
        |> bump(:queue_timeouts)
    end
  end

  defp event(s, :terminating),
    do: record_busy_fates(s, :pool_stopped, "pool #{inspect(s.name)} was stopped during the call")

  ## workers

  defp start_worker(s, slot_id, reason) do
    id = s.next_id
    {max_requests, s} = draw_max_requests(s)

    w = %{
      id: id,
      slot: slot_id,
      status: :starting,
      channel: nil,
      os_pid: nil,
      # where its server listens: a TCP port or a Unix socket path (the other is nil)
      port: nil,
      uds: nil,
      # a remote worker's endpoint ("host:port", "unix:/path"); nil for a worker the pool started
      endpoint: nil,
      # what a :not_serving worker returns to when SERVING again
      status_before: nil,
      in_flight: 0,
      # tool calls the server counts for the leases in flight (a batch counts its items)
      load: 0,
      # when calls the caller gave up on were checked in (oldest first), while the server may
      # still run them; each keeps a slot (see "Stuck calls" in Snakepit.Pool)
      abandoned: [],
      # the region prefixes of those calls: deleted once none is running (their tools may still
      # write result regions)
      orphan_regions: [],
      stuck_calls: 0,
      # the check in flight, %{ref, kind, load, sent_at}, and whether another is wanted after it
      check: nil,
      check_again: false,
      # calls the pool routes to it at once (a process worker's beyond the first wait in its
      # server's queue: pipelining), and how many of them its server runs at once
      capacity: capacity(s.config),
      server_slots: server_slots(s.config),
      requests: 0,
      # its jittered worker_max_requests
      max_requests: max_requests,
      ttl_ms: nil,
      sessions: MapSet.new(),
      started_at: s.now,
      # :initial, :replacement or :restart (see Snakepit.Telemetry, [:snakepit, :worker, :start])
      start_reason: reason
    }

    slot = s.slots[slot_id]

    slot =
      if slot.current != nil and Map.has_key?(s.workers, slot.current),
        do: %{slot | pending: id},
        else: %{slot | current: id}

    %{s | next_id: id + 1, workers: Map.put(s.workers, id, w)}
    |> put_slot(slot_id, slot)
    |> bump(:workers_started)
    |> emit({:start_worker, id})
  end

  # A worker went down without the pool asking it: counted for the pool and its slot.
  defp crashed(s, w, reason) do
    exit_status =
      case reason do
        {:shutdown, {:python_exited, status}} -> status
        _ -> nil
      end

    s
    |> bump(:crashes)
    |> put_slot(w.slot, Map.update!(s.slots[w.slot], :crashes, &(&1 + 1)))
    |> worker_telemetry(:crash, w, %{
      reason: reason,
      exit_status: exit_status,
      status: w.status,
      requests: w.requests
    })
  end

  # A replacement on purpose: `recycles` (pool and slot) for TTL and max requests.
  defp count_recycle(s, _w, :stuck_calls), do: bump(s, :stuck_replacements)

  defp count_recycle(s, w, _why) do
    s
    |> bump(:recycles)
    |> put_slot(w.slot, Map.update!(s.slots[w.slot], :recycles, &(&1 + 1)))
  end

  # A `[:snakepit, :worker, kind]` event about `w`; :recycle and :crash measure its uptime.
  defp worker_telemetry(s, kind, w, metadata, measurements \\ nil) do
    measurements = measurements || %{uptime: native(s.now - w.started_at)}

    metadata =
      Map.merge(
        %{pool: s.name, worker: w.id, slot: w.slot, os_pid: w.os_pid, port: w.port, uds: w.uds},
        metadata
      )

    emit(s, {:telemetry, [:snakepit, :worker, kind], measurements, metadata})
  end

  defp native(ms), do: System.convert_time_unit(ms, :millisecond, :native)

  defp listens_on(%{uds: path}) when is_binary(path), do: "socket #{path}"
  defp listens_on(w), do: "port #{w.port}"

  # The slot without worker `id` (it is gone or never started).
  defp vacate(slot, id) do
    cond do
      slot.pending == id -> %{slot | pending: nil}
      slot.current == id -> %{slot | current: nil}
      true -> slot
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
    s = Enum.reduce(s.ready_waiters, s, fn {from, _min}, s -> reply(s, from, {:error, error}) end)
    s = %{s | start_error: error, ready_waiters: []}

    if ready_count(s) == 0, do: fail_waiters(s, error), else: s
  end

  # Fails every queued caller with `error`.
  defp fail_waiters(s, error) do
    s =
      Enum.reduce(s.waiters, s, fn {ref, waiter}, s ->
        s
        |> emit({:cancel_timer, {:queue_timeout, ref}})
        |> emit({:demonitor, ref})
        |> reply(waiter.from, {:error, error})
      end)

    %{s | waiters: %{}, queue: :queue.new(), queue_len: 0}
  end

  # The restart of a slot after its `failures`-th failure in a row: the local backoff; for a
  # remote endpoint a jittered one (Snakepit.Remote.Backoff), so many pools do not reconnect at once.
  defp schedule_restart(%{config: %{worker_profile: :remote}} = s, slot_id, failures) do
    {delay, rand} =
      Snakepit.Remote.Backoff.delay(failures, @backoff_base, s.config.restart_backoff_max, s.rand)

    schedule_start(%{s | rand: rand}, slot_id, delay)
  end

  defp schedule_restart(s, slot_id, failures),
    do: schedule_start(s, slot_id, backoff(failures, s.config.restart_backoff_max))

  # A removed slot is forgotten once no worker of it is left.
  defp prune_slot(s, slot_id) do
    case s.slots[slot_id] do
      %{removed: true} ->
        if Enum.any?(s.workers, fn {_id, w} -> w.slot == slot_id end),
          do: s,
          else: %{s | slots: Map.delete(s.slots, slot_id)}

      _ ->
        s
    end
  end

  # The slots that are to have a worker: pool_size, or a remote pool's endpoints now.
  defp slot_count(s), do: Enum.count(s.slots, fn {_id, slot} -> not slot.removed end)

  defp schedule_start(%{slots: slots} = s, slot_id, _delay)
       when not is_map_key(slots, slot_id),
       do: s

  defp schedule_start(s, slot_id, delay) do
    slot = s.slots[slot_id]

    if slot.scheduled or slot.removed,
      do: s,
      else:
        s
        |> emit({:schedule, delay, {:start_worker, slot_id}})
        |> put_slot(slot_id, %{slot | scheduled: true})
  end

  # Calls a worker of this config is given at once: a thread worker's threads; a process worker's
  # server runs one call and queues the others, process_pipeline_depth in all.
  # (a remote endpoint's, when read from the server, comes with its worker_ready)
  defp capacity(%{worker_profile: :process} = config), do: config.process_pipeline_depth
  defp capacity(config), do: server_slots(config)

  defp server_slots(%{threads_per_worker: :from_server}), do: 1
  defp server_slots(config), do: config.threads_per_worker

  # A new worker's worker_max_requests, lowered by a random fraction below max_requests_jitter (so
  # workers started together do not all reach it together); never below 1.
  defp draw_max_requests(%{config: %{worker_max_requests: :infinity}} = s), do: {:infinity, s}

  defp draw_max_requests(s) do
    {x, rand} = :rand.uniform_s(s.rand)
    limit = s.config.worker_max_requests * (1.0 - x * s.config.max_requests_jitter)
    {max(round(limit), 1), %{s | rand: rand}}
  end

  # The worker's jittered TTL in ms (or :infinity), and its expiry scheduled.
  defp schedule_ttl(%{config: %{worker_ttl: :infinity}} = s, _id), do: {:infinity, s}

  defp schedule_ttl(s, id) do
    {x, rand} = :rand.uniform_s(s.rand)
    ttl = max(round(s.config.worker_ttl * (1.0 - x * s.config.ttl_jitter)), 1)
    {ttl, emit(%{s | rand: rand}, {:schedule, ttl, {:ttl_expired, id}})}
  end

  # Starts the replacement of the slot's current worker `w` (once: not when one is already
  # starting or scheduled).
  defp start_replacement(s, w) do
    slot = s.slots[w.slot]

    if slot.pending == nil and not slot.scheduled and slot.current == w.id,
      do: start_worker(s, w.slot, :replacement),
      else: s
  end

  # Starts the replacement (once) and stops routing to `w`: when the replacement is ready, or for
  # :max_requests at once when another worker has a free slot for the calls it would take. When
  # none has (`w` is the last worker taking calls, or the others are busy: a loaded pool) it serves
  # on until its replacement is ready, so a recycle never takes capacity from a pool that needs it;
  # each call it takes past its limit asks again.
  defp retire(s, w, why) do
    already? = w.status in [:retiring, :draining, :stopping, :unhealthy]

    s =
      cond do
        already? ->
          s

        true ->
          s
          |> count_recycle(w, why)
          |> worker_telemetry(:recycle, w, %{reason: why, requests: w.requests})
          |> log(
            :info,
            "snakepit pool #{inspect(s.name)}: recycling worker #{w.id} (#{why}, #{w.requests} requests)"
          )
      end

    s = start_replacement(s, w)

    cond do
      why == :max_requests and routable?(w) and another_free?(s, w.id) ->
        s |> put_worker(%{w | status: :draining}) |> maybe_stop(w.id)

      # :ttl, :stuck_calls, the last routable worker: it serves what it can until its
      # replacement is ready
      w.status == :ready ->
        put_worker(s, %{w | status: :retiring})

      true ->
        s
    end
  end

  defp schedule_health_check(%{config: %{health_check_interval: :infinity}} = s, _id), do: s

  defp schedule_health_check(s, id),
    do: emit(s, {:schedule, s.config.health_check_interval, {:health_check, id}})

  # Asks the worker's server one `Snakepit.Worker.Health` question; the answer (or, past the
  # timeout, a failure) comes back as {:check_result, id, ref, result}. One check per worker at a
  # time: one asked for meanwhile runs after it.
  defp start_check(s, %{check: %{}} = w, :active_calls),
    do: put_worker(s, %{w | check_again: true})

  defp start_check(s, %{check: %{}}, :health), do: s

  defp start_check(s, w, kind) do
    ref = s.next_check
    timeout = s.config.health_check_timeout
    late = {:error, "no answer within #{timeout} ms"}
    check = %{ref: ref, kind: kind, load: w.load, sent_at: s.now}

    %{s | next_check: ref + 1}
    |> emit({:check, w.id, ref, kind, w.channel, timeout})
    |> emit({:schedule, timeout + 1_000, {:check_result, w.id, ref, late}})
    |> put_worker(%{w | check: check})
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

    # none of its abandoned calls runs any more: the results they wrote can go
    {w, s} =
      if w.abandoned == [],
        do: {%{w | orphan_regions: []}, delete_regions(s, w.orphan_regions)},
        else: {w, s}

    s = put_worker(s, w)

    if stuck > 0 and stuck >= min(s.config.max_stuck_calls, w.server_slots) do
      s
      |> log(
        :warning,
        "snakepit pool #{inspect(s.name)}: worker #{w.id} (os pid #{w.os_pid}) has #{stuck} calls " <>
          "still running more than #{grace} ms after their callers gave up; replacing it"
      )
      |> retire(w, :stuck_calls)
      |> cut_off_calls_behind_stuck(w.id)
    else
      s
    end
  end

  # Stuck calls hold every slot of the worker's server, so the calls in flight on it wait in its
  # queue behind them (pipelined on a process worker) and may never run. Like a worker that failed
  # a health check, it is then stopped once its replacement is ready, and those calls fail saying
  # why instead of waiting for their deadlines.
  defp cut_off_calls_behind_stuck(s, id) do
    case s.workers[id] do
      %{status: :retiring, in_flight: n, stuck_calls: stuck, server_slots: slots} = w
      when n > 0 and stuck >= slots ->
        message =
          "worker #{w.id} (os pid #{w.os_pid}) was replaced: every slot of its server was held by " <>
            "a call its caller had given up on, and this call waited behind it"

        s
        |> emit({:record_fate, id, :worker_unhealthy, message})
        |> put_worker(%{w | status: :unhealthy})

      _ ->
        s
    end
  end

  # Takes `w` out of service: records why for its callers, starts its replacement, and stops it
  # when the replacement is ready (at once when no call is in flight on it).
  defp unhealthy(s, w, why) do
    message = "worker #{w.id} (os pid #{w.os_pid}) #{why} and was replaced"

    s
    |> log(:warning, "snakepit pool #{inspect(s.name)}: #{message}")
    |> emit({:record_fate, w.id, :worker_unhealthy, message})
    |> start_replacement(w)
    |> bump(:unhealthy_replacements)
    |> worker_telemetry(:recycle, w, %{
      reason: :unhealthy,
      requests: w.requests,
      message: message
    })
    |> put_worker(%{w | status: :unhealthy})
    |> maybe_stop(w.id)
  end

  # Draining: once no call is in flight, stop the workers; once they are gone, answer drain/2.
  defp maybe_end_drain(%{stopping: %{workers_stopped: false}} = s) do
    if map_size(s.leases) == 0, do: stop_all_workers(s), else: s
  end

  defp maybe_end_drain(%{stopping: %{workers_stopped: true, waiters: [_ | _]} = st} = s) do
    if map_size(s.workers) == 0 do
      s = Enum.reduce(st.waiters, s, &reply(&2, &1, :ok))
      %{s | stopping: %{st | waiters: []}}
    else
      s
    end
  end

  defp maybe_end_drain(s), do: s

  defp stop_all_workers(%{stopping: st} = s) do
    s =
      s
      |> emit({:cancel_timer, :drain_deadline})
      |> emit({:schedule, s.config.shutdown_grace + 5_000, :drain_give_up})

    s = Enum.reduce(Map.values(s.workers), s, &stop_worker(&2, &1))
    maybe_end_drain(%{s | stopping: %{st | workers_stopped: true}})
  end

  defp stop_worker(s, %{status: :stopping}), do: s

  defp stop_worker(s, w),
    do: s |> emit({:stop_worker, w.id}) |> put_worker(%{w | status: :stopping})

  defp maybe_stop(s, id) do
    case s.workers[id] do
      %{status: st, in_flight: 0} = w when st in [:draining, :unhealthy] -> stop_worker(s, w)
      _ -> s
    end
  end

  defp stopped_error(s), do: Error.new(:pool_stopped, "pool #{inspect(s.name)} is stopping")

  defp record_busy_fates(s, reason, message) do
    s.workers
    |> Enum.filter(fn {_id, w} -> w.in_flight > 0 end)
    |> Enum.reduce(s, fn {id, _w}, s -> emit(s, {:record_fate, id, reason, message}) end)
  end

  # A fate is kept while a lease on its worker may still read it.
  defp forget_fate(s, id) do
    if not Map.has_key?(s.workers, id) and
         not Enum.any?(s.leases, fn {_ref, lease} -> lease.worker == id end),
       do: emit(s, {:forget_fate, id}),
       else: s
  end

  ## capacity, sessions and the queue

  # Slots taken: calls in flight, and abandoned calls the server may still be running. When those
  # may hold every slot its server runs calls in (a process worker's one), the worker is full: a
  # call pipelined behind them would wait for calls nobody waits for.
  defp busy(w) do
    taken = w.in_flight + length(w.abandoned)
    if length(w.abandoned) >= w.server_slots, do: max(taken, w.capacity), else: taken
  end

  # Calls it can take while it is routable: its capacity, less the slots stuck calls hold (none
  # when they hold all its server's).
  defp usable_capacity(w),
    do: if(w.stuck_calls >= w.server_slots, do: 0, else: w.capacity - w.stuck_calls)

  defp another_free?(s, id),
    do: Enum.any?(s.workers, fn {other, w} -> other != id and free?(w) end)

  defp free?(w), do: routable?(w) and busy(w) < w.capacity

  defp routable_worker(s, id) do
    case s.workers[id] do
      nil -> nil
      w -> if routable?(w), do: w, else: nil
    end
  end

  defp ready_count(s), do: Enum.count(s.workers, fn {_id, w} -> routable?(w) end)

  # The session's worker while it is routable (when busy, or while the call creating the session
  # there is out, the caller waits for it: a call that skips the initialisation could reach the
  # server before it); else the least-loaded worker with a free slot.
  defp pick(s, session_id) do
    pinned = session_id && Map.get(s.sessions, session_id)

    case pinned && routable_worker(s, pinned) do
      nil ->
        pick_any(s)

      w ->
        if free?(w) and not MapSet.member?(s.sessions_being_created, session_id),
          do: {:ok, pinned},
          else: :none
    end
  end

  # Least outstanding calls weighted by capacity: the lowest busy/capacity (compared as
  # busy * other capacity, no floats); with equal capacities, the least busy.
  defp pick_any(s) do
    Enum.reduce(s.workers, nil, fn {id, w}, best ->
      cond do
        not free?(w) -> best
        best == nil -> {id, busy(w), w.capacity}
        busy(w) * elem(best, 2) < elem(best, 1) * w.capacity -> {id, busy(w), w.capacity}
        true -> best
      end
    end)
    |> case do
      nil -> :none
      {id, _, _} -> {:ok, id}
    end
  end

  # Hands worker `id` to the caller. A session is pinned to it; when the session is new there and
  # the caller creates sessions, it counts as created from now on (so a concurrent call of the same
  # session does not create it again) unless the caller reports `session_init_failed`.
  defp lease(s, id, ref, from, request) do
    w = s.workers[id]
    sid = request.session_id
    init? = sid != nil and not MapSet.member?(w.sessions, sid)
    creates? = init? and request.create_session
    sessions = if creates?, do: MapSet.put(w.sessions, sid), else: w.sessions
    # a check in flight may see this call on the server: it must know of it
    check = w.check && %{w.check | load: w.check.load + request.weight}

    w = %{
      w
      | in_flight: w.in_flight + 1,
        load: w.load + request.weight,
        check: check,
        requests: w.requests + 1,
        sessions: sessions
    }

    record = %{
      worker: id,
      weight: request.weight,
      session_id: sid,
      creates_session: creates?,
      regions: Map.get(request, :regions, [])
    }

    # a waiter has `queued_at`; a caller served at once waited 0 ms
    waited = s.now - Map.get(request, :queued_at, s.now)
    s = put_worker(s, w) |> record_queue_wait(waited)
    s = if sid, do: %{s | sessions: Map.put(s.sessions, sid, id)}, else: s

    s =
      if creates?,
        do: %{s | sessions_being_created: MapSet.put(s.sessions_being_created, sid)},
        else: s

    s = %{s | leases: Map.put(s.leases, ref, record)} |> bump(:checkouts)

    s =
      if w.max_requests != :infinity and w.requests >= w.max_requests,
        do: retire(s, w, :max_requests),
        else: s

    lease = %{
      ref: ref,
      pool_name: s.name,
      worker_id: id,
      channel: w.channel,
      init_session: init?,
      call_timeout: s.config.call_timeout,
      os_pid: w.os_pid,
      port: w.port,
      uds: w.uds,
      queued: Map.has_key?(request, :queued_at)
    }

    emit(s, {:lease, from, lease})
  end

  defp record_queue_wait(s, ms) do
    stats = %{
      s.stats
      | queue_wait_total_ms: s.stats.queue_wait_total_ms + ms,
        queue_wait_max_ms: max(s.stats.queue_wait_max_ms, ms)
    }

    %{s | stats: stats}
  end

  defp release(s, ref, outcome) do
    case Map.pop(s.leases, ref) do
      {nil, _} ->
        s

      {lease, leases} ->
        s = %{s | leases: leases} |> bump(:calls)

        s =
          if lease.creates_session,
            do: %{
              s
              | sessions_being_created: MapSet.delete(s.sessions_being_created, lease.session_id)
            },
            else: s

        s = if outcome == :ok, do: s, else: bump(s, :failures)

        case s.workers[lease.worker] do
          nil ->
            forget_fate(s, lease.worker)

          w ->
            # the session this lease was to create was not created after all
            sessions =
              case outcome do
                {:session_init_failed, _} when lease.creates_session ->
                  MapSet.delete(w.sessions, lease.session_id)

                _ ->
                  w.sessions
              end

            w = %{w | in_flight: w.in_flight - 1, load: w.load - lease.weight, sessions: sessions}

            s =
              if outcome == :abandoned,
                do: abandon(s, w, lease.weight, lease.regions),
                else: put_worker(s, w)

            maybe_stop(s, w.id)
        end
    end
  end

  # The caller gave up on a call of `weight` tool calls: they keep their slots until a check of the
  # server shows them ended. Checks soon and more rarely after (a tool that honours cancellation
  # ends within milliseconds, one that polls for it within its polling period), and once
  # `stuck_call_grace` has passed.
  # Its shared-memory regions are deleted once no abandoned call runs there.
  defp abandon(s, w, weight, regions) do
    w = %{
      w
      | abandoned: w.abandoned ++ List.duplicate(s.now, min(weight, w.server_slots)),
        orphan_regions: regions ++ w.orphan_regions
    }

    grace = s.config.stuck_call_grace

    Enum.filter(@stuck_check_delays, &(&1 < grace))
    |> Kernel.++([grace + 10])
    |> Enum.reduce(put_worker(s, w), fn delay, s ->
      emit(s, {:schedule, delay, {:stuck_call_check, w.id}})
    end)
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

      {{:value, ref}, rest} ->
        waiter = s.waiters[ref]

        case pick(s, waiter.session_id) do
          {:ok, id} ->
            s =
              s
              |> emit({:cancel_timer, {:queue_timeout, ref}})
              |> lease(id, ref, waiter.from, waiter)
              |> Map.update!(:waiters, &Map.delete(&1, ref))

            if pick_any(s) == :none,
              do: finish_dispatch(s, rest, skipped),
              else: dispatch_loop(s, rest, skipped)

          :none ->
            dispatch_loop(s, rest, [ref | skipped])
        end
    end
  end

  defp finish_dispatch(s, rest, skipped) do
    queue = :queue.join(:queue.from_list(Enum.reverse(skipped)), rest)
    %{s | queue: queue, queue_len: :queue.len(queue)}
  end

  defp notify_ready(s) do
    n = ready_count(s)
    {done, waiting} = Enum.split_with(s.ready_waiters, fn {_from, min} -> n >= min end)
    s = Enum.reduce(done, s, fn {from, _}, s -> reply(s, from, :ok) end)
    %{s | ready_waiters: waiting}
  end

  ## plumbing

  defp emit(s, action), do: %{s | actions: [action | s.actions]}
  defp reply(s, from, reply), do: emit(s, {:reply, from, reply})
  defp log(s, level, message), do: emit(s, {:log, level, message})
  defp flush(s), do: {%{s | actions: []}, Enum.reverse(s.actions)}

  defp put_worker(s, w), do: %{s | workers: Map.put(s.workers, w.id, w)}

  defp delete_regions(s, []), do: s
  defp delete_regions(s, prefixes), do: emit(s, {:delete_regions, prefixes})

  defp orphan_regions(s, id) do
    case s.workers[id] do
      nil -> []
      w -> w.orphan_regions
    end
  end

  defp put_slot(s, id, slot), do: %{s | slots: Map.put(s.slots, id, slot)}
  defp bump(s, key), do: %{s | stats: Map.update!(s.stats, key, &(&1 + 1))}
end
