defmodule Snakepit.GRPC.Transport do
  @moduledoc """
  The socket under a `Snakepit.GRPC.Channel`: plain (`:gen_tcp`, TCP or a Unix socket) or TLS
  (`:ssl`, TCP only), behind one set of operations, so that the channel's HTTP/2 machinery is the
  same for both: `send/2`, `activate_once/1`, `close/1`, and `message/2`, which tells what a socket
  message (`{:tcp, ...}` or `{:ssl, ...}` and their `_closed`/`_error` forms) means.

  TLS (`connect/5` with `tls:` options) always verifies the server: its certificate chain against
  `:cacertfile` (default: the operating system's CA certificates), and its name (the host, or
  `:server_name`) with the HTTPS rules of `:public_key.pkix_verify_hostname_match_fun/1`. It offers
  ALPN `h2` and refuses a server that does not pick it. `:certfile`/`:keyfile` present a client
  certificate (for a server started with `--tls-client-ca`).
  """

  @enforce_keys [:kind, :socket]
  defstruct @enforce_keys

  @type t :: %__MODULE__{kind: :tcp | :ssl, socket: :gen_tcp.socket() | :ssl.sslsocket()}

  @typedoc """
  TLS options: `:cacertfile` (PEM file of the CA(s) the server's certificate must chain to; default
  the OS's CA store), `:certfile` and `:keyfile` (this client's certificate and unencrypted key,
  PEM, for mTLS; both or neither), `:server_name` (the name the server's certificate must carry,
  also sent as SNI; default the host connected to).
  """
  @type tls_opts :: [
          cacertfile: Path.t(),
          certfile: Path.t(),
          keyfile: Path.t(),
          server_name: String.t()
        ]

  @tls_keys [:cacertfile, :certfile, :keyfile, :server_name]

  @doc """
  Connects to `address` (a charlist or tuple host, or `{:local, path}`) and `port` with the
  `:gen_tcp` options `socket_opts`; with `tls` (a keyword list, see `t:tls_opts/0`) over TLS.
  `host` is the host as given, for the name check and the messages. TLS errors are
  `{:tls, message}`, the message saying what failed (a bad option, the server's certificate, its
  name, ALPN, or the server refusing this client's certificate or its lack).
  """
  @spec connect(
          :inet.socket_address() | :inet.hostname() | {:local, Path.t()},
          :inet.port_number(),
          [:gen_tcp.connect_option()],
          tls_opts() | nil,
          timeout()
        ) :: {:ok, t()} | {:error, term()}
  def connect(address, port, socket_opts, nil, timeout) do
    with {:ok, socket} <- :gen_tcp.connect(address, port, socket_opts, timeout),
         do: {:ok, %__MODULE__{kind: :tcp, socket: socket}}
  end

  def connect({:local, path}, _port, _socket_opts, _tls, _timeout),
    do:
      {:error,
       {:tls,
        "TLS over a Unix socket (#{path}) is not supported: the socket's file mode is its " <>
          "access control; connect without :tls, or over TCP"}}

  def connect(address, port, socket_opts, tls, timeout) do
    address = ip_or_name(address)

    with {:ok, ssl_opts} <- ssl_options(tls),
         {:ok, _} <- Application.ensure_all_started(:ssl) do
      case :ssl.connect(address, port, socket_opts ++ ssl_opts, timeout) do
        {:ok, socket} -> check_alpn(%__MODULE__{kind: :ssl, socket: socket}, address, port)
        {:error, reason} -> {:error, {:tls, describe_failure(reason, address, port, tls)}}
      end
    end
  end

  @doc """
  Sends the client's first bytes (`preface`, HTTP/2's connection preface) and, over TLS, waits up
  to `timeout` ms for the server's first bytes (its SETTINGS), so that a server that refuses this
  client's certificate (or its lack; under TLS 1.3 it says so only after the handshake) is a
  connect error, `{:tls, message}`. Returns the bytes received: `""` on a plain socket, which
  does not wait.
  """
  @spec open(t(), iodata(), tls_opts() | nil, timeout()) :: {:ok, binary()} | {:error, term()}
  def open(%__MODULE__{kind: :tcp} = transport, preface, _tls, _timeout) do
    with :ok <- __MODULE__.send(transport, preface), do: {:ok, ""}
  end

  def open(%__MODULE__{kind: :ssl, socket: socket}, preface, tls, timeout) do
    with :ok <- :ssl.send(socket, preface),
         {:ok, bytes} <- :ssl.recv(socket, 0, timeout) do
      {:ok, bytes}
    else
      {:error, :timeout} ->
        {:error, {:tls, "the server sent nothing within #{timeout} ms of the TLS handshake"}}

      {:error, reason} ->
        {:error, {:tls, describe_refusal(reason, tls)}}
    end
  end

  @doc "Sends iodata."
  @spec send(t(), iodata()) :: :ok | {:error, term()}
  def send(%__MODULE__{kind: :tcp, socket: socket}, data), do: :gen_tcp.send(socket, data)
  def send(%__MODULE__{kind: :ssl, socket: socket}, data), do: :ssl.send(socket, data)

  @doc "Asks for the next bytes as one message to the owner (`active: :once`)."
  @spec activate_once(t()) :: :ok | {:error, term()}
  def activate_once(%__MODULE__{kind: :tcp, socket: socket}),
    do: :inet.setopts(socket, active: :once)

  def activate_once(%__MODULE__{kind: :ssl, socket: socket}),
    do: :ssl.setopts(socket, active: :once)

  @spec close(t()) :: :ok
  def close(%__MODULE__{kind: :tcp, socket: socket}), do: :gen_tcp.close(socket)

  def close(%__MODULE__{kind: :ssl, socket: socket}) do
    _ = :ssl.close(socket)
    :ok
  end

  @doc """
  What a process message means for this socket: `{:data, bytes}`, `:closed`, `{:error, reason}`,
  or `:other` (not this socket's message).
  """
  @spec message(t(), term()) :: {:data, binary()} | :closed | {:error, term()} | :other
  def message(%__MODULE__{kind: :tcp, socket: s}, {:tcp, s, bytes}), do: {:data, bytes}
  def message(%__MODULE__{kind: :tcp, socket: s}, {:tcp_closed, s}), do: :closed
  def message(%__MODULE__{kind: :tcp, socket: s}, {:tcp_error, s, reason}), do: {:error, reason}
  def message(%__MODULE__{kind: :ssl, socket: s}, {:ssl, s, bytes}), do: {:data, bytes}
  def message(%__MODULE__{kind: :ssl, socket: s}, {:ssl_closed, s}), do: :closed
  def message(%__MODULE__{kind: :ssl, socket: s}, {:ssl_error, s, reason}), do: {:error, reason}
  def message(_transport, _message), do: :other

  @doc """
  Whether a connection to `host` without TLS leaves this machine: true unless the host is a
  loopback address (127.0.0.0/8, ::1, `"localhost"`) or a Unix socket (`{:local, path}`), or
  `tls` is given. Host names other than localhost count as remote (they may resolve anywhere).
  """
  @spec plaintext_warning?(term(), tls_opts() | nil | false) :: boolean()
  def plaintext_warning?(_host, tls) when is_list(tls), do: false
  def plaintext_warning?({:local, _path}, _tls), do: false
  def plaintext_warning?({127, _, _, _}, _tls), do: false
  def plaintext_warning?({0, 0, 0, 0, 0, 0, 0, 1}, _tls), do: false
  # An IPv4-mapped IPv6 loopback address, ::ffff:127.x.y.z
  def plaintext_warning?({0, 0, 0, 0, 0, 0xFFFF, a, _}, _tls) when div(a, 256) == 127, do: false
  def plaintext_warning?(host, _tls) when is_tuple(host), do: true

  def plaintext_warning?(host, tls) when is_binary(host) or is_list(host) do
    name = host |> to_string() |> String.downcase() |> String.trim_trailing(".")

    case :inet.parse_address(String.to_charlist(name)) do
      {:ok, address} -> plaintext_warning?(address, tls)
      {:error, _} -> name != "localhost" and not String.ends_with?(name, ".localhost")
    end
  end

  def plaintext_warning?(_host, _tls), do: true

  ## TLS options

  defp ssl_options(tls) when is_list(tls) do
    with :ok <- known_keys(tls),
         {:ok, trust} <- trust(tls),
         {:ok, identity} <- identity(tls) do
      {:ok,
       [
         verify: :verify_peer,
         versions: [:"tlsv1.3", :"tlsv1.2"],
         alpn_advertised_protocols: ["h2"],
         customize_hostname_check: [match_fun: :public_key.pkix_verify_hostname_match_fun(:https)]
       ] ++ name_check(Keyword.get(tls, :server_name)) ++ trust ++ identity}
    end
  end

  defp ssl_options(tls),
    do:
      {:error, {:tls, ":tls must be a keyword list (#{inspect(@tls_keys)}), got #{inspect(tls)}"}}

  defp known_keys(tls) do
    case Keyword.keys(tls) -- @tls_keys do
      [] ->
        :ok

      unknown ->
        {:error, {:tls, "unknown :tls options #{inspect(unknown)}; known: #{inspect(@tls_keys)}"}}
    end
  end

  defp trust(tls) do
    case Keyword.get(tls, :cacertfile) do
      nil -> {:ok, [cacerts: :public_key.cacerts_get()]}
      path -> with :ok <- readable(:cacertfile, path), do: {:ok, [cacertfile: to_charlist(path)]}
    end
  end

  defp identity(tls) do
    case {Keyword.get(tls, :certfile), Keyword.get(tls, :keyfile)} do
      {nil, nil} ->
        {:ok, []}

      {cert, key} when cert != nil and key != nil ->
        with :ok <- readable(:certfile, cert),
             :ok <- readable(:keyfile, key),
             do: {:ok, [certfile: to_charlist(cert), keyfile: to_charlist(key)]}

      _one ->
        {:error,
         {:tls, ":certfile and :keyfile go together (the client certificate and its key)"}}
    end
  end

  defp readable(key, path) do
    case File.read(path) do
      {:ok, _} ->
        :ok

      {:error, reason} ->
        {:error, {:tls, "#{inspect(key)} #{path}: #{:file.format_error(reason)}"}}
    end
  end

  # OTP checks the name it connects to (also sent as SNI) against the certificate's DNS names, and
  # an address given as a tuple against its IP addresses (SNI is for names only, RFC 6066); an IP
  # written as a string would be checked as a DNS name and fail, so it is made a tuple.
  defp ip_or_name(address) when is_list(address) do
    case :inet.parse_address(address) do
      {:ok, ip} -> ip
      {:error, _} -> address
    end
  end

  defp ip_or_name(address), do: address

  # `:server_name`: the certificate is checked against that name instead of the host's.
  defp name_check(nil), do: []
  defp name_check(name), do: [server_name_indication: to_charlist(name)]

  defp host_name(address) when is_tuple(address), do: to_string(:inet.ntoa(address))
  defp host_name(address), do: to_string(address)

  defp check_alpn(transport, address, port) do
    case :ssl.negotiated_protocol(transport.socket) do
      {:ok, "h2"} ->
        {:ok, transport}

      other ->
        close(transport)

        {:error,
         {:tls,
          "#{host_name(address)}:#{port} did not agree to HTTP/2 over TLS (ALPN h2): " <>
            "#{inspect(other)}"}}
    end
  end

  defp describe_failure({:tls_alert, {alert, detail}}, address, port, tls) do
    what =
      case alert do
        :unknown_ca ->
          "the server's certificate is not signed by a CA in #{trusted(tls)}"

        :bad_certificate ->
          "the server's certificate was refused (untrusted, or not for " <>
            "#{inspect(Keyword.get(tls, :server_name) || host_name(address))})"

        :handshake_failure ->
          "the handshake failed (the server's certificate does not carry the name " <>
            "#{inspect(Keyword.get(tls, :server_name) || host_name(address))}, or no common cipher)"

        :certificate_expired ->
          "the server's certificate has expired"

        :no_application_protocol ->
          "the server does not speak HTTP/2 over TLS (ALPN h2)"

        other ->
          describe_refusal({:tls_alert, {other, detail}}, tls)
      end

    "TLS handshake with #{host_name(address)}:#{port} failed: #{what} (#{alert}: #{chardata(detail)})"
  end

  defp describe_failure(reason, address, port, tls),
    do: "TLS connection to #{host_name(address)}:#{port} failed: #{describe_refusal(reason, tls)}"

  defp describe_refusal({:tls_alert, {:certificate_required, _}}, _tls),
    do: "the server requires a client certificate: give :certfile and :keyfile in :tls"

  defp describe_refusal({:tls_alert, {alert, detail}}, tls)
       when alert in [:unknown_ca, :bad_certificate] do
    "the server refused this client's certificate #{Keyword.get(tls || [], :certfile)} " <>
      "(#{alert}: #{chardata(detail)})"
  end

  defp describe_refusal({:tls_alert, {alert, detail}}, _tls),
    do: "the server ended the TLS session: #{alert}: #{chardata(detail)}"

  defp describe_refusal(reason, tls) when reason in [:closed, :econnreset] do
    hint =
      if Keyword.has_key?(tls || [], :certfile),
        do: "it may have refused this client's certificate",
        else: "it may require a client certificate (:certfile and :keyfile)"

    "the server closed the connection right after the TLS handshake: #{hint}"
  end

  defp describe_refusal(reason, _tls), do: inspect(reason)

  defp trusted(tls) do
    case Keyword.get(tls, :cacertfile) do
      nil -> "the operating system's CA store"
      path -> path
    end
  end

  defp chardata(detail) do
    detail |> to_string() |> String.trim()
  rescue
    _ -> inspect(detail)
  end
end
