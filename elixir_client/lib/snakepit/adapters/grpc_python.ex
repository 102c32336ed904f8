defmodule Snakepit.Adapters.GRPCPython do
  @moduledoc """
  Deprecated name of `Snakepit.Launcher.GRPCPython`, kept so that configs naming it
  (`adapter_module: Snakepit.Adapters.GRPCPython`) still start. Use `launcher:` and
  `Snakepit.Launcher.GRPCPython`.
  """

  @behaviour Snakepit.Launcher

  @impl true
  defdelegate command(config, opts), to: Snakepit.Launcher.GRPCPython

  @impl true
  defdelegate validate(config), to: Snakepit.Launcher.GRPCPython

  @doc false
  defdelegate script_path(config), to: Snakepit.Launcher.GRPCPython
end
