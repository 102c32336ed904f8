Code.require_file("pool_helpers.exs", __DIR__)

defmodule Snakepit.RemoteTlsTest do
  # A remote pool (`worker_profile: :remote`) over TLS and mTLS to real Python servers started
  # with --tls-cert/--tls-key (and --tls-client-ca) on 127.0.0.2 and .3; and the warning a pool
  # logs for endpoints it would reach in plaintext outside loopback.
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog
  import Snakepit.PoolHelpers
  alias Snakepit.Remote.Endpoint
  alias Snakepit.Test.{Pki, RemoteServers}

  @moduletag timeout: 180_000

  setup_all do
    dir =
      Path.join(System.tmp_dir!(), "snakepit-remote-tls-#{System.unique_integer([:positive])}")

    pem = Pki.make(dir)
    on_exit(fn -> File.rm_rf!(dir) end)
    %{pem: pem}
  end

  defp tls_flags(pem), do: ["--tls-cert", pem.("server"), "--tls-key", pem.("server-key")]

  # The message of the :worker_start_failed error of a remote pool of `endpoint` with `tls`.
  defp start_failure(endpoint, tls) do
    config = [
      name: :"tls_failure_#{System.unique_integer([:positive])}",
      worker_profile: :remote,
      endpoints: [endpoint],
      tls: tls,
      startup_timeout: 10_000
    ]

    capture_log(fn -> send(self(), {:started, Snakepit.start_pool(config)}) end)
    assert_received {:started, {:error, %Snakepit.Error{reason: :worker_start_failed} = error}}
    error.message
  end

  defp remote_pool!(config) do
    start_pool!(Map.merge(%{worker_profile: :remote, health_check_interval: :infinity}, config))
  end

  test "a remote pool with tls: verifies its TLS endpoints and serves calls over them", %{
    pem: pem
  } do
    servers =
      for host <- ["127.0.0.2", "127.0.0.3"],
          do: RemoteServers.start_owned(host, flags: tls_flags(pem))

    pool =
      remote_pool!(%{
        endpoints: Enum.map(servers, & &1.endpoint),
        tls: [cacertfile: pem.("ca")]
      })

    # 8 callers on 2 endpoints of 4 slots each: both serve
    results =
      1..24
      |> Task.async_stream(
        fn _ -> Snakepit.execute(pool, "sleep", %{seconds: 0.05}) end,
        max_concurrency: 8,
        timeout: 30_000
      )
      |> Enum.map(fn {:ok, r} -> r end)

    assert Enum.all?(results, &match?({:ok, %{"cancelled" => false}}, &1))

    assert {:ok, %{"message" => "over TLS"}} =
             Snakepit.execute(pool, "echo", %{message: "over TLS"})

    assert Enum.all?(Snakepit.list_workers(pool), &(&1.status == :ready and &1.requests > 0))
  end

  test "a remote pool presents its client certificate to mTLS endpoints; without one it cannot start",
       %{pem: pem} do
    server =
      RemoteServers.start_owned("127.0.0.2",
        flags: tls_flags(pem) ++ ["--tls-client-ca", pem.("ca")]
      )

    pool =
      remote_pool!(%{
        endpoints: [server.endpoint],
        tls: [cacertfile: pem.("ca"), certfile: pem.("client"), keyfile: pem.("client-key")]
      })

    assert {:ok, %{"message" => "hi"}} = Snakepit.execute(pool, "echo", %{message: "hi"})

    assert start_failure(server.endpoint, cacertfile: pem.("ca")) =~ server.endpoint
  end

  test "a remote pool whose CA did not sign the server's certificate does not start", %{pem: pem} do
    server = RemoteServers.start_owned("127.0.0.2", flags: tls_flags(pem))

    message = start_failure(server.endpoint, cacertfile: pem.("other-ca"))
    assert message =~ server.endpoint
    assert message =~ "TLS"
  end

  test "plaintext endpoints outside loopback are warned about; loopback, Unix sockets and TLS are not" do
    {:ok, lan} = Endpoint.parse("10.1.2.3:50051")
    {:ok, name} = Endpoint.parse("gpu-7.example.com:50051")
    {:ok, local} = Endpoint.parse("127.0.0.2:50051")
    {:ok, v6_local} = Endpoint.parse("[::1]:50051")
    {:ok, uds} = Endpoint.parse("unix:/run/snakepit/w1.sock")

    warnings =
      Endpoint.plaintext_warnings([lan, name, local, v6_local, uds], "workers.ns.svc", nil)

    assert length(warnings) == 3
    assert Enum.at(warnings, 0) =~ "endpoint 10.1.2.3:50051 is reached over plaintext TCP"
    assert Enum.at(warnings, 1) =~ "gpu-7.example.com:50051"
    assert Enum.at(warnings, 2) =~ "DNS name workers.ns.svc"
    assert Enum.all?(warnings, &(&1 =~ "tls:"))

    assert Endpoint.plaintext_warnings([lan, name], "workers.ns.svc", cacertfile: "/ca.pem") == []
    assert Endpoint.plaintext_warnings([local, uds], "localhost", nil) == []
  end

  test "a pool started with a plaintext endpoint outside loopback logs the warning; a loopback one does not" do
    server = RemoteServers.start_owned("127.0.0.2")

    quiet = capture_log(fn -> remote_pool!(%{endpoints: [server.endpoint]}) end)
    refute quiet =~ "plaintext"

    # This machine's own host name: not "localhost", so it counts as remote (a name may resolve
    # anywhere), yet any connect attempt stays on this host. Nothing listens there (await: false).
    {:ok, host} = :inet.gethostname()
    endpoint = "#{host}:#{RemoteServers.free_port(["127.0.0.1"])}"

    logged =
      capture_log(fn ->
        name = :"named_#{System.unique_integer([:positive])}"

        {:ok, _} =
          Snakepit.start_pool(
            [name: name, worker_profile: :remote, endpoints: [endpoint], startup_timeout: 1_000],
            await: false
          )

        Snakepit.stop_pool(name)
      end)

    assert logged =~ "endpoint #{endpoint} is reached over plaintext TCP outside loopback"
  end
end
