defmodule Snakepit.Config do
  @moduledoc """
  Pool configuration: validation, defaults and normalisation.

  A pool config is a map or keyword list. Every key except `:name` has a default; unknown keys and
  invalid values are rejected with a message naming the key. See the README for the full reference.

  ## Sick workers

  A worker whose Python process is alive but does not serve is found and replaced (see
  `Snakepit.Pool`, "Sick workers"):

    * `:health_check_interval` - ms between health checks of each ready worker
      (`grpc.health.v1.Health/Check` on its channel), or `:infinity` for none. Default `10_000`.
    * `:health_check_timeout` - ms a health check (or a stuck-call check) may take before the worker
      counts as unhealthy and is replaced. Default `5_000`.
    * `:stuck_call_grace` - ms after a call was given up (its deadline passed, its caller died or
      cancelled it) within which the server should have ended it; a call still running on the
      server after that is *stuck*. Default `1_000`.
    * `:max_stuck_calls` - stuck calls on one worker that make the pool replace it (a worker all of
      whose slots are stuck is replaced whatever this says). Default `1`.

  ## Shared memory

  Large bytes and arrays go to and from the pool's workers as files in a private directory on a
  tmpfs instead of inline in gRPC messages (see `Snakepit.Shm`):

    * `:shm` - `true` or `false`. Default `true` with the default launcher (its workers run on this
      host), `false` with any other: a custom launcher's pool with `shm: true` must pass the
      command option `:shm_dir` to its server as `--shm-dir`.
    * `:shm_min_bytes` - the smallest bytes blob or array buffer sent as a region, both ways
      (smaller ones stay inline). Default `65_536`.
    * `:shm_base_dir` - where the pool makes its directory. Default `/dev/shm` when it exists, else
      the system tmp dir (logged as not a tmpfs).

  ## Transport, pipelining, recycling jitter

    * `:transport` - how the pool reaches its workers: `:uds` (default), a Unix domain socket per
      worker in a private directory of the pool (see `Snakepit.Pool`, "Unix sockets"); `:tcp`,
      `127.0.0.1` on a free port. (Not the Python server's `--transport`, which picks its gRPC stack.)
    * `:process_pipeline_depth` - calls a `:process` worker may have in flight at once: its server
      runs one and queues the others, so the next call is already there when the running one
      ends. Default `2`; `1` gives a process worker one call at a time. Ignored for `:thread`.
    * `:max_requests_jitter` - each worker's `worker_max_requests` is lowered by a random fraction
      in `[0, max_requests_jitter)`, so workers started together do not reach it together.
      Default `0.1`.

  ## Start mode

    * `:start_mode` - how the pool gets a worker's Python process. `:fork_server` (the default
      with a launcher that has `fork_server_command/2` and `fork_child_args/2`, as the default
      one has): the pool starts one fork server per pool (`--fork-server`, which does the imports
      once) and every new and replacement worker is forked from it (ready in tens of ms, so a
      recycle costs little). One more process, whose death takes every worker of the pool down
      (they are restarted from a new fork server); the adapter's `setup()` runs in each child
      unless the adapter class sets `__fork_preload__ = True` (see `Snakepit.Pool.ForkServer`).
      `:spawn` (the default with any other launcher): a fresh interpreter per worker (its
      start-up and imports each time, ~170-250 ms for the showcase adapters, seconds with torch);
      choose it for an adapter module whose import starts threads or opens connections that a
      forked child must not share.

  ## Remote pools

  `worker_profile: :remote` pools connect to servers they did not start (see `Snakepit.Pool`,
  "Remote workers", and the README):

    * `:endpoints` - `"host:port"`, `"[v6]:port"` or `"unix:/path"` strings, one worker each.
    * `:discovery` - `{:dns, name, port}` or `{:dns, name, port, resolver_opts}` (`:nameservers`,
      `:timeout`, `:retry`, given to `:inet_res`): the A and AAAA records of `name`, each an
      endpoint on `port`, resolved every `:resolve_interval` ms (default `5_000`).
    * `:threads_per_worker` - calls at once per endpoint; default `:from_server` (its GetStats
      `max_workers`).
    * `:max_connection_age` (`{n, unit}` or `:infinity`, the default) and
      `:max_connection_age_jitter` (default `0.1`) - each connection is renewed after that age
      (kept as `worker_ttl` / `ttl_jitter`).
    * `:tls` - TLS to the endpoints: `[cacertfile: path]` to verify the servers (their
      `--tls-cert`; the OS's CA store without `cacertfile`), `certfile:`/`keyfile:` to present a
      client certificate to servers with `--tls-client-ca` (mTLS), `server_name:` when the
      certificate names the server otherwise than the endpoint does (see
      `Snakepit.GRPC.Channel.start_link/1`). Without it, each endpoint (or DNS name) that is not a
      loopback address, `localhost` or a Unix socket is logged as a warning at pool start: its
      calls, results and bearer token would cross the network in plaintext.

  `:pool_size`, `:worker_ttl`, `:ttl_jitter`, `:worker_max_requests` and `:max_requests_jitter`
  are refused (the pool cannot recycle servers it did not start), as are `start_mode:
  :fork_server` and `shm: true`; `pool_size` is the number of endpoints (0 for DNS until found).

  ## Message size

    * `:max_message_mb` - the largest gRPC message in MiB, both ways, as one setting: the workers
      get it as `--max-message-mb` (unless `adapter_args` set that) and the pool's channels refuse
      larger responses. Default `64`. It bounds what travels inline; shared-memory regions are not
      messages and have no such limit (see `Snakepit.Shm`).
  """

  require Logger

  @repo_root Path.expand("../../..", __DIR__)

  @keys [
    :name,
    :worker_profile,
    :pool_size,
    :threads_per_worker,
    :launcher,
    :adapter_args,
    :adapter_env,
    :worker_ttl,
    :worker_max_requests,
    :queue_size,
    :queue_timeout,
    :call_timeout,
    :cluster,
    :startup_timeout,
    :python_executable,
    :script_dir,
    :python_adapter,
    :auth_token,
    :shutdown_grace,
    :ttl_jitter,
    :restart_backoff_max,
    :health_check_interval,
    :health_check_timeout,
    :stuck_call_grace,
    :max_stuck_calls,
    :shm,
    :shm_min_bytes,
    :shm_base_dir,
    :transport,
    :max_requests_jitter,
    :process_pipeline_depth,
    :max_message_mb,
    :start_mode,
    :endpoints,
    :discovery,
    :resolve_interval,
    :tls
  ]

  # accepted only for worker_profile: :remote, kept as worker_ttl and ttl_jitter (see "Remote pools")
  @remote_input_keys [:max_connection_age, :max_connection_age_jitter]

  # accepted but not kept: the old name of :launcher
  @deprecated_keys [:adapter_module]

  defstruct @keys

  @type ttl :: {pos_integer, :seconds | :minutes | :hours | :milliseconds} | :infinity
  @type t :: %__MODULE__{
          name: atom,
          worker_profile: :process | :thread | :remote,
          pool_size: non_neg_integer,
          threads_per_worker: pos_integer | :from_server,
          launcher: module,
          adapter_args: [String.t()],
          adapter_env: [{String.t(), String.t()}],
          worker_ttl: non_neg_integer | :infinity,
          worker_max_requests: pos_integer | :infinity,
          queue_size: non_neg_integer,
          queue_timeout: non_neg_integer,
          call_timeout: pos_integer,
          cluster: boolean,
          startup_timeout: pos_integer,
          python_executable: String.t(),
          script_dir: String.t(),
          python_adapter: String.t(),
          auth_token: String.t() | nil,
          shutdown_grace: non_neg_integer,
          ttl_jitter: float,
          restart_backoff_max: pos_integer,
          health_check_interval: pos_integer | :infinity,
          health_check_timeout: pos_integer,
          stuck_call_grace: non_neg_integer,
          max_stuck_calls: pos_integer,
          shm: boolean,
          shm_min_bytes: pos_integer,
          shm_base_dir: String.t(),
          transport: :uds | :tcp,
          max_requests_jitter: float,
          process_pipeline_depth: pos_integer,
          max_message_mb: pos_integer,
          start_mode: :spawn | :fork_server,
          endpoints: [Snakepit.Remote.Endpoint.t()],
          discovery: Snakepit.Remote.Discovery.spec() | nil,
          resolve_interval: pos_integer,
          tls: keyword | nil
        }

  @doc "The keys a pool config accepts (`:adapter_module` is the deprecated name of `:launcher`)."
  def keys, do: @keys ++ @remote_input_keys ++ @deprecated_keys

  @doc "The repository root (where `grpc_server_threaded.py` / `grpc_server_process.py` live)."
  def repo_root, do: @repo_root

  @doc """
  Default Python executable: env `SNAKEPIT_PYTHON`, else `<repo>/.venv/bin/python` when it exists,
  else `python3`.
  """
  def default_python do
    venv = Path.join(@repo_root, ".venv/bin/python")

    cond do
      (p = System.get_env("SNAKEPIT_PYTHON")) not in [nil, ""] -> p
      File.exists?(venv) -> venv
      true -> "python3"
    end
  end

  @doc "Validates a pool config; returns the normalised struct or an error message naming the key."
  @spec new(map | keyword) :: {:ok, t} | {:error, String.t()}
  def new(config) when is_list(config) do
    if Keyword.keyword?(config),
      do: new(Map.new(config)),
      else: {:error, "pool config must be a map or keyword list, got #{inspect(config)}"}
  end

  def new(config) when is_map(config) do
    try do
      {:ok, build(config)}
    catch
      {:invalid, key, msg} -> {:error, "invalid pool config key #{inspect(key)}: #{msg}"}
    end
  end

  def new(other), do: {:error, "pool config must be a map or keyword list, got #{inspect(other)}"}

  @doc "Like `new/1` but raises `ArgumentError`."
  def new!(config) do
    case new(config) do
      {:ok, c} -> c
      {:error, msg} -> raise ArgumentError, msg
    end
  end

  defp build(c) do
    case Map.keys(c) -- keys() do
      [] ->
        :ok

      [k | _] ->
        throw(
          {:invalid, k, "unknown key (known keys: #{Enum.map_join(keys(), ", ", &inspect/1)})"}
        )
    end

    name = fetch(c, :name, nil, &(is_atom(&1) and &1 != nil), "must be an atom (required)")

    profile =
      fetch(
        c,
        :worker_profile,
        :process,
        &(&1 in [:process, :thread, :remote]),
        "must be :process, :thread or :remote"
      )

    if profile == :remote, do: check_remote_keys(c), else: check_local_keys(c)

    default_size =
      if profile == :thread,
        do: max(1, div(System.schedulers_online(), 4)),
        else: System.schedulers_online()

    endpoints = endpoints(c)

    pool_size =
      if profile == :remote,
        do: length(endpoints),
        else: fetch(c, :pool_size, default_size, &pos_int?/1, "must be a positive integer")

    threads =
      if profile == :remote,
        do:
          fetch(
            c,
            :threads_per_worker,
            :from_server,
            &(&1 == :from_server or pos_int?(&1)),
            "must be a positive integer or :from_server (each endpoint's GetStats max_workers)"
          ),
        else:
          fetch(c, :threads_per_worker, 8, &pos_int?/1, "must be a positive integer")
          |> then(&if(profile == :process, do: 1, else: &1))

    launcher = launcher(c)

    adapter_args =
      fetch(
        c,
        :adapter_args,
        [],
        &(is_list(&1) and Enum.all?(&1, fn a -> is_binary(a) end)),
        "must be a list of strings"
      )

    adapter_env =
      fetch(
        c,
        :adapter_env,
        [],
        &(is_list(&1) and
            Enum.all?(&1, fn e -> match?({k, v} when is_binary(k) and is_binary(v), e) end)),
        "must be a list of {\"NAME\", \"value\"} string tuples"
      )

    {ttl_key, jitter_key} =
      if profile == :remote,
        do: {:max_connection_age, :max_connection_age_jitter},
        else: {:worker_ttl, :ttl_jitter}

    ttl =
      fetch(
        c,
        ttl_key,
        :infinity,
        &ttl?/1,
        "must be :infinity or {n, :seconds | :minutes | :hours | :milliseconds}"
      )

    max_req =
      fetch(
        c,
        :worker_max_requests,
        :infinity,
        &(&1 == :infinity or pos_int?(&1)),
        "must be a positive integer or :infinity"
      )

    %__MODULE__{
      name: name,
      worker_profile: profile,
      pool_size: pool_size,
      threads_per_worker: threads,
      launcher: launcher,
      adapter_args: adapter_args,
      adapter_env: adapter_env,
      worker_ttl: ttl_ms(ttl),
      worker_max_requests: max_req,
      queue_size: fetch(c, :queue_size, 1000, &non_neg_int?/1, "must be a non-negative integer"),
      queue_timeout:
        fetch(c, :queue_timeout, 5_000, &non_neg_int?/1, "must be a non-negative integer (ms)"),
      call_timeout:
        fetch(c, :call_timeout, 60_000, &pos_int?/1, "must be a positive integer (ms)"),
      cluster: fetch(c, :cluster, true, &is_boolean/1, "must be true or false"),
      startup_timeout:
        fetch(c, :startup_timeout, 30_000, &pos_int?/1, "must be a positive integer (ms)"),
      python_executable:
        fetch(
          c,
          :python_executable,
          default_python(),
          &nonempty_string?/1,
          "must be a non-empty string"
        ),
      script_dir:
        fetch(c, :script_dir, @repo_root, &nonempty_string?/1, "must be a non-empty string"),
      python_adapter:
        fetch(
          c,
          :python_adapter,
          default_python_adapter(profile),
          &nonempty_string?/1,
          "must be a module.Class string"
        ),
      auth_token:
        fetch(
          c,
          :auth_token,
          nil,
          &(is_nil(&1) or nonempty_string?(&1)),
          "must be nil or a non-empty string"
        ),
      shutdown_grace:
        fetch(c, :shutdown_grace, 5_000, &non_neg_int?/1, "must be a non-negative integer (ms)"),
      ttl_jitter:
        fetch(
          c,
          jitter_key,
          0.1,
          &(is_number(&1) and &1 >= 0 and &1 < 1),
          "must be a number in [0, 1)"
        ) * 1.0,
      restart_backoff_max:
        fetch(c, :restart_backoff_max, 10_000, &pos_int?/1, "must be a positive integer (ms)"),
      health_check_interval:
        fetch(
          c,
          :health_check_interval,
          10_000,
          &(&1 == :infinity or pos_int?(&1)),
          "must be a positive integer (ms) or :infinity"
        ),
      health_check_timeout:
        fetch(c, :health_check_timeout, 5_000, &pos_int?/1, "must be a positive integer (ms)"),
      stuck_call_grace:
        fetch(c, :stuck_call_grace, 1_000, &non_neg_int?/1, "must be a non-negative integer (ms)"),
      max_stuck_calls: fetch(c, :max_stuck_calls, 1, &pos_int?/1, "must be a positive integer"),
      shm:
        fetch(
          c,
          :shm,
          launcher == Snakepit.Launcher.GRPCPython and profile != :remote,
          &is_boolean/1,
          "must be true or false"
        ),
      shm_min_bytes:
        fetch(
          c,
          :shm_min_bytes,
          Snakepit.Shm.default_min_bytes(),
          &pos_int?/1,
          "must be a positive integer (bytes)"
        ),
      shm_base_dir:
        fetch(
          c,
          :shm_base_dir,
          Snakepit.Shm.default_base(),
          &nonempty_string?/1,
          "must be a non-empty string (a directory, on a tmpfs such as /dev/shm)"
        ),
      transport:
        fetch(
          c,
          :transport,
          :uds,
          &(&1 in [:uds, :tcp]),
          "must be :uds (a Unix domain socket per worker) or :tcp (127.0.0.1, a free port)"
        ),
      max_requests_jitter:
        fetch(
          c,
          :max_requests_jitter,
          0.1,
          &(is_number(&1) and &1 >= 0 and &1 < 1),
          "must be a number in [0, 1)"
        ) * 1.0,
      process_pipeline_depth:
        fetch(c, :process_pipeline_depth, 2, &pos_int?/1, "must be a positive integer"),
      max_message_mb:
        fetch(c, :max_message_mb, 64, &pos_int?/1, "must be a positive integer (MiB)"),
      # (a remote pool starts no Python process: none is forked)
      start_mode: if(profile == :remote, do: :spawn, else: start_mode(c, launcher)),
      endpoints: endpoints,
      discovery: discovery(c),
      resolve_interval:
        fetch(c, :resolve_interval, 5_000, &pos_int?/1, "must be a positive integer (ms)"),
      tls:
        fetch(
          c,
          :tls,
          nil,
          &(is_nil(&1) or Keyword.keyword?(&1)),
          "must be a keyword list (passed to the worker channels) or nil"
        )
    }
  end

  # Keys of pools whose workers the pool starts, meaningless for endpoints it did not start.
  @local_only [:pool_size, :worker_ttl, :ttl_jitter, :worker_max_requests, :max_requests_jitter]
  @remote_only [:endpoints, :discovery, :resolve_interval] ++ @remote_input_keys

  defp check_remote_keys(c) do
    for key <- @local_only, Map.has_key?(c, key) do
      why =
        case key do
          :pool_size ->
            "does not apply to worker_profile: :remote (one worker per endpoint: set :endpoints or :discovery)"

          k when k in [:worker_ttl, :ttl_jitter] ->
            "does not apply to worker_profile: :remote (the pool did not start those workers and " <>
              "cannot recycle them; :max_connection_age renews connections)"

          _ ->
            "does not apply to worker_profile: :remote (the pool did not start those workers and cannot recycle them)"
        end

      throw({:invalid, key, why})
    end

    if Map.get(c, :start_mode, :spawn) != :spawn,
      do: throw({:invalid, :start_mode, "does not apply to worker_profile: :remote"})

    if Map.get(c, :shm) == true,
      do:
        throw(
          {:invalid, :shm,
           "must be false for worker_profile: :remote (its workers do not share this host's memory)"}
        )

    if Map.get(c, :endpoints, []) == [] and Map.get(c, :discovery) == nil,
      do:
        throw(
          {:invalid, :endpoints,
           "a worker_profile: :remote pool needs :endpoints (a non-empty list) or :discovery"}
        )

    :ok
  end

  defp check_local_keys(c) do
    case Enum.find(@remote_only, &Map.has_key?(c, &1)) do
      nil -> :ok
      key -> throw({:invalid, key, "applies only to worker_profile: :remote"})
    end
  end

  defp endpoints(c) do
    list =
      fetch(
        c,
        :endpoints,
        [],
        &is_list/1,
        "must be a list of \"host:port\" or \"unix:/path\" strings"
      )

    parsed =
      Enum.map(list, fn e ->
        case Snakepit.Remote.Endpoint.parse(e) do
          {:ok, endpoint} -> endpoint
          {:error, why} -> throw({:invalid, :endpoints, why})
        end
      end)

    case parsed -- Enum.uniq_by(parsed, & &1.text) do
      [] -> parsed
      [dup | _] -> throw({:invalid, :endpoints, "#{inspect(dup.text)} is listed twice"})
    end
  end

  defp discovery(c) do
    case Map.get(c, :discovery) do
      nil ->
        nil

      {:dns, name, port} ->
        discovery(Map.put(c, :discovery, {:dns, name, port, []}))

      {:dns, name, port, opts} = spec
      when is_binary(name) and name != "" and is_integer(port) and port in 1..65_535 and
             is_list(opts) ->
        case Keyword.keyword?(opts) && Keyword.keys(opts) -- [:nameservers, :timeout, :retry] do
          [] -> spec
          false -> throw({:invalid, :discovery, "resolver options must be a keyword list"})
          [k | _] -> throw({:invalid, :discovery, "unknown resolver option #{inspect(k)}"})
        end

      other ->
        throw(
          {:invalid, :discovery,
           "must be {:dns, \"name\", port} or {:dns, \"name\", port, resolver_opts}, got #{inspect(other)}"}
        )
    end
  end

  # `:fork_server` needs a launcher that can build the fork server's command line; it is the
  # default for one that can.
  defp start_mode(c, launcher) do
    can_fork? =
      Code.ensure_loaded?(launcher) and function_exported?(launcher, :fork_server_command, 2) and
        function_exported?(launcher, :fork_child_args, 2)

    mode =
      fetch(
        c,
        :start_mode,
        if(can_fork?, do: :fork_server, else: :spawn),
        &(&1 in [:spawn, :fork_server]),
        "must be :spawn (a fresh Python process per worker) or :fork_server (workers forked from one fork server)"
      )

    if mode == :fork_server and not can_fork?,
      do:
        throw(
          {:invalid, :start_mode,
           "is :fork_server, but #{inspect(launcher)} does not implement fork_server_command/2 and fork_child_args/2"}
        )

    mode
  end

  # `:launcher`, or its deprecated name `:adapter_module` (which the error then names).
  defp launcher(c) do
    key =
      case {Map.has_key?(c, :launcher), Map.has_key?(c, :adapter_module)} do
        {true, true} ->
          throw(
            {:invalid, :adapter_module, "is the deprecated name of :launcher; set only :launcher"}
          )

        {false, true} ->
          Logger.warning(
            "snakepit pool config key :adapter_module is deprecated; use :launcher " <>
              "(and Snakepit.Launcher.GRPCPython for Snakepit.Adapters.GRPCPython)"
          )

          :adapter_module

        _ ->
          :launcher
      end

    launcher = fetch(c, key, Snakepit.Launcher.GRPCPython, &is_atom/1, "must be a module")

    if not (Code.ensure_loaded?(launcher) and function_exported?(launcher, :command, 2)),
      do: throw({:invalid, key, "#{inspect(launcher)} does not implement Snakepit.Launcher"})

    launcher
  end

  @doc "The Python adapter class a profile runs by default."
  def default_python_adapter(:thread),
    do: "snakepit_bridge.adapters.threaded_showcase.ThreadedShowcaseAdapter"

  def default_python_adapter(:process), do: "snakepit_bridge.adapters.showcase.ShowcaseAdapter"
  # (a remote pool runs no adapter: its servers were started with theirs)
  def default_python_adapter(:remote), do: "none"

  defp fetch(c, key, default, valid?, msg) do
    case Map.fetch(c, key) do
      :error when key == :name -> throw({:invalid, key, "is required"})
      :error -> default
      {:ok, v} -> if valid?.(v), do: v, else: throw({:invalid, key, "#{msg}, got #{inspect(v)}"})
    end
  end

  defp pos_int?(v), do: is_integer(v) and v > 0
  defp non_neg_int?(v), do: is_integer(v) and v >= 0
  defp nonempty_string?(v), do: is_binary(v) and v != ""

  defp ttl?(:infinity), do: true

  defp ttl?({n, unit}) when is_integer(n) and n > 0,
    do: unit in [:milliseconds, :seconds, :minutes, :hours]

  defp ttl?(_), do: false

  defp ttl_ms(:infinity), do: :infinity
  defp ttl_ms({n, :milliseconds}), do: n
  defp ttl_ms({n, :seconds}), do: n * 1_000
  defp ttl_ms({n, :minutes}), do: n * 60_000
  defp ttl_ms({n, :hours}), do: n * 3_600_000
end
