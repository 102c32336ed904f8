defmodule Snakepit.Pool.SocketDir do
  @moduledoc """
  The private directory in which a `transport: :uds` pool's workers put their Unix sockets.

  One directory per pool, `<base>/snakepit-<BEAM os pid>-<n>`, mode 0700: only this user can reach
  the sockets in it (each is also 0600, made so by the server). `<base>` is `$XDG_RUNTIME_DIR`
  when it is set and usable (an absolute, writable directory with room for the names below), else
  `System.tmp_dir!/0`. Worker `id` (unique per spawn in a pool) listens on `<dir>/w<id>.sock`, so a
  replacement never meets the socket or `.sock.lock` file of the worker it replaces.

  A Unix socket path has at most 107 bytes (`sun_path` is 108 with its NUL); the directory is
  refused when the socket of a worker id of 12 digits would not fit.

  Clean-up: the server removes its socket and lock file when it exits cleanly; `remove_socket/2`
  removes what a killed one left; `remove/1` the directory when the pool stops. `create/0` also
  sweeps the directories of BEAMs that are gone (the OS pid in the name is not running, and no
  socket in the directory accepts a connection), so a BEAM killed with `kill -9` leaves nothing for
  long. (A pool process killed outright in a BEAM that lives on leaves its directory until then.)
  """

  require Logger

  @max_path_bytes 107
  # "/w" <> a 12-digit worker id <> ".sock"
  @longest_socket_name byte_size("/w") + 12 + byte_size(".sock")
  @prefix "snakepit-"

  @doc """
  Creates a fresh directory for one pool, then sweeps those of dead BEAMs (this user's: the new
  directory's owner). Returns `{:ok, dir}` or `{:error, message}`.
  """
  @spec create() :: {:ok, Path.t()} | {:error, String.t()}
  def create do
    with {:ok, base} <- base(),
         {:ok, dir} <- make(base) do
      {:ok, %File.Stat{uid: uid}} = File.lstat(dir)
      sweep(base, uid)
      {:ok, dir}
    end
  end

  @doc "The socket path of worker `id` in `dir`."
  @spec socket_path(Path.t(), pos_integer) :: Path.t()
  def socket_path(dir, id), do: Path.join(dir, "w#{id}.sock")

  @doc "Removes the socket of worker `id` and its lock file, if they are still there."
  @spec remove_socket(Path.t(), pos_integer) :: :ok
  def remove_socket(dir, id) do
    path = socket_path(dir, id)
    _ = File.rm(path)
    _ = File.rm(path <> ".lock")
    :ok
  end

  @doc "Removes the pool's directory and whatever is left in it."
  @spec remove(Path.t()) :: :ok
  def remove(dir) do
    _ = File.rm_rf(dir)
    :ok
  end

  @doc """
  The directory under which pool directories go: `$XDG_RUNTIME_DIR` when usable, else the
  temporary directory; an error when neither leaves room for a socket path.
  """
  @spec base() :: {:ok, Path.t()} | {:error, String.t()}
  def base do
    xdg = System.get_env("XDG_RUNTIME_DIR")
    tmp = System.tmp_dir!()

    cond do
      usable?(xdg) ->
        {:ok, xdg}

      fits?(tmp) ->
        {:ok, tmp}

      true ->
        {:error,
         "no directory for the workers' Unix sockets: #{tmp} (the temporary directory) is too long " <>
           "for a socket path of at most #{@max_path_bytes} bytes; set TMPDIR or XDG_RUNTIME_DIR to a " <>
           "shorter directory, or use transport: :tcp"}
    end
  end

  defp usable?(dir) when dir in [nil, ""], do: false

  defp usable?(dir) do
    Path.type(dir) == :absolute and fits?(dir) and
      match?(
        {:ok, %File.Stat{type: :directory, access: access}} when access in [:read_write, :write],
        File.stat(dir)
      )
  end

  # Room for "/snakepit-<pid>-<n>" (n up to 10 digits) and the longest socket name.
  defp fits?(base),
    do:
      byte_size(base) + byte_size("/" <> @prefix <> System.pid() <> "-") + 10 +
        @longest_socket_name <= @max_path_bytes

  defp make(base) do
    case Snakepit.PrivateDir.create(base, fn ->
           "#{@prefix}#{System.pid()}-#{System.unique_integer([:positive])}"
         end) do
      {:ok, dir} ->
        {:ok, dir}

      {:error, dir, why} ->
        {:error,
         "cannot create #{dir} for the workers' Unix sockets: #{why} " <>
           "(use transport: :tcp, or set XDG_RUNTIME_DIR / TMPDIR to a writable directory)"}
    end
  end

  @doc """
  Removes the pool directories under `base` left by BEAMs that are gone: named after an OS pid
  other than this BEAM's that is not running, owned by `uid` (this user), and with no socket in them that
  accepts a connection (a BEAM in another pid namespace sharing the directory still serves its
  sockets). Returns the directories removed.
  """
  @spec sweep(Path.t(), non_neg_integer) :: [Path.t()]
  def sweep(base, uid) do
    me = System.pid()

    case File.ls(base) do
      {:ok, names} ->
        for name <- names,
            {:ok, pid} <- [beam_pid(name)],
            pid != me,
            dir = Path.join(base, name),
            owned_dir?(dir, uid),
            not os_pid_running?(pid),
            not serving_socket?(dir) do
          Logger.debug("snakepit: removing #{dir}, the socket directory of a BEAM that is gone")
          remove(dir)
          dir
        end

      {:error, _} ->
        []
    end
  end

  defp beam_pid(@prefix <> rest) do
    case String.split(rest, "-") do
      [pid, n] ->
        if digits?(pid) and digits?(n), do: {:ok, pid}, else: :error

      _ ->
        :error
    end
  end

  defp beam_pid(_name), do: :error

  defp digits?(s), do: s != "" and String.match?(s, ~r/\A[0-9]+\z/)

  # A directory (not a symlink to one) owned by `uid`.
  defp owned_dir?(dir, uid),
    do: match?({:ok, %File.Stat{type: :directory, uid: ^uid}}, File.lstat(dir))

  defp os_pid_running?(pid) do
    if File.dir?("/proc"),
      do: File.exists?("/proc/" <> pid),
      else: match?({_, 0}, System.cmd("kill", ["-0", pid], stderr_to_stdout: true))
  rescue
    # cannot tell: leave the directory alone
    _ -> true
  end

  defp serving_socket?(dir) do
    case File.ls(dir) do
      {:ok, names} ->
        Enum.any?(names, fn name ->
          path = Path.join(dir, name)

          String.ends_with?(name, ".sock") and
            case :gen_tcp.connect({:local, path}, 0, [:binary, active: false], 200) do
              {:ok, socket} ->
                :gen_tcp.close(socket)
                true

              {:error, _} ->
                false
            end
        end)

      {:error, _} ->
        false
    end
  end
end
