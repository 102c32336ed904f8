defmodule Snakepit.RemoteStateTest do
  # The pool's state machine with remote endpoints: events in, actions out (no Python, no
  # processes, no clock). What a remote pool adds to the local one: endpoints that come and go
  # (DNS), health from Health/Watch, capacity per endpoint, jittered reconnects.
  use ExUnit.Case, async: true

  alias Snakepit.Config
  alias Snakepit.Pool.State

  @t0 1_000_000

  defp new_pool(endpoints, extra \\ %{}) do
    config =
      Config.new!(
        Map.merge(
          %{
            name: :rsm,
            worker_profile: :remote,
            endpoints: endpoints,
            health_check_interval: :infinity
          },
          extra
        )
      )

    State.new(config, @t0, seed: :rand.seed_s(:exsss, 7))
  end

  defp ev(s, event), do: State.handle(s, event, @t0)

  defp ready(s, id, capacity) do
    info = %{
      channel: :"ch#{id}",
      os_pid: nil,
      port: 50_000 + id,
      endpoint: "e#{id}",
      capacity: capacity
    }

    elem(ev(s, {:worker_ready, id, info}), 0)
  end

  defp checkout(s, opts \\ []) do
    ref = make_ref()
    request = %{session_id: opts[:session], weight: 1, create_session: true}
    {s, actions} = ev(s, {:checkout, ref, {:caller, ref}, request})
    lease = Enum.find_value(actions, fn a -> match?({:lease, _, _}, a) && elem(a, 2) end)
    {s, lease, ref}
  end

  defp worker(s, id), do: Enum.find(State.stats(s, @t0).workers, &(&1.id == id))

  test "one worker per endpoint; its capacity comes with its readiness (GetStats max_workers)" do
    {s, actions} = new_pool(["a:1", "b:2"])
    assert for({:start_worker, id} <- actions, do: id) == [1, 2]
    s = s |> ready(1, 2) |> ready(2, 6)
    assert worker(s, 1).capacity == 2 and worker(s, 2).capacity == 6
    assert State.stats(s, @t0).capacity == 8 and worker(s, 2).endpoint == "e2"
  end

  test "calls go to the least outstanding endpoint relative to its capacity" do
    {s, _} = new_pool(["a:1", "b:2"])
    s = s |> ready(1, 1) |> ready(2, 3)

    {ids, s} =
      Enum.map_reduce(1..4, s, fn _, s ->
        {s, lease, _} = checkout(s)
        {lease.worker_id, s}
      end)

    # 4 slots in all: 1 on the small endpoint, 3 on the big one, whatever the order
    assert Enum.frequencies(ids) == %{1 => 1, 2 => 3}
    assert {_, nil, _} = checkout(s)
  end

  test "NOT_SERVING takes an endpoint out of rotation, calls in flight stay; SERVING puts it back" do
    {s, _} = new_pool(["a:1", "b:2"])
    s = s |> ready(1, 2) |> ready(2, 2)
    {s, lease, ref} = checkout(s)
    sick = lease.worker_id
    {s, _} = ev(s, {:worker_serving, sick, false})
    assert worker(s, sick).status == :not_serving and worker(s, sick).in_flight == 1

    {ids, s} =
      Enum.map_reduce(1..2, s, fn _, s ->
        {s, l, _} = checkout(s)
        {l.worker_id, s}
      end)

    assert Enum.all?(ids, &(&1 != sick))
    {s, _} = ev(s, {:checkin, ref, :ok})
    {s, _} = ev(s, {:worker_serving, sick, true})
    assert worker(s, sick).status == :ready
    {_s, l, _} = checkout(s)
    assert l.worker_id == sick
  end

  test "a session on an endpoint that leaves rotation moves to another and is created there" do
    {s, _} = new_pool(["a:1", "b:2"])
    s = s |> ready(1, 2) |> ready(2, 2)
    {s, first, ref} = checkout(s, session: "s")
    assert first.init_session
    {s, _} = ev(s, {:checkin, ref, :ok})
    {s, _} = ev(s, {:worker_serving, first.worker_id, false})
    {_s, moved, _} = checkout(s, session: "s")
    assert moved.worker_id != first.worker_id and moved.init_session
  end

  test "DNS: an added slot starts a worker; a removed one drains it and is never restarted" do
    {s, _} = new_pool([], %{discovery: {:dns, "w.test", 50_052}})
    assert State.stats(s, @t0).pool_size == 0
    {s, actions} = ev(s, {:add_slot, 1})
    assert [{:start_worker, 1}] = for({:start_worker, _} = a <- actions, do: a)
    s = ready(s, 1, 2)
    {s, _lease, ref} = checkout(s)

    {s, actions} = ev(s, {:remove_slot, 1})
    assert worker(s, 1).status == :draining
    refute Enum.any?(actions, &match?({:stop_worker, 1}, &1))
    # its last call ends: stopped, and once gone, nothing restarts
    {s, actions} = ev(s, {:checkin, ref, :ok})
    assert {:stop_worker, 1} in actions
    {s, actions} = ev(s, {:worker_exited, 1, :normal})
    refute Enum.any?(actions, &match?({:schedule, _, {:start_worker, _}}, &1))
    assert State.stats(s, @t0).slots == [] and State.stats(s, @t0).pool_size == 0
  end

  test "a failed connection is retried after a jittered, capped exponential backoff" do
    {s, _} = new_pool(["a:1"], %{restart_backoff_max: 1_000})

    {_s, delays} =
      Enum.reduce(1..6, {s, []}, fn _, {s, delays} ->
        [id] = State.worker_ids(s)
        {s, actions} = ev(s, {:worker_exited, id, {:shutdown, {:start_failed, "refused"}}})
        [delay] = for {:schedule, d, {:start_worker, 1}} <- actions, do: d
        {s, _} = ev(s, {:start_worker, 1})
        {s, [delay | delays]}
      end)

    steps = [100, 200, 400, 800, 1_000, 1_000]

    assert Enum.zip(Enum.reverse(delays), steps)
           |> Enum.all?(fn {d, step} -> d >= div(step, 2) and d <= step end)
  end

  test "periodic health checks pause while an endpoint is NOT_SERVING and resume after" do
    {s, _} = new_pool(["a:1"], %{health_check_interval: 1_000})
    s = ready(s, 1, 2)
    {s, _} = ev(s, {:worker_serving, 1, false})
    {s, actions} = ev(s, {:health_check, 1})
    refute Enum.any?(actions, &match?({:check, 1, _, _, _, _}, &1))
    assert {:schedule, 1_000, {:health_check, 1}} in actions
    {s, _} = ev(s, {:worker_serving, 1, true})
    {_s, actions} = ev(s, {:health_check, 1})
    assert Enum.any?(actions, &match?({:check, 1, _, :health, :ch1, _}, &1))
  end
end
