defmodule Snakepit.PrivateDir do
  @moduledoc """
  A fresh directory that only this user can enter (mode 0700), for what a pool shares with its
  workers: Unix sockets (`Snakepit.Pool.SocketDir`) and shared-memory regions (`Snakepit.Shm`).
  """

  @doc """
  Makes the directory `name_fun.()` returns, under `base`, trying new names (up to `tries`) while a
  name is taken. `mkdir`, never `mkdir -p`: it fails on anything already at the path, a symbolic
  link included, so nobody can slip one in; and the directory is 0700 before anything is made in it.
  Returns `{:ok, path}`, or `{:error, path, reason}` with the last path tried and a message.
  """
  @spec create(Path.t(), (() -> String.t()), pos_integer) ::
          {:ok, Path.t()} | {:error, Path.t(), String.t()}
  def create(base, name_fun, tries \\ 10) do
    dir = Path.join(base, name_fun.())

    case File.mkdir(dir) do
      :ok ->
        case File.chmod(dir, 0o700) do
          :ok ->
            {:ok, dir}

          {:error, why} ->
            _ = File.rmdir(dir)
            {:error, dir, "cannot make #{dir} private (chmod 0700): #{:file.format_error(why)}"}
        end

      {:error, :eexist} when tries > 1 ->
        create(base, name_fun, tries - 1)

      {:error, why} ->
        {:error, dir, :file.format_error(why) |> to_string()}
    end
  end
end
