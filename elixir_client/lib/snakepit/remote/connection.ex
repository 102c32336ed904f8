defmodule Snakepit.Remote.Connection do
  @moduledoc """
  One connection of a `worker_profile: :remote` pool to one endpoint (a Python server the pool did
  not start): to the pool it is a worker, whose life is connect -> Health/Watch SERVING -> ready
  instead of spawn -> ready line.

    1. Connects one `Snakepit.GRPC.Channel` (the pool's `tls:` options passed through, the bearer
       token as metadata) and opens a `Snakepit.Remote.HealthWatch` stream on it.
    2. At the first SERVING it reads the endpoint's capacity when the pool has none of its own
       (`threads_per_worker: :from_server`: `GetStats.max_workers`), then tells its pool
       `{:snakepit_worker_ready, pid, info}` (`info`: channel, endpoint, capacity, port or uds).
    3. After that, NOT_SERVING (or any other status) tells the pool
       `{:snakepit_worker_serving, pid, false}`: out of rotation at once, calls in flight go on;
       SERVING again `{:snakepit_worker_serving, pid, true}`.
    4. GOAWAY (the server is shutting down, or ends the connection on its own max age): the
       channel drains, the pool is told `{:snakepit_worker_draining, pid, reason}` as for a local
       worker; this process stops when the channel does.

  It stops when the channel goes down (the server died, the network broke: `{:shutdown,
  {:channel_down, reason}}`, so calls in flight fail with `:worker_crashed`), when the Watch
  stream ends while the channel lives (the server does not serve health, or ended it), and when
  its pool exits. Before it is ready it stops with `{:shutdown, {:start_failed, message}}` (cannot
  connect) or `{:shutdown, {:startup_timeout, message}}` (no SERVING within `startup_timeout`);
  the pool then reconnects after a jittered backoff (`Snakepit.Remote.Backoff`). Connecting is
  done after `init/1` returns, so the pool never waits on the network.
  """

  use GenServer, restart: :temporary
  require Logger

  alias Snakepit.GRPC.Channel
  alias Snakepit.Remote.{Endpoint, HealthWatch}
  alias Snakepit.Proto

  @get_stats "/snakepit.bridge.BridgeService/GetStats"

  @doc false
  def start_link(opts), do: GenServer.start_link(__MODULE__, opts)

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    config = Keyword.fetch!(opts, :config)
    endpoint = Keyword.fetch!(opts, :endpoint)
    Logger.metadata(pool: config.name, worker: Keyword.fetch!(opts, :id), endpoint: endpoint.text)
    send(self(), :connect)

    {:ok,
     %{
       id: Keyword.fetch!(opts, :id),
       pool: Keyword.fetch!(opts, :pool),
       config: config,
       endpoint: endpoint,
       channel: nil,
       watch: nil,
       status: :starting,
       serving: false,
       startup_timer: Process.send_after(self(), :startup_timeout, config.startup_timeout)
     }}
  end

  @impl true
  def handle_cast(:stop_gracefully, s) do
    if s.channel, do: Channel.close(s.channel)
    {:stop, :normal, %{s | channel: nil}}
  end

  @impl true
  def handle_info(:connect, s) do
    with {:ok, ch} <- Channel.start_link(channel_options(s)),
         {:ok, watch} <- HealthWatch.start(ch) do
      {:noreply, %{s | channel: ch, watch: watch}}
    else
      {:error, %Snakepit.GRPC.Error{} = e} ->
        start_failed(s, "cannot watch its health: #{e.status}: #{e.message}")

      {:error, reason} ->
        start_failed(s, "cannot connect: #{inspect(reason)}")
    end
  end

  def handle_info({:snakepit_grpc, ref, {:message, message}}, %{watch: ref} = s) do
    case HealthWatch.status(message) do
      {:ok, status} -> health(s, status)
      {:error, why} -> {:stop, {:shutdown, {:bad_health_watch, why}}, s}
    end
  end

  # The Watch stream ended while the channel lives: a server that does not implement it, or one
  # that ended it. Without it the pool cannot see this endpoint's health: reconnect.
  def handle_info({:snakepit_grpc, ref, ending}, %{watch: ref} = s) do
    why =
      case ending do
        {:error, e} -> "#{e.status}: #{e.message}"
        {:done, _trailers} -> "the server ended it"
      end

    if s.status == :starting,
      do: start_failed(s, "its Health/Watch stream ended (#{why})"),
      else: {:stop, {:shutdown, {:health_watch_ended, why}}, s}
  end

  def handle_info({:snakepit_grpc_draining, ch, reason}, %{channel: ch} = s) do
    Logger.debug("snakepit endpoint #{s.endpoint.text}: channel draining: #{inspect(reason)}")
    if s.status == :ready, do: send(s.pool, {:snakepit_worker_draining, self(), reason})
    {:noreply, %{s | status: :draining}}
  end

  def handle_info({:EXIT, pid, reason}, %{pool: pid} = s), do: {:stop, reason, s}

  def handle_info({:EXIT, ch, reason}, %{channel: ch} = s) when ch != nil do
    s = %{s | channel: nil}

    if s.status == :starting,
      do: start_failed(s, "its connection went down: #{inspect(reason)}"),
      else: {:stop, {:shutdown, {:channel_down, reason}}, s}
  end

  def handle_info(:startup_timeout, %{status: :starting} = s) do
    why = if s.channel, do: "connected, but not SERVING", else: "not connected"

    {:stop,
     {:shutdown,
      {:startup_timeout,
       "endpoint #{s.endpoint.text}: not ready within startup_timeout (#{s.config.startup_timeout} ms): #{why}"}},
     s}
  end

  def handle_info(_msg, s), do: {:noreply, s}

  @impl true
  def terminate(_reason, s) do
    if s.channel, do: Channel.close(s.channel)
    :ok
  end

  defp health(%{status: :starting} = s, :serving) do
    case capacity(s) do
      {:ok, capacity} -> become_ready(s, capacity)
      {:error, why} -> start_failed(s, "cannot read its capacity (GetStats): #{why}")
    end
  end

  # connected but not (yet) serving: it stays out of the pool until SERVING or startup_timeout
  defp health(%{status: :starting} = s, _status), do: {:noreply, s}

  defp health(s, status) do
    serving = status == :serving

    if serving != s.serving and s.status == :ready do
      Logger.info(
        "snakepit endpoint #{s.endpoint.text}: #{if serving, do: "SERVING again", else: "#{status}: out of rotation"}"
      )

      send(s.pool, {:snakepit_worker_serving, self(), serving})
    end

    {:noreply, %{s | serving: serving}}
  end

  defp become_ready(s, capacity) do
    Process.cancel_timer(s.startup_timer)
    e = s.endpoint

    info = %{
      channel: s.channel,
      os_pid: nil,
      port: e.port,
      uds: e.path,
      endpoint: e.text,
      capacity: capacity
    }

    send(s.pool, {:snakepit_worker_ready, self(), info})
    Logger.debug("snakepit endpoint #{e.text} ready, capacity #{capacity}")
    {:noreply, %{s | status: :ready, serving: true}}
  end

  # The pool's threads_per_worker, or what the server says it runs at once.
  defp capacity(%{config: %{threads_per_worker: n}}) when is_integer(n), do: {:ok, n}

  defp capacity(s) do
    timeout = s.config.health_check_timeout

    case Channel.unary(s.channel, @get_stats, Proto.encode(:get_stats_request, %{}),
           timeout: timeout
         ) do
      {:ok, body, _} ->
        case Proto.decode(:get_stats_response, body) do
          {:ok, %{max_workers: n}} when is_integer(n) and n > 0 -> {:ok, n}
          {:ok, stats} -> {:error, "max_workers is #{inspect(stats[:max_workers])}"}
          {:error, why} -> {:error, inspect(why)}
        end

      {:error, e} ->
        {:error, "#{e.status}: #{e.message}"}
    end
  end

  defp start_failed(s, why) do
    if s.channel, do: Channel.close(s.channel)

    {:stop, {:shutdown, {:start_failed, "endpoint #{s.endpoint.text}: #{why}"}},
     %{s | channel: nil}}
  end

  defp channel_options(s) do
    c = s.config

    metadata =
      case c.auth_token do
        nil -> []
        tok -> [{"authorization", "Bearer " <> tok}]
      end

    tls = if c.tls, do: [tls: c.tls], else: []

    Endpoint.channel_address(s.endpoint) ++
      [metadata: metadata, max_message_size: c.max_message_mb * 1024 * 1024] ++ tls
  end
end
