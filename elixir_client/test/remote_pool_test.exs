Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.RemotePoolTest do
  # Pools of remote workers (`worker_profile: :remote`): Python servers this test starts itself on
  # 127.0.0.2, .3 and .4 (distinct loopback hosts), reached over TCP like servers on other
  # machines; the pool did not start them and only connects.
  use ExUnit.Case, async: false

  import Snakepit.PoolHelpers
  alias Snakepit.Test.RemoteServers

  @moduletag timeout: 180_000
  @hosts ["127.0.0.2", "127.0.0.3", "127.0.0.4"]

  defp start_servers(hosts, opts \\ []), do: Enum.map(hosts, &RemoteServers.start_owned(&1, opts))

  defp remote_pool!(config) do
    start_pool!(Map.merge(%{worker_profile: :remote, health_check_interval: :infinity}, config))
  end

  defp worker_of(pool, endpoint),
    do: Enum.find(Snakepit.list_workers(pool), &(&1.endpoint == endpoint))

  defp requests(pool, endpoint) do
    case worker_of(pool, endpoint) do
      nil -> 0
      w -> w.requests
    end
  end

  # `n` calls from `callers` concurrent processes; every one ends by itself (its deadline).
  defp load(pool, n, callers, tool, args, opts \\ []) do
    1..n
    |> Task.async_stream(fn _ -> Snakepit.execute(pool, tool, args, opts) end,
      max_concurrency: callers,
      timeout: 60_000,
      ordered: false
    )
    |> Enum.map(fn {:ok, result} -> result end)
  end

  defp failures(results), do: Enum.reject(results, &match?({:ok, _}, &1))

  test "calls are spread over the endpoints, each with the capacity its GetStats reports" do
    servers = start_servers(@hosts)
    pool = remote_pool!(%{endpoints: Enum.map(servers, & &1.endpoint)})

    assert failures(load(pool, 60, 6, "sleep", %{seconds: 0.02})) == []

    workers = Snakepit.list_workers(pool)
    assert Enum.sort(Enum.map(workers, & &1.endpoint)) == Enum.map(servers, & &1.endpoint)
    assert Enum.all?(workers, &(&1.status == :ready and &1.capacity == 4 and &1.requests > 0))
    assert {:ok, %{"message" => "hi"}} = Snakepit.execute(pool, "echo", %{message: "hi"})
  end

  test "a session sticks to one endpoint, and moves to another when its endpoint goes away" do
    servers = start_servers(Enum.take(@hosts, 2))
    pool = remote_pool!(%{endpoints: Enum.map(servers, & &1.endpoint)})

    for _ <- 1..5, do: assert({:ok, _} = Snakepit.execute_in_session(pool, "s1", "ping", %{}))
    [home] = Enum.filter(Snakepit.list_workers(pool), &(&1.requests > 0))
    assert home.requests == 5 and home.sessions == 1

    RemoteServers.signal(Enum.find(servers, &(&1.endpoint == home.endpoint)), "KILL")

    eventually(fn ->
      worker_of(pool, home.endpoint) == nil or worker_of(pool, home.endpoint).status != :ready
    end)

    [other] = Enum.reject(servers, &(&1.endpoint == home.endpoint))
    assert {:ok, _} = Snakepit.execute_in_session(pool, "s1", "ping", %{})
    assert worker_of(pool, other.endpoint).sessions == 1
  end

  test "an endpoint killed mid-load fails only the calls in flight on it, with :worker_crashed" do
    servers = start_servers(@hosts)
    pool = remote_pool!(%{endpoints: Enum.map(servers, & &1.endpoint), queue_timeout: 30_000})
    [victim | _] = servers

    loader = Task.async(fn -> load(pool, 300, 12, "sleep", %{seconds: 0.02}) end)
    eventually(fn -> requests(pool, victim.endpoint) >= 10 end)
    RemoteServers.signal(victim, "KILL")
    results = Task.await(loader, 120_000)

    failed = failures(results)
    # at most its capacity (4) was in flight on it when it died
    assert length(failed) in 1..4
    assert Enum.all?(failed, &match?({:error, %Snakepit.Error{reason: :worker_crashed}}, &1))
    assert length(results) == 300
  end

  test "idempotent calls on an endpoint killed mid-load run once more on another one: 0 failures" do
    servers = start_servers(@hosts)
    pool = remote_pool!(%{endpoints: Enum.map(servers, & &1.endpoint), queue_timeout: 30_000})
    [victim | _] = servers

    loader =
      Task.async(fn -> load(pool, 300, 12, "sleep", %{seconds: 0.02}, idempotent: true) end)

    eventually(fn -> requests(pool, victim.endpoint) >= 10 end)
    RemoteServers.signal(victim, "KILL")
    results = Task.await(loader, 120_000)
    assert length(results) == 300 and failures(results) == []
    assert Snakepit.Pool.stats(pool).crashes >= 1
  end

  test "max_connection_age renews each connection (new one first): no call fails" do
    servers = start_servers(Enum.take(@hosts, 2))

    pool =
      remote_pool!(%{
        endpoints: Enum.map(servers, & &1.endpoint),
        max_connection_age: {300, :milliseconds},
        queue_timeout: 30_000
      })

    first_channels = MapSet.new(Snakepit.list_workers(pool), & &1.channel)
    loader = Task.async(fn -> load(pool, 200, 6, "sleep", %{seconds: 0.01}) end)

    eventually(fn ->
      workers = Snakepit.list_workers(pool)

      length(workers) >= 2 and
        Enum.all?(workers, &(not MapSet.member?(first_channels, &1.channel)))
    end)

    assert failures(Task.await(loader, 60_000)) == []
    assert Snakepit.Pool.stats(pool).recycles >= 2
  end

  test "an endpoint that turns NOT_SERVING leaves rotation at once and comes back when SERVING" do
    servers = start_servers(Enum.take(@hosts, 2))
    pool = remote_pool!(%{endpoints: Enum.map(servers, & &1.endpoint)})
    [sick, healthy] = servers

    RemoteServers.signal(sick, "USR1")
    eventually(fn -> worker_of(pool, sick.endpoint).status == :not_serving end)
    before = requests(pool, sick.endpoint)

    assert failures(load(pool, 40, 4, "ping", %{})) == []
    assert requests(pool, sick.endpoint) == before
    assert requests(pool, healthy.endpoint) >= 40

    RemoteServers.signal(sick, "USR2")
    eventually(fn -> worker_of(pool, sick.endpoint).status == :ready end)
    assert failures(load(pool, 40, 8, "sleep", %{seconds: 0.02})) == []
    assert requests(pool, sick.endpoint) > before
  end

  test "an endpoint that shuts down (GOAWAY) lets its calls in flight finish; new calls go elsewhere" do
    # (hang: a tool deaf to cancellation, which a cooperative tool sees at shutdown)
    servers = start_servers(Enum.take(@hosts, 2), adapter: "pool_test_adapters.HangingAdapter")
    pool = remote_pool!(%{endpoints: Enum.map(servers, & &1.endpoint), queue_timeout: 30_000})
    [leaving, _staying] = servers

    loader = Task.async(fn -> load(pool, 120, 8, "hang", %{seconds: 0.05}) end)
    eventually(fn -> requests(pool, leaving.endpoint) >= 4 end)
    RemoteServers.signal(leaving, "TERM")
    assert failures(Task.await(loader, 120_000)) == []
  end

  test "DNS discovery: an endpoint added to the name gets traffic within resolve_interval + 1 s" do
    port = RemoteServers.free_port(Enum.take(@hosts, 2))
    [first, second] = Enum.map(Enum.take(@hosts, 2), &RemoteServers.start_owned(&1, port: port))
    {:ok, dns} = RemoteServers.DNS.start_link("workers.test.local", [{127, 0, 0, 2}])
    resolver = [nameservers: [{{127, 0, 0, 1}, RemoteServers.DNS.port(dns)}]]
    interval = 500

    pool =
      remote_pool!(%{
        discovery: {:dns, "workers.test.local", port, resolver},
        resolve_interval: interval
      })

    assert [%{endpoint: endpoint}] = Snakepit.list_workers(pool)
    assert endpoint == first.endpoint

    :ok = RemoteServers.DNS.set(dns, [{127, 0, 0, 2}, {127, 0, 0, 3}])
    added_at = System.monotonic_time(:millisecond)

    # a steady trickle of calls: the new endpoint must get some of them
    eventually(
      fn ->
        assert failures(load(pool, 8, 4, "sleep", %{seconds: 0.01})) == []
        requests(pool, second.endpoint) > 0
      end,
      interval + 1_000,
      10
    )

    assert System.monotonic_time(:millisecond) - added_at <= interval + 1_000

    # and one removed from the name drains and leaves the pool
    :ok = RemoteServers.DNS.set(dns, [{127, 0, 0, 3}])

    eventually(fn -> Enum.map(Snakepit.list_workers(pool), & &1.endpoint) == [second.endpoint] end)

    assert failures(load(pool, 20, 4, "ping", %{})) == []
  end

  test "an endpoint that cannot be reached: start_pool fails naming it; with await: false the others serve" do
    [up] = start_servers(["127.0.0.2"])
    down = "127.0.0.3:#{RemoteServers.free_port(["127.0.0.3"])}"
    config = %{worker_profile: :remote, endpoints: [up.endpoint, down], name: :remote_unreachable}

    assert {:error, %Snakepit.Error{reason: :worker_start_failed, message: message}} =
             Snakepit.start_pool(config)

    assert message =~ down

    pool = start_pool_no_wait!(Map.delete(config, :name))

    eventually(fn ->
      worker_of(pool, up.endpoint) && worker_of(pool, up.endpoint).status == :ready
    end)

    assert failures(load(pool, 20, 4, "ping", %{})) == []
    assert Snakepit.Pool.stats(pool).crashes >= 1
  end

  test "all at once under load: one endpoint killed, one NOT_SERVING, one added by DNS" do
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    port = RemoteServers.free_port(hosts)
    [killed, sick, steady, added] = Enum.map(hosts, &RemoteServers.start_owned(&1, port: port))

    {:ok, dns} =
      RemoteServers.DNS.start_link("workers.test.local", [
        {127, 0, 0, 2},
        {127, 0, 0, 3},
        {127, 0, 0, 4}
      ])

    interval = 500

    pool =
      remote_pool!(%{
        discovery:
          {:dns, "workers.test.local", port,
           nameservers: [{{127, 0, 0, 1}, RemoteServers.DNS.port(dns)}]},
        resolve_interval: interval,
        queue_timeout: 30_000
      })

    assert length(Snakepit.list_workers(pool)) == 3
    loader = Task.async(fn -> load(pool, 600, 12, "sleep", %{seconds: 0.02}) end)
    eventually(fn -> requests(pool, killed.endpoint) >= 10 end)

    RemoteServers.signal(killed, "KILL")
    RemoteServers.signal(sick, "USR1")
    :ok = RemoteServers.DNS.set(dns, [{127, 0, 0, 3}, {127, 0, 0, 4}, {127, 0, 0, 5}])
    changed_at = System.monotonic_time(:millisecond)

    eventually(fn -> worker_of(pool, sick.endpoint).status == :not_serving end)
    sick_requests = requests(pool, sick.endpoint)
    eventually(fn -> requests(pool, added.endpoint) > 0 end, interval + 1_000, 10)
    assert System.monotonic_time(:millisecond) - changed_at <= interval + 1_000

    results = Task.await(loader, 120_000)
    failed = failures(results)
    assert length(results) == 600
    # only calls in flight on the killed endpoint (its capacity, 4) fail, as :worker_crashed
    assert length(failed) <= 4
    assert Enum.all?(failed, &match?({:error, %Snakepit.Error{reason: :worker_crashed}}, &1))
    assert requests(pool, sick.endpoint) == sick_requests
    assert requests(pool, steady.endpoint) > 0
    # the killed one left DNS too: its slot is gone, not reconnecting
    eventually(fn -> worker_of(pool, killed.endpoint) == nil end)
  end

  test "an endpoint on a Unix socket serves like one on TCP" do
    # (a short path: a socket's path has at most 107 bytes)
    dir = Path.join(System.tmp_dir!(), "snkp-remote-#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    on_exit(fn -> File.rm_rf(dir) end)
    socket = Path.join(dir, "w.sock")
    [tcp, uds] = start_servers(["127.0.0.2", "unix:" <> socket])
    pool = remote_pool!(%{endpoints: [tcp.endpoint, uds.endpoint]})
    assert failures(load(pool, 40, 8, "sleep", %{seconds: 0.01})) == []
    assert worker_of(pool, uds.endpoint).uds == socket
    assert requests(pool, uds.endpoint) > 0 and requests(pool, tcp.endpoint) > 0
  end
end
