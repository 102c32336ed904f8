defmodule Snakepit.GRPCTlsTest do
  # Snakepit.GRPC.Channel over TLS and mTLS against the real Python server (grpc_server_threaded.py
  # with --tls-cert/--tls-key/--tls-client-ca), on 127.0.0.1.
  use ExUnit.Case, async: false

  alias Snakepit.GRPC.{Channel, Error}
  alias Snakepit.Test.Pki
  alias Snakepit.Proto

  @moduletag timeout: 180_000
  @svc "/snakepit.bridge.BridgeService/"

  setup_all do
    dir = Path.join(System.tmp_dir!(), "snakepit-tls-#{System.unique_integer([:positive])}")
    pem = Pki.make(dir)
    tls_server = start_server!(server_flags(pem))
    mtls_server = start_server!(server_flags(pem) ++ ["--tls-client-ca", pem.("ca")])

    on_exit(fn ->
      stop_server(tls_server)
      stop_server(mtls_server)
      File.rm_rf!(dir)
    end)

    %{pem: pem, tls_port: tls_server.port, mtls_port: mtls_server.port}
  end

  defp server_flags(pem), do: ["--tls-cert", pem.("server"), "--tls-key", pem.("server-key")]

  # The real worker server; it exits when its stdin (the port) closes.
  defp start_server!(flags) do
    script = Path.join(Snakepit.Config.repo_root(), "grpc_server_threaded.py")

    port =
      Port.open({:spawn_executable, Snakepit.Config.default_python()}, [
        :binary,
        :exit_status,
        {:line, 8192},
        args: ["-u", script, "--host", "127.0.0.1", "--port", "0", "--exit-on-stdin-eof"] ++ flags
      ])

    wait_ready(port, System.monotonic_time(:millisecond) + 30_000)
  end

  defp wait_ready(port, deadline) do
    receive do
      {^port, {:data, {:eol, "SNAKEPIT_READY port=" <> rest}}} ->
        [number | _] = String.split(rest, " ")
        %{port: String.to_integer(number), handle: port}

      {^port, {:data, _}} ->
        wait_ready(port, deadline)

      {^port, {:exit_status, status}} ->
        raise "the TLS test server exited with status #{status}"
    after
      max(deadline - System.monotonic_time(:millisecond), 0) ->
        raise "the TLS test server did not become ready"
    end
  end

  defp stop_server(%{handle: port}) do
    if Port.info(port), do: Port.close(port)
  catch
    _, _ -> :ok
  end

  defp connect(port, tls, opts \\ []) do
    Channel.start_link([host: "127.0.0.1", port: port, tls: tls, connect_timeout: 10_000] ++ opts)
  end

  defp add(channel, a, b, opts \\ []) do
    request =
      Proto.encode(:execute_tool_request, %{
        tool_name: "add",
        args_json: :jiffy.encode(%{"a" => a, "b" => b})
      })

    with {:ok, bytes, _trailers} <- Channel.unary(channel, @svc <> "ExecuteTool", request, opts) do
      {:ok, response} = Proto.decode(:execute_tool_response, bytes)
      {:ok, :jiffy.decode(response.result_json)}
    end
  end

  defp ping(channel) do
    request = Proto.encode(:ping_request, %{message: "over tls"})

    with {:ok, bytes, _} <- Channel.unary(channel, @svc <> "Ping", request) do
      Proto.decode(:ping_response, bytes)
    end
  end

  describe "TLS" do
    test "a channel that trusts the CA pings and executes a tool", %{pem: pem, tls_port: port} do
      {:ok, channel} = connect(port, cacertfile: pem.("ca"))
      assert {:ok, %{message: _}} = ping(channel)
      assert {:ok, 42} = add(channel, 40, 2)
      Channel.close(channel)
    end

    test "the host name is checked too: localhost matches the certificate's DNS name",
         %{pem: pem, tls_port: port} do
      {:ok, channel} =
        Channel.start_link(host: "localhost", port: port, tls: [cacertfile: pem.("ca")])

      assert {:ok, 3} = add(channel, 1, 2)
      Channel.close(channel)
    end

    test "a server certificate from another CA is refused with a message naming the CA file",
         %{pem: pem, tls_port: port} do
      assert {:error, {:tls, message}} = connect(port, cacertfile: pem.("other-ca"))
      assert message =~ "TLS handshake with 127.0.0.1:#{port} failed"
      assert message =~ "other-ca.pem"
    end

    test "a certificate for another name is refused; asking for that name with :server_name passes",
         %{pem: pem} do
      server =
        start_server!(["--tls-cert", pem.("wrong-name"), "--tls-key", pem.("wrong-name-key")])

      try do
        assert {:error, {:tls, message}} = connect(server.port, cacertfile: pem.("ca"))
        assert message =~ "127.0.0.1"
        assert message =~ "handshake"

        {:ok, channel} =
          connect(server.port, cacertfile: pem.("ca"), server_name: "wrong.example")

        assert {:ok, 5} = add(channel, 2, 3)
        Channel.close(channel)
      after
        stop_server(server)
      end
    end

    test "a plaintext channel gets no answer from a TLS server", %{tls_port: port} do
      # the channel, linked, stops when the server drops the connection
      Process.flag(:trap_exit, true)

      case Channel.start_link(host: "127.0.0.1", port: port) do
        {:ok, channel} ->
          assert {:error, %Error{status: :unavailable}} = add(channel, 1, 2, timeout: 5_000)

        {:error, _} ->
          :ok
      end
    end

    test "TLS and the bearer token both apply: a wrong token is :unauthenticated", %{pem: pem} do
      server =
        start_server!(
          server_flags(pem) ++ ["--auth-token-env", "TLS_TEST_TOKEN"],
          "TLS_TEST_TOKEN"
        )

      try do
        for {token, expected} <- [{"s3cret", :ok}, {"wrong", :unauthenticated}] do
          {:ok, channel} =
            connect(server.port, [cacertfile: pem.("ca")],
              metadata: [{"authorization", "Bearer #{token}"}]
            )

          case expected do
            :ok -> assert {:ok, 2} = add(channel, 1, 1)
            code -> assert {:error, %Error{status: ^code}} = add(channel, 1, 1)
          end

          Channel.close(channel)
        end
      after
        stop_server(server)
      end
    end
  end

  describe "mTLS" do
    test "a channel with a client certificate the CA signed executes a tool",
         %{pem: pem, mtls_port: port} do
      {:ok, channel} =
        connect(port,
          cacertfile: pem.("ca"),
          certfile: pem.("client"),
          keyfile: pem.("client-key")
        )

      assert {:ok, 7} = add(channel, 3, 4)
      Channel.close(channel)
    end

    test "a channel without a client certificate is refused at start_link",
         %{pem: pem, mtls_port: port} do
      assert {:error, {:tls, message}} = connect(port, cacertfile: pem.("ca"))
      assert message =~ "client certificate"
    end

    test "a client certificate another CA signed is refused at start_link",
         %{pem: pem, mtls_port: port} do
      assert {:error, {:tls, message}} =
               connect(port,
                 cacertfile: pem.("ca"),
                 certfile: pem.("other-ca"),
                 keyfile: pem.("other-ca-key")
               )

      assert message =~ "other-ca.pem" or message =~ "refused", message
    end

    test "the grpclib transport serves mTLS to the channel too", %{pem: pem} do
      server =
        start_server!(
          server_flags(pem) ++ ["--tls-client-ca", pem.("ca"), "--transport", "grpclib"]
        )

      try do
        tls = [cacertfile: pem.("ca"), certfile: pem.("client"), keyfile: pem.("client-key")]
        {:ok, channel} = connect(server.port, tls)
        assert {:ok, 9} = add(channel, 4, 5)
        Channel.close(channel)

        assert {:error, {:tls, message}} = connect(server.port, cacertfile: pem.("ca"))
        assert message =~ "client certificate"
      after
        stop_server(server)
      end
    end
  end

  describe "bad :tls options are errors from start_link naming the option" do
    test "certfile without keyfile, an unreadable file, an unknown key, a Unix socket",
         %{pem: pem, tls_port: port} do
      assert {:error, {:tls, m1}} =
               connect(port, cacertfile: pem.("ca"), certfile: pem.("client"))

      assert m1 =~ ":certfile and :keyfile go together"

      assert {:error, {:tls, m2}} = connect(port, cacertfile: "/nonexistent/ca.pem")
      assert m2 =~ ":cacertfile /nonexistent/ca.pem"

      assert {:error, {:tls, m3}} = connect(port, cafile: pem.("ca"))
      assert m3 =~ "unknown :tls options [:cafile]"

      assert {:error, {:tls, m4}} =
               Channel.start_link(host: {:local, "/tmp/x.sock"}, tls: [cacertfile: pem.("ca")])

      assert m4 =~ "Unix socket"
    end

    test "a TLS server that does not offer ALPN h2 is refused", %{pem: pem} do
      {:ok, _} = Application.ensure_all_started(:ssl)

      {:ok, listener} =
        :ssl.listen(0,
          certfile: to_charlist(pem.("server")),
          keyfile: to_charlist(pem.("server-key")),
          reuseaddr: true
        )

      {:ok, {_, port}} = :ssl.sockname(listener)

      acceptor =
        spawn_link(fn ->
          {:ok, socket} = :ssl.transport_accept(listener)
          _ = :ssl.handshake(socket, 10_000)
          Process.sleep(5_000)
        end)

      assert {:error, {:tls, message}} = connect(port, cacertfile: pem.("ca"))
      assert message =~ "ALPN h2"
      Process.unlink(acceptor)
      Process.exit(acceptor, :kill)
      :ssl.close(listener)
    end
  end

  describe "plaintext_warning?/2" do
    test "loopback hosts and Unix sockets are local; any other host without TLS is not" do
      for host <- [
            "127.0.0.1",
            "127.1.2.3",
            ~c"127.0.0.1",
            {127, 0, 0, 1},
            "::1",
            {0, 0, 0, 0, 0, 0, 0, 1},
            "::ffff:127.0.0.1",
            "localhost",
            "LOCALHOST.",
            {:local, "/tmp/w.sock"}
          ] do
        refute Channel.plaintext_warning?(host, nil), inspect(host)
      end

      for host <- ["10.0.0.5", {192, 168, 1, 2}, "2001:db8::1", "worker-3.example", "0.0.0.0"] do
        assert Channel.plaintext_warning?(host, nil), inspect(host)
        refute Channel.plaintext_warning?(host, cacertfile: "ca.pem"), inspect(host)
      end
    end
  end

  # start_server!/1 with an environment variable for --auth-token-env.
  defp start_server!(flags, token_env) do
    System.put_env(token_env, "s3cret")

    try do
      start_server!(flags)
    after
      System.delete_env(token_env)
    end
  end
end
