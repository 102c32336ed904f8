defmodule Snakepit.PythonPort do
  @moduledoc """
  Opens the Port of a Python server process (a worker, or a pool's fork server): stdout and stderr
  as one stream of lines of at most `max_line_bytes`, its exit status reported, run in `cd` with
  `env` added to the BEAM's environment.
  """

  @doc "The Port and the OS pid of `exe args`; raises what `Port.open/2` raises."
  @spec open(String.t(), [String.t()], [{String.t(), String.t()}], Path.t(), pos_integer) ::
          {port, non_neg_integer}
  def open(exe, args, env, cd, max_line_bytes) do
    env = Enum.map(env, fn {k, v} -> {String.to_charlist(k), String.to_charlist(v)} end)

    port =
      Port.open({:spawn_executable, exe}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        :hide,
        {:line, max_line_bytes},
        {:args, args},
        {:env, env},
        {:cd, cd}
      ])

    {:os_pid, os_pid} = Port.info(port, :os_pid)
    {port, os_pid}
  end
end
