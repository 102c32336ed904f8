defmodule Snakepit.Application do
  @moduledoc """
  Starts the `:pg` scope of `Snakepit.Cluster`, the pool registry, the dynamic supervisor for `Snakepit.start_pool/1`, and every pool of
  `config :snakepit, pools: [...]`. An invalid pool config makes the application fail to start with a
  message naming the key.
  """

  use Application

  @impl true
  def start(_type, _args) do
    pools = Application.get_env(:snakepit, :pools, [])

    with {:ok, configs} <- validate_all(pools) do
      children =
        [
          # the :pg scope pools join (before them: see Snakepit.Cluster)
          Snakepit.Cluster,
          {Registry, keys: :unique, name: Snakepit.Registry},
          {DynamicSupervisor, strategy: :one_for_one, name: Snakepit.PoolSupervisor}
        ] ++ Enum.map(configs, &Snakepit.Pool.child_spec/1)

      Supervisor.start_link(children, strategy: :one_for_one, name: Snakepit.Supervisor)
    end
  end

  @doc false
  def validate_all(pools) when is_list(pools) do
    Enum.reduce_while(pools, {:ok, []}, fn pool, {:ok, acc} ->
      with {:ok, c} <- Snakepit.Config.new(pool),
           :ok <- launcher_validate(c) do
        if Enum.any?(acc, &(&1.name == c.name)),
          do:
            {:halt,
             {:error,
              "invalid pool config key :name: pool #{inspect(c.name)} is configured twice"}},
          else: {:cont, {:ok, acc ++ [c]}}
      else
        {:error, msg} -> {:halt, {:error, msg}}
      end
    end)
  end

  def validate_all(other),
    do: {:error, "config :snakepit, :pools must be a list, got #{inspect(other)}"}

  @doc false
  # (a remote pool launches nothing)
  def launcher_validate(%{worker_profile: :remote}), do: :ok

  def launcher_validate(c) do
    if function_exported?(c.launcher, :validate, 1),
      do: c.launcher.validate(c),
      else: :ok
  end
end
