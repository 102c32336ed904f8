defmodule Snakepit.Remote.Discovery do
  @moduledoc """
  DNS discovery of a remote pool's endpoints: `discovery: {:dns, name, port}` or `{:dns, name,
  port, resolver_opts}`. Every `resolve_interval` ms it resolves `name`'s A and AAAA records with
  `:inet_res` (a Kubernetes headless Service has one record per ready pod) and sends its pool
  `{:snakepit_discovered, pid, {:ok, endpoints} | {:error, why}}`; the pool adds the endpoints
  that appeared and drains those that went away.

  `resolver_opts` go to `:inet_res` (`:nameservers`, e.g. `[{{10, 0, 0, 10}, 53}]`, `:timeout`
  in ms per try, `:retry`); without them the system's resolver configuration is used. A name that
  does not exist (NXDOMAIN) or has no address means no endpoints; a resolver that does not answer
  (timeout, refused) is an error, and the pool keeps the endpoints it has.
  """

  use GenServer
  alias Snakepit.Remote.Endpoint

  @type spec :: {:dns, String.t(), :inet.port_number(), keyword}

  # bounded: a resolver that does not answer delays one round, never blocks the pool for long
  @default_resolver_opts [timeout: 2_000, retry: 1]

  @doc "Starts resolving for `pool` every `interval` ms, the first time after `interval`."
  @spec start_link(pid, spec, pos_integer) :: GenServer.on_start()
  def start_link(pool, spec, interval),
    do: GenServer.start_link(__MODULE__, {pool, spec, interval})

  @doc "Resolves `spec` once: the endpoints (sorted, one per address) or why it could not."
  @spec resolve(spec) :: {:ok, [Endpoint.t()]} | {:error, String.t()}
  def resolve({:dns, name, port, opts}) do
    opts = Keyword.merge(@default_resolver_opts, opts)
    host = String.to_charlist(name)

    with {:ok, v4} <- lookup(host, :a, opts),
         {:ok, v6} <- lookup(host, :aaaa, opts) do
      {:ok,
       (v4 ++ v6) |> Enum.uniq() |> Enum.sort() |> Enum.map(&Endpoint.from_address(&1, port))}
    else
      {:error, why} -> {:error, "cannot resolve #{name}: #{inspect(why)}"}
    end
  end

  defp lookup(host, type, opts) do
    case :inet_res.resolve(host, :in, type, opts) do
      {:ok, msg} ->
        {:ok,
         for rr <- :inet_dns.msg(msg, :anlist), :inet_dns.rr(rr, :type) == type do
           :inet_dns.rr(rr, :data)
         end}

      {:error, :nxdomain} ->
        {:ok, []}

      {:error, {:nxdomain, _msg}} ->
        {:ok, []}

      {:error, {:noquery, _msg}} ->
        {:ok, []}

      {:error, reason} ->
        {:error, reason}
    end
  end

  @impl true
  def init({pool, spec, interval}) do
    Process.monitor(pool)
    Process.send_after(self(), :resolve, interval)
    {:ok, %{pool: pool, spec: spec, interval: interval}}
  end

  @impl true
  def handle_info(:resolve, s) do
    send(s.pool, {:snakepit_discovered, self(), resolve(s.spec)})
    Process.send_after(self(), :resolve, s.interval)
    {:noreply, s}
  end

  def handle_info({:DOWN, _, :process, pool, _}, %{pool: pool} = s), do: {:stop, :normal, s}
  def handle_info(_msg, s), do: {:noreply, s}
end
