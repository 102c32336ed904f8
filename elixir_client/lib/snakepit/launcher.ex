defmodule Snakepit.Launcher do
  @moduledoc """
  Behaviour of the module that builds a worker's command line (`launcher` in a pool config; the
  default is `Snakepit.Launcher.GRPCPython`). Not to be confused with the *adapter*, the Python
  class whose tools the server serves (`python_adapter`).

  The command must start a snakepit_bridge gRPC server that listens on the Unix socket `opts[:uds]`
  when given (a `transport: :uds` pool), else on `127.0.0.1` on a free port, prints one stdout line
  `SNAKEPIT_READY uds=<path> pid=<pid> nonce=<nonce>` (or `port=<port>` for TCP) once serving (`<nonce>` is the
  value the worker puts in the environment variable `SNAKEPIT_READY_NONCE`; the server should remove
  it from its environment before it runs adapter code), exits when its stdin closes, and drains
  in-flight calls on SIGTERM. A server that cannot start should say why in its last line of output
  (snakepit_bridge prints `error: <message>`): the pool reports that line.
  """

  @doc """
  `{executable, args, env}` for one worker of the pool. `opts` carries `:auth_token_env`, the name of
  the environment variable that holds the pool's auth token (set in `env` by the worker), when the
  pool has one; `:shm_dir`, the pool's shared-memory directory to pass as `--shm-dir`, when
  the pool has `shm: true` (see `Snakepit.Shm`); and `:uds`, the socket path the server is to listen
  on, when the pool's transport is `:uds` (the worker connects to whichever the ready line names, so
  a launcher that ignores `:uds` and listens on TCP still works).
  """
  @callback command(config :: Snakepit.Config.t(), opts :: keyword) ::
              {executable :: String.t(), args :: [String.t()], env :: [{String.t(), String.t()}]}

  @doc "Checks the config at pool start (executable present, script found); the error names the key."
  @callback validate(config :: Snakepit.Config.t()) :: :ok | {:error, String.t()}

  @doc """
  For `start_mode: :fork_server`: the command of the pool's fork server (a snakepit_bridge server
  started with `--fork-server`, see `Snakepit.Pool.ForkServer`), with `command/2`'s `opts` less
  `:uds`, and without the flags that differ per worker.
  """
  @callback fork_server_command(config :: Snakepit.Config.t(), opts :: keyword) ::
              {executable :: String.t(), args :: [String.t()], env :: [{String.t(), String.t()}]}

  @doc "For `start_mode: :fork_server`: the flags one forked worker adds (`opts[:uds]`: where it listens)."
  @callback fork_child_args(config :: Snakepit.Config.t(), opts :: keyword) :: [String.t()]

  @optional_callbacks validate: 1, fork_server_command: 2, fork_child_args: 2

  @ready_nonce_env "SNAKEPIT_READY_NONCE"
  @auth_token_env "SNAKEPIT_AUTH_TOKEN"

  @doc """
  The pool's part of a command's `opts`, and the environment it needs: `:auth_token_env` (the
  token itself goes in the environment, never on the command line) when the pool has an auth
  token, and `:shm_dir` when `pool_opts` has one. What the worker and the fork server both pass.
  """
  @spec pool_options(Snakepit.Config.t(), keyword) :: {keyword, [{String.t(), String.t()}]}
  def pool_options(config, pool_opts) do
    {token_opts, token_env} =
      case config.auth_token do
        nil -> {[], []}
        token -> {[auth_token_env: @auth_token_env], [{@auth_token_env, token}]}
      end

    shm_opts = if dir = Keyword.get(pool_opts, :shm_dir), do: [shm_dir: dir], else: []
    {token_opts ++ shm_opts, token_env}
  end

  @doc "A fresh ready-line nonce and its environment entry (`SNAKEPIT_READY_NONCE`)."
  @spec ready_nonce() :: {String.t(), {String.t(), String.t()}}
  def ready_nonce do
    nonce = Base.encode16(:crypto.strong_rand_bytes(16), case: :lower)
    {nonce, {@ready_nonce_env, nonce}}
  end
end
