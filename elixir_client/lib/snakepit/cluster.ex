defmodule Snakepit.Cluster do
  @moduledoc """
  Pools of the same name on connected BEAM nodes, used as one: a call goes to the local pool
  while it has a free slot, else to the least-loaded pool of that name on another node. Built on
  Erlang distribution: OTP's `:pg` (process groups) and `:erpc`. Nodes are connected the usual
  way (`--sname`/`--name`, a shared cookie, `Node.connect/1` or libcluster); Snakepit connects
  nothing itself.

  ## Membership

  The application starts the `:pg` scope `Snakepit.Cluster`. Every pool process joins the group
  `{:snakepit_pool, name}` of that scope in its init (unless its config has `cluster: false`) and
  leaves it when it starts stopping (`Snakepit.stop_pool/2`) or ends; `:pg` drops the members of a node that goes down or disconnects.

  ## Routing (`Snakepit.execute/4`, `Snakepit.execute_batch/4`)

    * **Fast path.** With no member of the group on another node, a call is exactly the local
      call (one ETS read of the group's members more). With remote members, its checkout asks the
      local pool for a slot *without queueing* (`Snakepit.Pool.checkout/2` with `queue: false`):
      one call to the pool process, as before, so a pool with a free slot costs nothing more.
    * **Saturated** (the local checkout would queue) **or absent** (no local pool of that name):
      each remote member's node is asked its load (`load/1`: free slots and queued callers, from
      its pool's counters) with one `:erpc.multicall` bounded by 250 ms; the call goes to the
      node with the most free slots. When no remote node has a free slot the call queues locally
      as it always did (or, with no local pool, goes to the remote one with the fewest queued).
    * **Remote call.** The call runs on the chosen node in a process `:erpc` starts there, as
      the same `Snakepit.execute` with `cluster: false` (it does not bounce further); the
      arguments cross distribution once, the result once. Results and `%Snakepit.Error{}` values
      come back unchanged; an exception raised there is raised again in the caller. The caller's
      `[:snakepit, :call, :stop]` event has `node` (where it ran) and no worker; the worker's
      events are the other node's.
    * **Deadline.** The caller's `timeout:` bounds the whole remote call: the caller waits at
      most `timeout` + 1 s (the remote queue wait included), then gets `:timeout` and the remote
      process is killed (its slot is given back as abandoned). Without `timeout:`, the remote
      pool's own `call_timeout`/`queue_timeout` bound it.
    * **A node going down.** Calls in flight on it fail with `%Snakepit.Error{reason:
      :node_down}`; no other call fails, and later calls no longer see its pool (`:pg` removed
      it). A call that was sent but not yet started there fails the same way. When the caller's
      own process (or node) dies, the remote call is killed too.

  ## What stays local

  Session calls (`execute_in_session`, `get_session`, `cleanup_session`: a session is pinned to
  one node's worker), streams (`execute_stream`: its chunks and callback belong to the caller's
  node), and calls on a pool given as a pid. The call option `cluster: false` keeps any call
  local; a pool with `cluster: false` in its config neither joins the group (other nodes do not
  send it calls) nor sends its calls elsewhere.

  ## Cluster view

  `Snakepit.list_workers(pool, cluster: true)` and `Snakepit.get_stats(pool, cluster: true)`
  (see `list_workers/1`, `stats/1`) gather every node's view of the pool.
  """

  alias Snakepit.Error

  @scope __MODULE__
  # the most a saturated call waits for the other nodes' loads
  @load_timeout 250
  # a remote call's deadline beyond the call's own `timeout:` (distribution, the remote queue)
  @remote_grace 1_000

  @type load :: %{free: non_neg_integer, queued: non_neg_integer, capacity: non_neg_integer}

  @doc false
  def child_spec(_arg), do: %{id: @scope, start: {:pg, :start_link, [@scope]}, type: :worker}

  @doc "The `:pg` group of the pools named `name`."
  @spec group(atom) :: {:snakepit_pool, atom}
  def group(name), do: {:snakepit_pool, name}

  @doc "Called by a pool in its init: joins its group unless its config says `cluster: false`."
  @spec join(Snakepit.Config.t()) :: :ok
  def join(%{cluster: false}), do: :ok
  def join(config), do: :pg.join(@scope, group(config.name), self())

  @doc "Called by a pool that stops taking calls (`Snakepit.Pool.drain/2`): leaves its group."
  @spec leave(Snakepit.Config.t()) :: :ok
  def leave(config) do
    _ = :pg.leave(@scope, group(config.name), self())
    :ok
  end

  @doc "The nodes other than this one whose pool `name` is a member of its group."
  @spec remote_nodes(atom) :: [node]
  def remote_nodes(name) do
    me = node()

    @scope
    |> :pg.get_members(group(name))
    |> Enum.map(&node/1)
    |> Enum.reject(&(&1 == me))
    |> Enum.uniq()
  end

  @doc """
  How a call on `pool` with `opts` may be routed: `:local` (as without a cluster), `:try_local`
  (ask the local pool without queueing, then other nodes) or `:remote` (no local pool of that
  name: only other nodes have one).
  """
  @spec plan(atom | pid, keyword) :: :local | :try_local | :remote
  def plan(pool, opts) do
    cond do
      not is_atom(pool) or opts[:cluster] == false or opts[:session_id] != nil -> :local
      remote_nodes(pool) == [] -> :local
      true -> local_plan(pool)
    end
  end

  # (a local pool with `cluster: false` is no member: its calls stay local too)
  defp local_plan(name) do
    case :pg.get_local_members(@scope, group(name)) do
      [_ | _] -> :try_local
      [] -> if Snakepit.Pool.whereis(name), do: :local, else: :remote
    end
  end

  @doc """
  The other node to send a call on `name` to, or `:none`. With `need_free: true` (there is a
  local pool to queue in) only a node with a free slot qualifies, the one with the most; else the
  one with the most free slots, then the fewest queued callers.
  """
  @spec pick_node(atom, boolean) :: {:ok, node} | :none
  def pick_node(name, need_free) do
    nodes = remote_nodes(name)

    nodes
    |> :erpc.multicall(__MODULE__, :load, [name], @load_timeout)
    |> Enum.zip(nodes)
    |> Enum.flat_map(fn
      {{:ok, %{free: _} = load}, node} -> [{node, load}]
      _unreachable_or_no_pool -> []
    end)
    |> Enum.filter(fn {_node, load} -> not need_free or load.free > 0 end)
    |> Enum.max_by(fn {_node, l} -> {l.free, -l.queued} end, fn -> nil end)
    |> case do
      nil -> :none
      {node, _load} -> {:ok, node}
    end
  end

  @doc """
  This node's pool `name`'s load: free slots (capacity of its ready workers less its calls in
  flight), queued callers and capacity; `nil` when it has no such pool. Asked by other nodes.
  """
  @spec load(atom) :: load | nil
  def load(name) do
    s = Snakepit.Pool.stats(name)
    %{free: max(s.capacity - s.in_flight, 0), queued: s.queued, capacity: s.capacity}
  rescue
    ArgumentError -> nil
  catch
    :exit, _ -> nil
  end

  @doc """
  Runs `Snakepit.<fun>(name, ...args, opts)` on `node` (see "Routing"), bounded by `opts[:timeout]`
  plus #{@remote_grace} ms; returns what it returned there, or `{:error, %Snakepit.Error{}}`
  (`:node_down`, `:timeout`, `:unavailable`) when the remote call did not end.
  """
  @spec call(node, atom, :execute | :execute_batch, list, keyword) :: term
  def call(node, name, fun, args, opts) do
    timeout =
      case opts[:timeout] do
        t when is_integer(t) and t > 0 -> t + @remote_grace
        _ -> :infinity
      end

    erpc(node, name, [self(), name, fun, args, opts], timeout)
  end

  defp erpc(node, name, serve_args, timeout) do
    :erpc.call(node, __MODULE__, :serve, serve_args, timeout)
  catch
    :error, {:erpc, :noconnection} ->
      {:error,
       Error.new(
         :node_down,
         "pool #{inspect(name)} on node #{node}: the node went down or disconnected during the call"
       )}

    :error, {:erpc, :timeout} ->
      {:error,
       Error.new(
         :timeout,
         "pool #{inspect(name)} on node #{node}: no answer within #{timeout} ms"
       )}

    :error, {:erpc, reason} ->
      {:error,
       Error.new(:unavailable, "pool #{inspect(name)} on node #{node}: #{inspect(reason)}")}

    # what the call raised or exited with there, raised again here
    :error, {:exception, reason, stack} ->
      :erlang.raise(:error, reason, stack)

    :exit, {:exception, reason} ->
      exit(reason)
  end

  @doc false
  # The remote end of call/5, in the process :erpc started on this node. It dies with its caller
  # (process or node), so a call nobody waits for gives its slot back.
  def serve(caller, name, fun, args, opts) do
    watch(caller)
    apply(Snakepit, fun, [name | args] ++ [Keyword.put(opts, :cluster, false)])
  end

  defp watch(caller) do
    server = self()

    spawn(fn ->
      caller_ref = Process.monitor(caller)
      server_ref = Process.monitor(server)

      receive do
        {:DOWN, ^caller_ref, _, _, _} -> Process.exit(server, :kill)
        {:DOWN, ^server_ref, _, _, _} -> :ok
      end
    end)
  end

  ## cluster view

  @doc """
  The nodes with a pool `name` in its group, this one first when it has one, else the rest
  sorted; with `cluster: false` pools invisible to the others.
  """
  @spec nodes(atom) :: [node]
  def nodes(name) do
    local = if Snakepit.Pool.whereis(name), do: [node()], else: []
    local ++ Enum.sort(remote_nodes(name))
  end

  @doc """
  Every node's workers of pool `name` (`Snakepit.list_workers/1` there), each with its `node`.
  A node that does not answer within `timeout` ms is left out.
  """
  @spec list_workers(atom, timeout) :: [map]
  def list_workers(name, timeout \\ 5_000) do
    name
    |> on_every_node(Snakepit, :list_workers, [name], timeout)
    |> Enum.flat_map(fn
      {node, {:ok, workers}} -> Enum.map(workers, &Map.put(&1, :node, node))
      {_node, _failed} -> []
    end)
  end

  @doc """
  The cluster view of pool `name`: `nodes`, each node's `Snakepit.get_stats/1` (or
  `{:error, %Snakepit.Error{}}` for a node that did not answer within `timeout` ms), and, over
  the nodes that answered, the sums of `calls`, `failures`, `in_flight`, `capacity`, `queued`,
  and `workers`: every worker, with its `node`.
  """
  @spec stats(atom, timeout) :: map
  def stats(name, timeout \\ 15_000) do
    per_node =
      name
      |> on_every_node(Snakepit, :get_stats, [name], timeout)
      |> Enum.map(fn
        {node, {:ok, {:ok, stats}}} ->
          {node, {:ok, stats}}

        {node, {:ok, {:error, e}}} ->
          {node, {:error, e}}

        {node, other} ->
          {node, {:error, Error.new(:unavailable, "node #{node}: #{inspect(other)}")}}
      end)

    answered = for {node, {:ok, s}} <- per_node, do: {node, s}
    sum = fn key -> answered |> Enum.map(fn {_n, s} -> Map.get(s, key, 0) end) |> Enum.sum() end

    %{
      nodes: Enum.map(per_node, &elem(&1, 0)),
      by_node:
        Map.new(per_node, fn
          {node, {:ok, s}} -> {node, s}
          other -> other
        end),
      calls: sum.(:calls),
      failures: sum.(:failures),
      in_flight: sum.(:in_flight),
      capacity: sum.(:capacity),
      queued: sum.(:queued),
      workers:
        Enum.flat_map(answered, fn {node, s} -> Enum.map(s.workers, &Map.put(&1, :node, node)) end)
    }
  end

  defp on_every_node(name, mod, fun, args, timeout) do
    nodes = nodes(name)
    Enum.zip(nodes, :erpc.multicall(nodes, mod, fun, args, timeout))
  end
end
