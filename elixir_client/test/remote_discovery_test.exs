defmodule Snakepit.RemoteDiscoveryTest do
  # DNS discovery against a DNS server this test runs on 127.0.0.1 (and one that never answers).
  use ExUnit.Case, async: true

  alias Snakepit.Remote.Discovery
  alias Snakepit.Test.RemoteServers.DNS

  defp spec(port, name \\ "workers.test.local"),
    do: {:dns, name, 50_052, [nameservers: [{{127, 0, 0, 1}, port}], timeout: 300, retry: 1]}

  test "the name's A records become endpoints on the port, sorted, one per address" do
    {:ok, dns} =
      DNS.start_link("workers.test.local", [{127, 0, 0, 3}, {127, 0, 0, 2}, {127, 0, 0, 3}])

    assert {:ok, endpoints} = Discovery.resolve(spec(DNS.port(dns)))
    assert Enum.map(endpoints, & &1.text) == ["127.0.0.2:50052", "127.0.0.3:50052"]
    assert hd(endpoints).host == {127, 0, 0, 2} and hd(endpoints).port == 50_052
  end

  test "a name without addresses has no endpoints" do
    {:ok, dns} = DNS.start_link("workers.test.local", [{127, 0, 0, 2}])
    assert {:ok, []} = Discovery.resolve(spec(DNS.port(dns), "other.test.local"))
  end

  test "a resolver that does not answer is an error (the pool keeps its endpoints)" do
    {:ok, silent} = :gen_udp.open(0, ip: {127, 0, 0, 1})
    {:ok, port} = :inet.port(silent)
    assert {:error, "cannot resolve workers.test.local: " <> why} = Discovery.resolve(spec(port))
    assert why =~ "timeout"
  end

  test "the Discovery process reports to its pool, every interval, what the name has then" do
    {:ok, dns} = DNS.start_link("workers.test.local", [{127, 0, 0, 2}])
    pool = self()
    {:ok, pid} = Discovery.start_link(pool, spec(DNS.port(dns)), 50)
    assert_receive {:snakepit_discovered, ^pid, {:ok, [%{text: "127.0.0.2:50052"}]}}, 2_000
    :ok = DNS.set(dns, [{127, 0, 0, 4}])
    assert_receive {:snakepit_discovered, ^pid, {:ok, [%{text: "127.0.0.4:50052"}]}}, 2_000
    Process.unlink(pid)
  end
end
