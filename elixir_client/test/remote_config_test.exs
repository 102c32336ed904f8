defmodule Snakepit.RemoteConfigTest do
  # The config of `worker_profile: :remote` pools: endpoints, discovery, and the keys that make no
  # sense for workers the pool did not start, each refused with a message naming the key.
  use ExUnit.Case, async: true

  alias Snakepit.Config
  alias Snakepit.Remote.{Backoff, Endpoint}

  defp remote(extra), do: Config.new(Map.merge(%{name: :r, worker_profile: :remote}, extra))

  test "static endpoints: host:port, [v6]:port and unix:/path, one worker slot each" do
    {:ok, c} = remote(%{endpoints: ["10.0.0.5:50051", "[::1]:7000", "unix:/run/w.sock", "w1:9"]})
    assert c.pool_size == 4

    assert Enum.map(c.endpoints, &Endpoint.channel_address/1) == [
             [host: {10, 0, 0, 5}, port: 50051],
             [host: {0, 0, 0, 0, 0, 0, 0, 1}, port: 7000],
             [host: {:local, "/run/w.sock"}],
             [host: "w1", port: 9]
           ]

    assert c.threads_per_worker == :from_server and c.shm == false and c.worker_ttl == :infinity
  end

  test "bad endpoints are refused naming the key and the endpoint" do
    for bad <- ["nohost", "h:0", "h:99999", "unix:relative", "[::1]7000", :atom] do
      assert {:error, "invalid pool config key :endpoints: " <> _} = remote(%{endpoints: [bad]})
    end

    assert {:error, msg} = remote(%{endpoints: ["a:1", "a:1"]})
    assert msg =~ "listed twice"
    assert {:error, msg} = remote(%{})
    assert msg =~ ":endpoints" and msg =~ ":discovery"
  end

  test "DNS discovery with resolver options; a bad spec names :discovery" do
    {:ok, c} = remote(%{discovery: {:dns, "workers.ns.svc.cluster.local", 50051}})
    assert c.discovery == {:dns, "workers.ns.svc.cluster.local", 50051, []}
    assert c.pool_size == 0 and c.resolve_interval == 5_000

    ns = [nameservers: [{{127, 0, 0, 1}, 5353}], timeout: 500]
    assert {:ok, %{discovery: {:dns, "w", 1, ^ns}}} = remote(%{discovery: {:dns, "w", 1, ns}})

    for bad <- [{:dns, "", 1}, {:dns, "w", 0}, {:srv, "w", 1}, {:dns, "w", 1, [bogus: 1]}] do
      assert {:error, "invalid pool config key :discovery: " <> _} = remote(%{discovery: bad})
    end
  end

  test "recycling keys do not apply to workers the pool did not start; max_connection_age does" do
    for key <- [:worker_ttl, :worker_max_requests, :pool_size] do
      value = if key == :worker_ttl, do: {1, :hours}, else: 10
      assert {:error, msg} = remote(%{endpoints: ["a:1"]} |> Map.put(key, value))

      assert msg =~
               "invalid pool config key #{inspect(key)}: does not apply to worker_profile: :remote"
    end

    assert {:error, "invalid pool config key :shm: " <> _} =
             remote(%{endpoints: ["a:1"], shm: true})

    {:ok, c} = remote(%{endpoints: ["a:1"], max_connection_age: {10, :minutes}})
    assert c.worker_ttl == 600_000 and c.ttl_jitter == 0.1

    assert {:error, "invalid pool config key :endpoints: applies only to worker_profile: :remote"} =
             Config.new(%{name: :l, endpoints: ["a:1"]})
  end

  test "tls: a keyword list, kept for the channels as given" do
    assert {:ok, %{tls: [verify: :verify_none]}} =
             remote(%{endpoints: ["a:1"], tls: [verify: :verify_none]})

    assert {:error, "invalid pool config key :tls: " <> _} =
             remote(%{endpoints: ["a:1"], tls: "yes"})
  end

  test "reconnect backoff grows exponentially up to its cap, jittered within [delay/2, delay]" do
    rand = :rand.seed_s(:exsss, 42)

    {delays, _} =
      Enum.map_reduce(1..12, rand, fn n, rand -> Backoff.delay(n, 100, 5_000, rand) end)

    steps = Enum.map(1..12, &min(100 * Integer.pow(2, &1 - 1), 5_000))
    assert Enum.all?(Enum.zip(delays, steps), fn {d, s} -> d >= div(s, 2) and d <= s end)
    assert length(Enum.uniq(delays)) > 6
  end

  test "deploy/kubernetes/pool_config.exs is a valid remote pool config" do
    path = Path.join(Config.repo_root(), "deploy/kubernetes/pool_config.exs")

    [pool] =
      path |> Elixir.Config.Reader.read!() |> Keyword.fetch!(:snakepit) |> Keyword.fetch!(:pools)

    assert {:ok, c} = Config.new(pool)
    assert c.worker_profile == :remote
    assert {:dns, "snakepit-workers.default.svc.cluster.local", 50052, []} = c.discovery
  end

  test "the README's remote pool configs are valid as written" do
    readme = File.read!(Path.join(Config.repo_root(), "elixir_client/README.md"))
    [_, section] = String.split(readme, "\n## Remote workers", parts: 2)
    [section | _] = String.split(section, "\n## ", parts: 2)
    [[_, block]] = Regex.scan(~r/```elixir\n(.*?)```/s, section)
    # one config per paragraph, after its comment line
    configs =
      for chunk <- String.split(block, "\n\n", trim: true) do
        chunk |> String.replace(~r/^#.*\n/m, "") |> Code.eval_string() |> elem(0)
      end

    assert length(configs) == 3
    assert Enum.all?(configs, &match?({:ok, %{worker_profile: :remote}}, Config.new(&1)))
  end
end
