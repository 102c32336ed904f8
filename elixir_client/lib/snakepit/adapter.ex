defmodule Snakepit.Adapter do
  @moduledoc """
  Deprecated name of the `Snakepit.Launcher` behaviour (the same callbacks), kept so that launchers
  written against it still compile. "Adapter" now names only the Python class a server runs
  (`python_adapter`).
  """

  @callback command(config :: Snakepit.Config.t(), opts :: keyword) ::
              {executable :: String.t(), args :: [String.t()], env :: [{String.t(), String.t()}]}

  @callback validate(config :: Snakepit.Config.t()) :: :ok | {:error, String.t()}

  @optional_callbacks validate: 1
end
