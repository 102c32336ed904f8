defmodule Snakepit.Launcher.GRPCPython do
  @moduledoc """
  Runs the repository's Python gRPC servers: `grpc_server_threaded.py` for `worker_profile: :thread`
  and `grpc_server_process.py` for `worker_profile: :process`, found in `script_dir`, with
  `python_executable`.

  Command line: `<python> <script> --adapter <python_adapter> --host 127.0.0.1 --port 0
  --exit-on-stdin-eof [--max-workers <threads_per_worker>] [--auth-token-env NAME]
  [--shm-dir DIR] --grace <seconds> <adapter_args...>`, with `--uds <path>` in place of
  `--host 127.0.0.1 --port 0` when the worker gives a socket path (`opts[:uds]`, a `transport: :uds`
  pool); `--shm-dir` is the pool's shared-memory directory (command option `:shm_dir`, see
  `Snakepit.Shm`). `--max-workers` is added for thread workers only when `adapter_args` does not
  already set it.

  With `start_mode: :fork_server` the pool runs `fork_server_command/2` once and forks each worker
  from it with `fork_child_args/2` (see `Snakepit.Pool.ForkServer`).
  """

  @behaviour Snakepit.Launcher

  @impl true
  def command(config, opts) do
    {exe, [script | flags], env} = common_command(config, opts)
    {exe, [script | listen_args(opts)] ++ flags, env}
  end

  @doc """
  The fork server's command line (`start_mode: :fork_server`): `command/2`'s with `--fork-server`
  and without the flags that differ per worker (where it listens); each child gets those from
  `fork_child_args/2`.
  """
  @impl true
  def fork_server_command(config, opts) do
    {exe, [script | flags], env} = common_command(config, opts)
    {exe, [script, "--fork-server" | flags], env}
  end

  @doc "The flags one forked worker adds to the fork server's: where it listens."
  @impl true
  def fork_child_args(_config, opts), do: listen_args(opts)

  defp listen_args(opts) do
    case Keyword.get(opts, :uds) do
      nil -> ["--host", "127.0.0.1", "--port", "0"]
      path -> ["--uds", path]
    end
  end

  defp common_command(config, opts) do
    exe = resolve_executable(config.python_executable) || config.python_executable

    threads =
      if config.worker_profile == :thread and "--max-workers" not in config.adapter_args,
        do: ["--max-workers", Integer.to_string(config.threads_per_worker)],
        else: []

    auth =
      case Keyword.get(opts, :auth_token_env) do
        nil -> []
        var -> ["--auth-token-env", var]
      end

    shm =
      case Keyword.get(opts, :shm_dir) do
        nil -> []
        dir -> ["--shm-dir", dir]
      end

    grace = :erlang.float_to_binary(config.shutdown_grace / 1000, decimals: 3)

    # One message-size setting for both ends (the pool's channels use it too).
    message_size =
      if "--max-message-mb" in config.adapter_args,
        do: [],
        else: ["--max-message-mb", Integer.to_string(config.max_message_mb)]

    args =
      [script_path(config), "--adapter", config.python_adapter] ++
        ["--exit-on-stdin-eof", "--grace", grace] ++
        message_size ++ threads ++ auth ++ shm ++ config.adapter_args

    {exe, args, [{"PYTHONUNBUFFERED", "1"} | config.adapter_env]}
  end

  @impl true
  def validate(config) do
    cond do
      resolve_executable(config.python_executable) == nil ->
        {:error,
         "invalid pool config key :python_executable: #{inspect(config.python_executable)} is not an executable " <>
           "(set python_executable, or the SNAKEPIT_PYTHON environment variable)"}

      not File.regular?(script_path(config)) ->
        {:error, "invalid pool config key :script_dir: #{script_path(config)} does not exist"}

      true ->
        :ok
    end
  end

  @doc "The server script for the config's worker profile."
  def script_path(%{worker_profile: :thread, script_dir: dir}),
    do: Path.join(dir, "grpc_server_threaded.py")

  def script_path(%{worker_profile: :process, script_dir: dir}),
    do: Path.join(dir, "grpc_server_process.py")

  defp resolve_executable(exe) do
    if String.contains?(exe, "/") do
      path = Path.expand(exe)
      if File.regular?(path), do: path, else: nil
    else
      System.find_executable(exe)
    end
  end
end
