defmodule Snakepit.PoolStateTest do
  # The pool's state machine alone: events in, actions out. No Python, no processes, no clock.
  use ExUnit.Case, async: true

  alias Snakepit.{Config, Error}
  alias Snakepit.Pool.State

  @t0 1_000_000

  ## helpers

  # One call at a time per process worker and no jitter unless a test says otherwise: most tests
  # here are about slots, and are easier to read with one per worker.
  defp config(overrides) do
    Config.new!(
      Map.merge(
        %{
          name: :sm,
          pool_size: 2,
          health_check_interval: :infinity,
          ttl_jitter: 0,
          max_requests_jitter: 0,
          process_pipeline_depth: 1
        },
        Map.new(overrides)
      )
    )
  end

  # A pool whose workers have all been started (not yet ready).
  defp new_pool(overrides) do
    {s, actions} = State.new(config(overrides), @t0, seed: :rand.seed_s(:exsss, 1))
    n = s.config.pool_size
    assert for({:start_worker, id} <- actions, do: id) == Enum.to_list(1..n)
    s
  end

  # A pool whose workers 1..pool_size are all ready.
  defp ready_pool(overrides \\ []) do
    s = new_pool(overrides)
    Enum.reduce(1..s.config.pool_size, s, fn id, s -> elem(ready(s, id), 0) end)
  end

  defp ev(s, event, now \\ @t0), do: State.handle(s, event, now)

  defp ready(s, id),
    do: ev(s, {:worker_ready, id, %{channel: channel(id), os_pid: 100 + id, port: 5000 + id}})

  defp channel(id), do: :"channel_#{id}"

  # A checkout; returns the new state, its actions and the caller's ref (its lease's ref).
  defp checkout(s, opts \\ []) do
    ref = make_ref()

    request = %{
      session_id: opts[:session],
      weight: Keyword.get(opts, :weight, 1),
      create_session: Keyword.get(opts, :create_session, true)
    }

    request = if opts[:regions], do: Map.put(request, :regions, opts[:regions]), else: request

    {s, actions} = ev(s, {:checkout, ref, {:caller, ref}, request}, Keyword.get(opts, :now, @t0))
    {s, actions, ref}
  end

  defp lease!(actions, ref) do
    case for({:lease, {:caller, ^ref}, lease} <- actions, do: lease) do
      [lease] ->
        lease

      other ->
        flunk("expected one lease for the caller, got #{inspect(other)} in #{inspect(actions)}")
    end
  end

  defp leased?(actions, ref), do: Enum.any?(actions, &match?({:lease, {:caller, ^ref}, _}, &1))

  defp error!(actions, ref) do
    [%Error{} = e] = for {:reply, {:caller, ^ref}, {:error, e}} <- actions, do: e
    e
  end

  defp replies(actions, from), do: for({:reply, ^from, reply} <- actions, do: reply)
  defp stats(s), do: State.stats(s, @t0)
  defp status(s, id), do: s.workers[id].status
  defp stopped?(actions, id), do: {:stop_worker, id} in actions
  defp started(actions), do: for({:start_worker, id} <- actions, do: id)

  ## capacity

  test "a call goes to the least-loaded ready worker; with every slot busy the caller waits" do
    s = ready_pool()
    {s, a1, r1} = checkout(s)
    {s, a2, r2} = checkout(s)
    assert Enum.sort([lease!(a1, r1).worker_id, lease!(a2, r2).worker_id]) == [1, 2]

    {s, a3, r3} = checkout(s)
    refute leased?(a3, r3)
    assert {:timer, 5_000, {:queue_timeout, r3}} in a3
    assert %{queued: 1, in_flight: 2, capacity: 2, queued_total: 1} = stats(s)
  end

  test "a freed slot goes to the oldest waiter" do
    s = ready_pool(pool_size: 1)
    {s, a1, r1} = checkout(s)
    lease = lease!(a1, r1)
    {s, _, r2} = checkout(s)
    {s, _, r3} = checkout(s)

    {s, actions} = ev(s, {:checkin, r1, :ok})
    assert {:demonitor, r1} in actions
    assert lease!(actions, r2).worker_id == lease.worker_id
    assert {:cancel_timer, {:queue_timeout, r2}} in actions
    refute leased?(actions, r3)
    assert %{queued: 1, calls: 1, failures: 0} = stats(s)
  end

  test "a thread worker takes threads_per_worker calls at once" do
    s = ready_pool(worker_profile: :thread, pool_size: 1, threads_per_worker: 3)
    assert stats(s).capacity == 3

    s =
      Enum.reduce(1..3, s, fn _, s ->
        {s, actions, ref} = checkout(s)
        assert leased?(actions, ref)
        s
      end)

    {_s, actions, ref} = checkout(s)
    refute leased?(actions, ref)
  end

  ## pipelining on process workers

  test "a process worker takes process_pipeline_depth calls (default 2), but only once every worker has one" do
    s = ready_pool(process_pipeline_depth: Config.new!(name: :x).process_pipeline_depth)
    assert %{capacity: 4} = stats(s)
    assert Enum.all?(stats(s).workers, &(&1.capacity == 2))

    {s, a1, r1} = checkout(s)
    {s, a2, r2} = checkout(s)
    # least-loaded first: the idle worker before a second call on the busy one
    assert Enum.sort([lease!(a1, r1).worker_id, lease!(a2, r2).worker_id]) == [1, 2]
    {s, a3, r3} = checkout(s)
    {s, a4, r4} = checkout(s)
    assert Enum.sort([lease!(a3, r3).worker_id, lease!(a4, r4).worker_id]) == [1, 2]

    {s, a5, r5} = checkout(s)
    refute leased?(a5, r5)
    assert %{in_flight: 4, queued: 1} = stats(s)

    # a call ends on worker 1: the waiter is pipelined there
    w1 = if lease!(a1, r1).worker_id == 1, do: r1, else: r2
    {_s, actions} = ev(s, {:checkin, w1, :ok})
    assert lease!(actions, r5).worker_id == 1
  end

  test "process_pipeline_depth 1 gives a process worker one call at a time; thread workers ignore it" do
    s = ready_pool(pool_size: 1, process_pipeline_depth: 1)
    {s, _, _} = checkout(s)
    {_s, actions, r2} = checkout(s)
    refute leased?(actions, r2)

    s =
      ready_pool(
        worker_profile: :thread,
        pool_size: 1,
        threads_per_worker: 3,
        process_pipeline_depth: 5
      )

    assert %{capacity: 3} = stats(s)
  end

  test "a process worker whose given-up call may still run takes no pipelined call behind it" do
    s = ready_pool(pool_size: 1, process_pipeline_depth: 2, stuck_call_grace: 1_000)
    {s, _, r1} = checkout(s)
    {s, _} = ev(s, {:checkin, r1, :abandoned}, @t0 + 10)
    {s, actions, r2} = checkout(s)
    refute leased?(actions, r2)
    assert %{capacity: 2, in_flight: 0, queued: 1} = stats(s)

    # the server ran it to its end (no call active): both slots are free again
    {s, actions} = ev(s, {:stuck_call_check, 1}, @t0 + 60)
    [ref] = for {:check, 1, ref, :active_calls, _, _} <- actions, do: ref
    {s, actions} = ev(s, {:check_result, 1, ref, {:ok, 0}}, @t0 + 61)
    assert lease!(actions, r2).worker_id == 1
    {_s, actions, r3} = checkout(s)
    assert leased?(actions, r3)
  end

  test "one stuck call replaces a pipelined process worker whatever max_stuck_calls says: its server runs nothing else" do
    s =
      ready_pool(
        pool_size: 1,
        process_pipeline_depth: 3,
        stuck_call_grace: 100,
        max_stuck_calls: 2
      )

    {s, _, r1} = checkout(s)
    {s, _, r2} = checkout(s)
    {s, _} = ev(s, {:checkin, r1, :abandoned}, @t0)
    {s, actions} = ev(s, {:stuck_call_check, 1}, @t0 + 200)
    [ref] = for {:check, 1, ref, :active_calls, _, _} <- actions, do: ref
    # the server runs two calls: the given-up one, and r2 waiting in its queue behind it
    {s, actions} = ev(s, {:check_result, 1, ref, {:ok, 2}}, @t0 + 201)
    assert started(actions) == [2]
    assert %{capacity: 0, stuck_replacements: 1, unhealthy_replacements: 0} = stats(s)
    assert [%{stuck_calls: 1}] = Enum.filter(stats(s).workers, &(&1.id == 1))

    # r2 cannot run behind the stuck call: the worker is stopped once its replacement is ready,
    # and r2's caller learns why
    assert [{:record_fate, 1, :worker_unhealthy, message}] =
             for({:record_fate, _, _, _} = a <- actions, do: a)

    assert message =~ "waited behind it"
    {s, actions} = ready(s, 2)
    assert stopped?(actions, 1)
    {s, _} = ev(s, {:checkin, r2, :error})
    assert {:forget_fate, 1} in elem(ev(s, {:worker_exited, 1, :normal}), 1)
  end

  test "beyond queue_size waiters a caller gets queue_full at once" do
    s = ready_pool(pool_size: 1, queue_size: 1)
    {s, _, _} = checkout(s)
    {s, _, _} = checkout(s)
    {s, actions, ref} = checkout(s)
    assert error!(actions, ref).reason == :queue_full
    assert {:demonitor, ref} in actions
    assert %{queued: 1, queue_full: 1} = stats(s)
  end

  test "a waiter still queued at queue_timeout gets queue_timeout and leaves the queue" do
    s = ready_pool(pool_size: 1, queue_timeout: 250)
    {s, _, r1} = checkout(s)
    {s, actions, r2} = checkout(s)
    assert {:timer, 250, {:queue_timeout, r2}} in actions

    {s, actions} = ev(s, {:queue_timeout, r2})
    assert %Error{reason: :queue_timeout, message: message} = error!(actions, r2)
    assert message =~ "no free slot within 250 ms"
    assert %{queued: 0, queue_timeouts: 1} = stats(s)

    # the slot freed later goes to nobody; a stale timeout is ignored
    {s, actions} = ev(s, {:checkin, r1, :ok})
    refute leased?(actions, r2)
    assert {_s, []} = ev(s, {:queue_timeout, r2})
  end

  test "before any worker was ready a waiter may wait for startup_timeout" do
    s = new_pool(queue_timeout: 100, startup_timeout: 7_000)
    {s, actions, ref} = checkout(s)
    assert {:timer, 7_000, {:queue_timeout, ref}} in actions

    {_s, actions} = ready(s, 1)
    assert lease!(actions, ref).worker_id == 1
  end

  test "a caller that dies holding a slot frees it (its call is abandoned); a dead waiter leaves the queue" do
    s = ready_pool(pool_size: 1)
    {s, _, r1} = checkout(s)
    {s, _, r2} = checkout(s)
    {s, _, r3} = checkout(s)

    {s, actions} = ev(s, {:caller_down, r2})
    assert {:cancel_timer, {:queue_timeout, r2}} in actions
    assert stats(s).queued == 1

    {s, actions} = ev(s, {:caller_down, r1})
    assert stats(s).failures == 1
    # abandoned: the slot stays taken until a check shows the call ended on the server
    refute leased?(actions, r3)
    assert [%{abandoned_calls: 1}] = stats(s).workers
  end

  ## stuck calls

  test "an abandoned call keeps its slot until a check of the server shows it ended" do
    s = ready_pool(pool_size: 1, stuck_call_grace: 1_000)
    {s, _, r1} = checkout(s)
    {s, actions} = ev(s, {:checkin, r1, :abandoned}, @t0 + 10)
    delays = for {:schedule, d, {:stuck_call_check, 1}} <- actions, do: d
    assert delays == [50, 150, 400, 1_010]

    {s, _, r2} = checkout(s)
    {s, actions} = ev(s, {:stuck_call_check, 1}, @t0 + 60)

    assert [{ref, :active_calls}] =
             for({:check, 1, ref, kind, :channel_1, _} <- actions, do: {ref, kind})

    {s, actions} = ev(s, {:check_result, 1, ref, {:ok, 0}}, @t0 + 61)
    assert lease!(actions, r2).worker_id == 1
    assert [%{abandoned_calls: 0, stuck_calls: 0}] = stats(s).workers
  end

  test "a call still running stuck_call_grace after it was given up gets its worker replaced" do
    s = ready_pool(pool_size: 1, stuck_call_grace: 100, max_stuck_calls: 1)
    {s, _, r1} = checkout(s)
    {s, _} = ev(s, {:checkin, r1, :abandoned}, @t0)
    {s, actions} = ev(s, {:stuck_call_check, 1}, @t0 + 200)
    [ref] = for {:check, 1, ref, :active_calls, _, _} <- actions, do: ref

    {s, actions} = ev(s, {:check_result, 1, ref, {:ok, 1}}, @t0 + 201)
    assert started(actions) == [2]
    assert status(s, 1) == :retiring
    assert %{stuck_replacements: 1, recycles: 0} = stats(s)

    # idle: stopped as soon as its replacement is ready
    {s, actions} = ready(s, 2)
    assert stopped?(actions, 1)
    assert status(s, 1) == :stopping
    assert s.slots[1].current == 2
  end

  ## shared-memory regions

  defp deleted(actions), do: for({:delete_regions, prefixes} <- actions, do: prefixes)

  test "the regions of a caller that dies during its call are deleted at once" do
    s = ready_pool(pool_size: 1)
    {s, _, ref} = checkout(s, regions: ["args1", "result1"])
    {_s, actions} = ev(s, {:caller_down, ref})
    assert deleted(actions) == [["args1", "result1"]]
  end

  test "a call that ends normally leaves its regions to its caller" do
    s = ready_pool(pool_size: 1)
    {s, _, r1} = checkout(s, regions: ["args1", "result1"])
    {s, _, r2} = checkout(s, regions: ["args2", "result2"])
    {s, a1} = ev(s, {:checkin, r1, :ok})
    {_s, a2} = ev(s, {:checkin, r2, :error})
    assert deleted(a1 ++ a2) == []
  end

  test "the regions of abandoned calls are deleted once a check shows none runs any more" do
    s = ready_pool(pool_size: 1, threads_per_worker: 2, worker_profile: :thread)
    {s, _, r1} = checkout(s, regions: ["args1", "result1"])
    {s, _, r2} = checkout(s, regions: ["args2", "result2"])
    {s, a1} = ev(s, {:checkin, r1, :abandoned}, @t0 + 10)
    {s, a2} = ev(s, {:checkin, r2, :abandoned}, @t0 + 20)
    # its tool may still write result regions: not yet
    assert deleted(a1 ++ a2) == []

    {s, actions} = ev(s, {:stuck_call_check, 1}, @t0 + 60)
    [ref] = for {:check, 1, ref, :active_calls, _, _} <- actions, do: ref
    # one of the two still runs
    {s, actions} = ev(s, {:check_result, 1, ref, {:ok, 1}}, @t0 + 61)
    assert deleted(actions) == []

    {s, actions} = ev(s, {:stuck_call_check, 1}, @t0 + 200)
    [ref] = for {:check, 1, ref, :active_calls, _, _} <- actions, do: ref
    {s, actions} = ev(s, {:check_result, 1, ref, {:ok, 0}}, @t0 + 201)
    assert [prefixes] = deleted(actions)
    assert Enum.sort(prefixes) == ["args1", "args2", "result1", "result2"]

    # once
    {_s, actions} = ev(s, {:worker_exited, 1, :killed})
    assert deleted(actions) == []
  end

  test "the regions of abandoned calls are deleted when their worker is gone" do
    s = ready_pool(pool_size: 1)
    {s, _, r1} = checkout(s, regions: ["args1", "result1"])
    {s, _} = ev(s, {:checkin, r1, :abandoned})
    {_s, actions} = ev(s, {:worker_exited, 1, {:shutdown, {:python_exited, 137}}})
    assert deleted(actions) == [["args1", "result1"]]
  end

  ## sessions

  test "a session is pinned to the worker that first served it; only its first call there initialises it" do
    s = ready_pool()
    {s, a1, r1} = checkout(s, session: "s1")
    first = lease!(a1, r1)
    assert first.init_session
    {s, _} = ev(s, {:checkin, r1, :ok})

    {s, a2, r2} = checkout(s, session: "s1")
    second = lease!(a2, r2)
    assert second.worker_id == first.worker_id
    refute second.init_session
    assert stats(s).sessions == 1
  end

  test "a session's call waits for its busy worker; calls behind it still take other free workers" do
    s = ready_pool()
    {s, a1, r1} = checkout(s, session: "s1")
    home = lease!(a1, r1).worker_id

    {s, a2, r2} = checkout(s, session: "s1")
    refute leased?(a2, r2)

    {s, a3, r3} = checkout(s)
    assert lease!(a3, r3).worker_id != home

    {_s, actions} = ev(s, {:checkin, r1, :ok})
    assert %{worker_id: ^home, init_session: false} = lease!(actions, r2)
  end

  test "a new session's concurrent calls wait for the call that creates it, then share its worker" do
    s = ready_pool(worker_profile: :thread, pool_size: 1, threads_per_worker: 4)
    {s, a1, r1} = checkout(s, session: "s1")
    assert lease!(a1, r1).init_session
    # a free slot, but its call would skip InitializeSession and could reach the server first
    {s, a2, r2} = checkout(s, session: "s1")
    refute leased?(a2, r2)
    {s, a3, r3} = checkout(s)
    assert leased?(a3, r3)

    {s, actions} = ev(s, {:checkin, r1, :ok})
    assert %{worker_id: 1, init_session: false} = lease!(actions, r2)
    # created: its calls no longer wait for each other
    {_s, a4, r4} = checkout(s, session: "s1")
    assert %{init_session: false} = lease!(a4, r4)
  end

  test "a session whose creating call failed to initialise it is created by the call that waited" do
    s = ready_pool(worker_profile: :thread, pool_size: 1, threads_per_worker: 4)
    {s, _, r1} = checkout(s, session: "s1")
    {s, a2, r2} = checkout(s, session: "s1")
    refute leased?(a2, r2)
    {_s, actions} = ev(s, {:checkin, r1, {:session_init_failed, "s1"}})
    assert %{init_session: true} = lease!(actions, r2)
  end

  test "when a session's worker goes down its session moves to another worker and is created there again" do
    s = ready_pool()
    {s, a1, r1} = checkout(s, session: "s1")
    home = lease!(a1, r1).worker_id
    {s, _} = ev(s, {:checkin, r1, :ok})

    {s, _} = ev(s, {:worker_exited, home, {:shutdown, {:python_exited, 137}}})
    {_s, actions, ref} = checkout(s, session: "s1")
    lease = lease!(actions, ref)
    assert lease.worker_id != home
    assert lease.init_session
  end

  test "a session whose initialisation failed is initialised again on its next call" do
    s = ready_pool()
    {s, a1, r1} = checkout(s, session: "s1")
    home = lease!(a1, r1).worker_id
    {s, _} = ev(s, {:checkin, r1, {:session_init_failed, "s1"}})
    assert stats(s).failures == 1

    {_s, actions, ref} = checkout(s, session: "s1")
    assert %{worker_id: ^home, init_session: true} = lease!(actions, ref)
  end

  test "a call that only reads a session (create_session: false) does not count it as created" do
    s = ready_pool(worker_profile: :thread, pool_size: 1)
    {s, a1, r1} = checkout(s, session: "s1", create_session: false)
    assert lease!(a1, r1).init_session

    # a call of the session meanwhile creates it itself
    {s, a2, r2} = checkout(s, session: "s1")
    assert lease!(a2, r2).init_session
    {s, _} = ev(s, {:checkin, r1, :error})
    {s, _} = ev(s, {:checkin, r2, :ok})

    {_s, a3, r3} = checkout(s, session: "s1", create_session: false)
    refute lease!(a3, r3).init_session
  end

  test "forgetting a session unpins it and answers its worker's channel" do
    s = ready_pool()
    {s, a1, r1} = checkout(s, session: "s1")
    home = lease!(a1, r1).worker_id
    {s, _} = ev(s, {:checkin, r1, :ok})

    {s, actions} = ev(s, {:forget_session, :asker, "s1"})
    assert replies(actions, :asker) == [channel(home)]
    assert stats(s).sessions == 0

    {_s, actions} = ev(s, {:forget_session, :asker, "s1"})
    assert replies(actions, :asker) == [nil]
  end

  ## recycling

  test "at worker_max_requests a worker takes no new call while another serves; its replacement starts, and it stops once idle" do
    s =
      ready_pool(
        worker_profile: :thread,
        threads_per_worker: 4,
        pool_size: 2,
        worker_max_requests: 2
      )

    # both idle: worker 1 (the first) takes both calls
    {s, a1, r1} = checkout(s)
    assert lease!(a1, r1).worker_id == 1
    {s, _} = ev(s, {:checkin, r1, :ok})
    {s, actions, r2} = checkout(s)
    assert lease!(actions, r2).worker_id == 1
    assert started(actions) == [3]
    assert status(s, 1) == :draining
    assert stats(s).recycles == 1

    {s, actions, r3} = checkout(s)
    assert lease!(actions, r3).worker_id == 2

    {s, actions} = ev(s, {:checkin, r2, :ok})
    assert stopped?(actions, 1)

    {s, _} = ready(s, 3)
    assert s.slots[1].current == 3

    # its exit is the end of a recycle, not a crash: nothing is restarted
    {s, actions} = ev(s, {:worker_exited, 1, :normal})
    assert {:forget_fate, 1} in actions
    refute Enum.any?(actions, &match?({:schedule, _, {:start_worker, _}}, &1))
    assert %{crashes: 0, workers_started: 3} = stats(s)
  end

  test "the last routable worker at worker_max_requests keeps serving until its replacement is ready, then drains" do
    s = ready_pool(pool_size: 1, worker_max_requests: 1)
    {s, actions, r1} = checkout(s)
    assert lease!(actions, r1).worker_id == 1
    assert started(actions) == [2]
    assert status(s, 1) == :retiring
    assert stats(s).capacity == 1

    # past its limit it still serves: the replacement is not ready
    {s, _} = ev(s, {:checkin, r1, :ok})
    {s, actions, r2} = checkout(s)
    assert lease!(actions, r2).worker_id == 1
    assert started(actions) == []
    assert %{recycles: 1} = stats(s)

    {s, actions} = ready(s, 2)
    assert status(s, 1) == :draining
    refute stopped?(actions, 1)

    {s, actions, r3} = checkout(s)
    assert lease!(actions, r3).worker_id == 2
    {_s, actions} = ev(s, {:checkin, r2, :ok})
    assert stopped?(actions, 1)
  end

  test "a worker at max requests while every other worker is busy keeps serving until its replacement is ready: a recycle takes no capacity from a loaded pool" do
    s =
      ready_pool(
        worker_profile: :thread,
        threads_per_worker: 1,
        pool_size: 2,
        worker_max_requests: 2
      )

    {s, a1, r1} = checkout(s)
    {s, a2, r2} = checkout(s)
    assert {lease!(a1, r1).worker_id, lease!(a2, r2).worker_id} == {1, 2}
    {s, _} = ev(s, {:checkin, r1, :ok})

    # its limit reached while worker 2 is busy: it starts its replacement and takes calls on
    {s, a3, r3} = checkout(s)
    assert lease!(a3, r3).worker_id == 1
    assert started(a3) == [3]
    assert status(s, 1) == :retiring
    {s, _} = ev(s, {:checkin, r3, :ok})
    {s, a4, r4} = checkout(s)
    assert lease!(a4, r4).worker_id == 1
    assert status(s, 1) == :retiring
    assert stats(s).recycles == 1

    # the replacement ready: no new call for it, and it stops once its call is in
    {s, actions} = ready(s, 3)
    assert status(s, 1) == :draining
    refute stopped?(actions, 1)
    {s, a5, r5} = checkout(s)
    assert lease!(a5, r5).worker_id == 3
    {_s, actions} = ev(s, {:checkin, r4, :ok})
    assert stopped?(actions, 1)
    _ = r2
  end

  test "a worker at max requests while every other worker is out of rotation keeps serving; once another is routable it drains at its next call" do
    s = ready_pool(pool_size: 2, worker_max_requests: 2)
    {s, _} = ev(s, {:worker_draining, 2})
    {s, a1, r1} = checkout(s)
    assert lease!(a1, r1).worker_id == 1
    {s, _} = ev(s, {:checkin, r1, :ok})
    {s, a2, r2} = checkout(s)
    assert lease!(a2, r2).worker_id == 1
    [replacement] = started(a2)
    assert status(s, 1) == :retiring
    {s, _} = ev(s, {:checkin, r2, :ok})

    # worker 2's server is gone and its slot restarted: a routable worker that is not worker 1's
    # replacement
    {s, _} = ev(s, {:worker_exited, 2, {:shutdown, {:channel_down, :closed}}})
    {s, actions} = ev(s, {:start_worker, 2})
    [restarted] = started(actions)
    {s, _} = ready(s, restarted)
    assert status(s, 1) == :retiring

    {s, a3, r3} = checkout(s)
    assert lease!(a3, r3).worker_id == 1
    assert status(s, 1) == :draining
    assert stats(s).recycles == 1
    {_s, actions} = ev(s, {:checkin, r3, :ok})
    assert stopped?(actions, 1)
    assert s.slots[1].pending == replacement
  end

  test "workers that reach max requests one after the other before any replacement is ready leave one serving" do
    s =
      ready_pool(
        worker_profile: :thread,
        threads_per_worker: 4,
        pool_size: 2,
        worker_max_requests: 1
      )

    {s, a1, r1} = checkout(s)
    {s, a2, r2} = checkout(s)
    assert Enum.sort([lease!(a1, r1).worker_id, lease!(a2, r2).worker_id]) == [1, 2]
    assert {status(s, 1), status(s, 2)} == {:draining, :retiring}
    assert stats(s).capacity == 4

    # the one still serving takes every call until a replacement is ready
    {s, a3, r3} = checkout(s)
    assert lease!(a3, r3).worker_id == 2
    {s, _} = ready(s, 3)
    {s, a4, r4} = checkout(s)
    assert lease!(a4, r4).worker_id == 3
    assert status(s, 2) == :retiring
    {s, _} = ready(s, 4)
    assert status(s, 2) == :draining
    assert stats(s).recycles == 3
    for r <- [r1, r2, r3, r4], reduce: s, do: (s -> elem(ev(s, {:checkin, r, :ok}), 0))
  end

  test "each worker's max requests is lowered by a random fraction below max_requests_jitter" do
    s = ready_pool(pool_size: 8, worker_max_requests: 100, max_requests_jitter: 0.5)
    limits = for %{max_requests: n} <- stats(s).workers, do: n
    assert Enum.all?(limits, &(&1 > 50 and &1 <= 100))
    assert length(Enum.uniq(limits)) > 1, "limits #{inspect(limits)} should differ"

    # a worker is recycled at its own limit: one call at a time goes to worker 1 (the first idle)
    [%{id: 1, max_requests: limit} | _] = stats(s).workers

    s =
      Enum.reduce(1..limit, s, fn n, s ->
        assert status(s, 1) == :ready, "recycled after #{n - 1} of its #{limit} calls"
        {s, actions, ref} = checkout(s)
        assert lease!(actions, ref).worker_id == 1
        elem(ev(s, {:checkin, ref, :ok}), 0)
      end)

    assert status(s, 1) == :stopping
    assert stats(s).recycles == 1

    assert [%{max_requests: 100}] =
             stats(ready_pool(pool_size: 1, worker_max_requests: 100)).workers

    assert [%{max_requests: :infinity}] = stats(ready_pool(pool_size: 1)).workers
  end

  test "on TTL a worker keeps serving until its replacement is ready, then drains" do
    s = new_pool(pool_size: 1, worker_ttl: {1, :seconds})
    {s, actions} = ready(s, 1)
    assert {:schedule, 1_000, {:ttl_expired, 1}} in actions
    assert [%{ttl_ms: 1_000}] = stats(s).workers

    {s, actions} = ev(s, {:ttl_expired, 1})
    assert started(actions) == [2]
    assert status(s, 1) == :retiring

    {s, actions, r1} = checkout(s)
    assert lease!(actions, r1).worker_id == 1

    {s, actions} = ready(s, 2)
    assert status(s, 1) == :draining
    refute stopped?(actions, 1)

    {_s, actions} = ev(s, {:checkin, r1, :ok})
    assert stopped?(actions, 1)
  end

  test "each worker's TTL is shortened by at most ttl_jitter" do
    s = new_pool(pool_size: 2, worker_ttl: {10, :seconds}, ttl_jitter: 0.5)
    {s, _} = ready(s, 1)
    {s, _} = ready(s, 2)

    for %{ttl_ms: ttl} <- stats(s).workers, do: assert(ttl > 5_000 and ttl <= 10_000)
  end

  test "a worker that crashes is restarted after a backoff that doubles" do
    s = ready_pool(pool_size: 1)
    {s, actions} = ev(s, {:worker_exited, 1, :killed})
    assert {:schedule, 100, {:start_worker, 1}} in actions
    assert stats(s).crashes == 1

    {s, actions} = ev(s, {:start_worker, 1})
    assert started(actions) == [2]
    {_s, actions} = ev(s, {:worker_exited, 2, :killed})
    assert {:schedule, 200, {:start_worker, 1}} in actions
  end

  ## workers whose server shuts down (GOAWAY)

  test "a worker whose server drains takes no new call; its calls in flight finish and still check in" do
    s = ready_pool(worker_profile: :thread, pool_size: 2, threads_per_worker: 2)
    {s, a1, r1} = checkout(s)
    leaving = lease!(a1, r1).worker_id
    other = 3 - leaving

    {s, actions} = ev(s, {:worker_draining, leaving})
    assert status(s, leaving) == :server_draining
    # the pool does not stop it: its server ends itself after its last call
    refute stopped?(actions, leaving)
    assert %{capacity: 2, in_flight: 1} = stats(s)

    # it still has a free slot, but new calls go to the other worker, then wait
    {s, a2, r2} = checkout(s)
    {s, a3, r3} = checkout(s)
    assert lease!(a2, r2).worker_id == other
    assert lease!(a3, r3).worker_id == other
    {s, a4, r4} = checkout(s)
    refute leased?(a4, r4)

    # the call in flight on it checks in as usual, and its freed slot is not handed out
    {s, actions} = ev(s, {:checkin, r1, :ok})
    assert {:demonitor, r1} in actions
    refute leased?(actions, r4)
    refute stopped?(actions, leaving)
    assert s.workers[leaving].in_flight == 0
    assert %{calls: 1, failures: 0, queued: 1} = stats(s)

    # the queued caller gets the other worker's next free slot
    {_s, actions} = ev(s, {:checkin, r2, :ok})
    assert lease!(actions, r4).worker_id == other
  end

  test "a session pinned to a draining worker moves to another worker, and its queued caller goes there at once" do
    s = ready_pool(pool_size: 2)
    {s, a1, r1} = checkout(s, session: "s1")
    home = lease!(a1, r1).worker_id
    # its worker is busy: the session's next caller waits for it
    {s, a2, r2} = checkout(s, session: "s1")
    refute leased?(a2, r2)

    {s, actions} = ev(s, {:worker_draining, home})
    lease = lease!(actions, r2)
    assert lease.worker_id != home
    assert lease.init_session
    assert stats(s).queued == 0

    {_s, actions} = ev(s, {:checkin, r1, :ok})
    refute stopped?(actions, home)
  end

  test "a draining worker gets no health check and is replaced once it exits, as a worker that went down" do
    s = ready_pool(pool_size: 1, health_check_interval: 1_000)
    {s, _, r1} = checkout(s)
    {s, _} = ev(s, {:worker_draining, 1})

    {s, actions} = ev(s, {:health_check, 1})
    assert for({:check, _, _, _, _, _} = a <- actions, do: a) == []
    {s, actions} = ev(s, {:checkin, r1, :ok})
    refute stopped?(actions, 1)
    assert started(actions) == []

    {s, actions} =
      ev(s, {:worker_exited, 1, {:shutdown, {:channel_down, {:shutdown, {:goaway, 0}}}}})

    assert {:schedule, 100, {:start_worker, 1}} in actions
    assert stats(s).crashes == 1
    {_s, actions} = ev(s, {:start_worker, 1})
    assert started(actions) == [2]
  end

  test "a worker the pool is already taking out of service keeps its status when its server drains" do
    s = ready_pool(pool_size: 2, worker_max_requests: 1)
    {s, _, _r1} = checkout(s)
    assert status(s, 1) == :draining
    {s, _} = ev(s, {:worker_draining, 1})
    assert status(s, 1) == :draining
    # (an unknown or gone worker is ignored)
    assert {^s, []} = ev(s, {:worker_draining, 99})
  end

  ## health

  test "a worker that fails its health check takes no new call, is replaced, and stops once idle" do
    s = new_pool(pool_size: 1, health_check_interval: 1_000, health_check_timeout: 300)
    {s, actions} = ready(s, 1)
    assert {:schedule, 1_000, {:health_check, 1}} in actions
    {s, _, r1} = checkout(s)

    {s, actions} = ev(s, {:health_check, 1})
    assert {:schedule, 1_000, {:health_check, 1}} in actions
    [ref] = for {:check, 1, ref, :health, :channel_1, 300} <- actions, do: ref
    # no answer at all counts as a failure
    assert {:schedule, 1_300, {:check_result, 1, ref, {:error, "no answer within 300 ms"}}} in actions

    {s, actions} = ev(s, {:check_result, 1, ref, {:error, "no answer within 300 ms"}})

    assert [{:record_fate, 1, :worker_unhealthy, message}] =
             for({:record_fate, _, _, _} = a <- actions, do: a)

    assert message =~ "failed its health check (no answer within 300 ms) and was replaced"
    assert started(actions) == [2]
    assert status(s, 1) == :unhealthy
    refute stopped?(actions, 1)
    assert %{unhealthy_replacements: 1, capacity: 0} = stats(s)

    {s, actions, r2} = checkout(s)
    refute leased?(actions, r2)

    {_s, actions} = ev(s, {:checkin, r1, :error})
    assert stopped?(actions, 1)
  end

  test "a health check answered SERVING changes nothing; a late answer of an old check is ignored" do
    s = ready_pool(pool_size: 1, health_check_interval: 1_000)
    {s, actions} = ev(s, {:health_check, 1})
    [ref] = for {:check, 1, ref, :health, _, _} <- actions, do: ref
    {s, _} = ev(s, {:check_result, 1, ref, :ok})
    assert status(s, 1) == :ready

    {s2, _} = ev(s, {:check_result, 1, ref, {:error, "no answer within 5000 ms"}})
    assert status(s2, 1) == :ready
  end

  ## start failures

  test "a worker that fails to start fails waiters and await_ready at once, with its error" do
    s = new_pool(pool_size: 1)
    {s, _, ref} = checkout(s)
    {s, []} = ev(s, {:await_ready, :waiter, :all})

    reason =
      {:shutdown, {:start_failed, "worker 1 exited with status 1 before it was ready: boom"}}

    {s, actions} = ev(s, {:worker_exited, 1, reason})
    assert %Error{reason: :worker_start_failed, message: message} = error!(actions, ref)
    assert message =~ "boom"
    assert [{:error, %Error{reason: :worker_start_failed}}] = replies(actions, :waiter)
    assert {:schedule, 100, {:start_worker, 1}} in actions

    # until a worker is ready, new callers get the error at once
    {s, actions, ref} = checkout(s)
    assert error!(actions, ref).reason == :worker_start_failed
    {s, _} = ev(s, {:start_worker, 1})
    {_s, actions} = ready(s, 2)
    assert Enum.all?(actions, &(not match?({:reply, _, {:error, _}}, &1)))
  end

  test "a worker that cannot be spawned is not counted as started and is retried with backoff" do
    s = new_pool(pool_size: 1)
    {s, actions} = ev(s, {:worker_spawn_failed, 1, {:spawn_failed, "enoent"}})
    assert {:schedule, 100, {:start_worker, 1}} in actions
    assert %{workers_started: 0, crashes: 1, workers: []} = stats(s)
    assert s.start_error.reason == :worker_start_failed
  end

  test "await_ready answers once min workers are ready" do
    s = new_pool(pool_size: 2)
    {s, []} = ev(s, {:await_ready, :one, 1})
    {s, []} = ev(s, {:await_ready, :all, :all})
    {s, actions} = ready(s, 1)
    assert replies(actions, :one) == [:ok]
    assert replies(actions, :all) == []
    {_s, actions} = ready(s, 2)
    assert replies(actions, :all) == [:ok]
  end

  ## stopping

  test "drain turns waiters and new callers away, lets calls in flight finish, then stops the workers" do
    s = ready_pool(pool_size: 2, shutdown_grace: 800)
    {s, _, r1} = checkout(s)
    {s, _, r2} = checkout(s)
    {s, _, r3} = checkout(s)

    {s, actions} = ev(s, {:drain, :drainer, nil})
    assert error!(actions, r3).reason == :pool_stopped
    assert {:timer, 800, :drain_deadline} in actions
    refute Enum.any?(actions, &match?({:stop_worker, _}, &1))

    {s, actions, r4} = checkout(s)
    assert error!(actions, r4).reason == :pool_stopped
    {s, actions} = ev(s, {:await_ready, :late, :all})
    assert [{:error, %Error{reason: :pool_stopped}}] = replies(actions, :late)

    {s, actions} = ev(s, {:checkin, r1, :ok})
    refute Enum.any?(actions, &match?({:stop_worker, _}, &1))
    {s, actions} = ev(s, {:checkin, r2, :ok})
    assert stopped?(actions, 1) and stopped?(actions, 2)
    assert {:cancel_timer, :drain_deadline} in actions
    assert replies(actions, :drainer) == []

    {s, _} = ev(s, {:worker_exited, 1, :normal})
    {_s, actions} = ev(s, {:worker_exited, 2, :normal})
    assert replies(actions, :drainer) == [:ok]
  end

  test "at the drain deadline calls still running are failed as pool_stopped and the workers stopped" do
    s = ready_pool(pool_size: 2)
    {s, a1, r1} = checkout(s)
    busy = lease!(a1, r1).worker_id
    {s, _} = ev(s, {:drain, :drainer, 50})

    {s, actions} = ev(s, :drain_deadline)

    assert [{:record_fate, ^busy, :pool_stopped, message}] =
             for({:record_fate, _, _, _} = a <- actions, do: a)

    assert message =~ "still running after the 50 ms grace period"
    assert stopped?(actions, 1) and stopped?(actions, 2)

    # a worker that will not go away does not hold drain/2 forever
    {_s, actions} = ev(s, :drain_give_up)
    assert replies(actions, :drainer) == [:ok]
  end

  test "a worker that becomes ready while the pool drains is stopped" do
    s = new_pool(pool_size: 1)
    {s, _} = ev(s, {:drain, :drainer, nil})
    assert status(s, 1) == :stopping
    {_s, actions} = ready(s, 1)
    refute Enum.any?(actions, &match?({:lease, _, _}, &1))
  end

  test "the pool ending records pool_stopped for the workers running calls" do
    s = ready_pool(pool_size: 2)
    {s, a1, r1} = checkout(s)
    busy = lease!(a1, r1).worker_id
    {_s, actions} = ev(s, :terminating)

    assert [{:record_fate, ^busy, :pool_stopped, "pool :sm was stopped during the call"}] =
             actions
  end

  test "routable?/1: ready and retiring workers take calls; starting, draining, server-draining, unhealthy and stopping ones do not" do
    assert State.routable?(%{status: :ready})
    assert State.routable?(%{status: :retiring})

    for status <- [:starting, :draining, :server_draining, :unhealthy, :stopping],
        do: refute(State.routable?(%{status: status}))
  end

  ## telemetry effects and per-slot counters

  defp worker_events(actions, kind),
    do: for({:telemetry, [:snakepit, :worker, ^kind], m, md} <- actions, do: {m, md})

  test "a worker becoming ready is a worker start event with its startup time and why it started" do
    s = new_pool(pool_size: 1)
    {_s, actions} = ev(s, {:worker_ready, 1, %{channel: :ch, os_pid: 101, port: 5001}}, @t0 + 250)

    assert [{%{duration: duration}, metadata}] = worker_events(actions, :start)
    assert System.convert_time_unit(duration, :native, :millisecond) == 250

    assert %{pool: :sm, worker: 1, slot: 1, os_pid: 101, port: 5001, reason: :initial} = metadata
  end

  test "a recycle at max requests is a recycle event and counts for the worker's slot; its replacement starts as :replacement" do
    s = ready_pool(pool_size: 2, worker_max_requests: 1)
    {s, actions, ref} = checkout(s)
    worker = lease!(actions, ref).worker_id

    assert [{%{uptime: _}, %{worker: ^worker, reason: :max_requests, requests: 1}}] =
             worker_events(actions, :recycle)

    [replacement] = started(actions)
    {s, actions} = ready(s, replacement)
    assert [{_, %{worker: ^replacement, reason: :replacement}}] = worker_events(actions, :start)

    stats = stats(s)
    assert stats.recycles == 1
    slot = s.workers[replacement].slot
    assert %{recycles: 1, crashes: 0, worker: ^replacement} = Enum.at(stats.slots, slot - 1)
    assert [%{recycles: 0}] = Enum.reject(stats.slots, &(&1.slot == slot))

    assert %{slot_recycles: 1, slot_crashes: 0} =
             Enum.find(stats.workers, &(&1.id == replacement))
  end

  test "a worker that goes down is a crash event with its exit status, counted for its slot, which keeps the count across restarts" do
    s = ready_pool(pool_size: 1)
    {s, actions} = ev(s, {:worker_exited, 1, {:shutdown, {:python_exited, 137}}})

    assert [{_, %{worker: 1, slot: 1, os_pid: 101, exit_status: 137, status: :ready} = md}] =
             worker_events(actions, :crash)

    assert md.reason == {:shutdown, {:python_exited, 137}}

    {s, actions} = ev(s, {:start_worker, 1})
    assert started(actions) == [2]
    {s, actions} = ready(s, 2)
    assert [{_, %{worker: 2, slot: 1, reason: :restart}}] = worker_events(actions, :start)
    assert [%{id: 2, slot_crashes: 1, slot_recycles: 0}] = stats(s).workers
    assert [%{slot: 1, crashes: 1, worker: 2}] = stats(s).slots
  end

  test "a recycle on purpose is not a crash: the recycled worker's exit emits no crash event" do
    s = ready_pool(pool_size: 1, worker_max_requests: 1)
    {s, _, ref} = checkout(s)
    {s, _} = ready(s, 2)
    {s, _} = ev(s, {:checkin, ref, :ok})
    {s, actions} = ev(s, {:worker_exited, 1, :normal})
    assert worker_events(actions, :crash) == []
    assert [%{crashes: 0, recycles: 1}] = stats(s).slots
  end

  test "a worker replaced for failing its health check is a recycle event with reason :unhealthy and why" do
    s = new_pool(pool_size: 1, health_check_interval: 1_000, health_check_timeout: 300)
    {s, _} = ready(s, 1)
    {s, actions} = ev(s, {:health_check, 1})
    [ref] = for {:check, 1, ref, :health, _, _} <- actions, do: ref
    {_s, actions} = ev(s, {:check_result, 1, ref, {:error, "no answer within 300 ms"}})

    assert [{_, %{reason: :unhealthy, message: message}}] = worker_events(actions, :recycle)
    assert message =~ "failed its health check"
  end

  test "queue wait is measured from enqueueing to the lease: a caller served at once waited 0 ms" do
    s = ready_pool(pool_size: 1)
    {s, a1, r1} = checkout(s)
    assert %{queued: false} = lease!(a1, r1)
    {s, _, r2} = checkout(s, now: @t0 + 10)
    {s, actions} = ev(s, {:checkin, r1, :ok}, @t0 + 70)
    assert %{queued: true, os_pid: 101, port: 5001} = lease!(actions, r2)

    assert %{checkouts: 2, queue_wait_total_ms: 60, queue_wait_max_ms: 60} = stats(s)
  end
end
