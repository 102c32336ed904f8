defmodule Snakepit.Shm do
  @moduledoc """
  Shared-memory regions: large bytes and arrays passed to and from a pool's local workers as files
  in a private directory on a tmpfs instead of inline in gRPC messages (the encoding is the
  "Shared memory" section of the header of `proto/snakepit_bridge.proto`; the Python side is
  `snakepit_bridge/server/shm.py`).

  A pool with `shm: true` has one directory,
  `<base>/snakepit-<beam os pid>-<beam start>-<pid namespace>-<pool>-<id>` (mode 0700; `base` is
  `/dev/shm` when it exists), made by `open_pool_dir/3` and passed to every worker as
  `--shm-dir`; it is deleted when the pool stops. Directories of BEAMs that are gone (a `kill -9`,
  a `System.halt/1`) and of an earlier run of the same pool in this BEAM are deleted by the next
  pool that starts on the host; those of BEAMs in another pid namespace (another container
  sharing the tmpfs) are left alone, since their pids cannot be checked from here.

  One call (`t:call/0`, from `new_call/1`):

    * its argument blobs of at least `min_bytes` are named `"<args_prefix>.<n>"` by
      `Snakepit.Codec.encode_placing/2` (pure: it returns what to write) and written by
      `write_args/1`, mode 0600, once the call has its pool slot;
    * it asks the worker for result regions named `"<result_prefix>.<n>"` (`request_fields/1`);
      the decoder reads each through `reader/1`, which deletes the file once read;
    * `finish/2` deletes its argument regions, and after a failure every `"<result_prefix>.*"`
      (results the worker wrote whose reference never arrived).

  The checkout registers both prefixes with the pool (`prefixes/1`): when the caller dies during
  the call, the pool deletes its regions, and those an abandoned call's tool writes later
  (`delete_prefixes/2`).

  Names are the call's capability: any process of this user that can name a region can have a
  worker read it, so prefixes carry 128 random bits.
  """

  require Logger

  defstruct [:dir, :min_bytes]

  @typedoc "A pool's shared memory: its directory and the smallest blob that goes to a region."
  @type t :: %__MODULE__{dir: String.t(), min_bytes: pos_integer}

  @typedoc "One call's regions (see the moduledoc)."
  @type call :: %{
          dir: String.t(),
          min_bytes: pos_integer,
          args_prefix: String.t(),
          result_prefix: String.t(),
          args: [Snakepit.Codec.placement()]
        }

  @default_min_bytes 65_536
  @dir_prefix "snakepit-"
  # <pid>-<start>-<pid namespace>-<pool slug>-<hash of the pool name>-<random>
  @dir_pattern ~r/^snakepit-(\d+)-(\d+)-(\d+)-([A-Za-z0-9_]*)-([0-9a-f]{16})-([0-9a-f]{16})$/

  @doc "The smallest blob sent as a region unless a pool says otherwise (`shm_min_bytes`)."
  @spec default_min_bytes() :: pos_integer
  def default_min_bytes, do: @default_min_bytes

  @doc "Where pool directories go by default: `/dev/shm` when it exists, else the system tmp dir."
  @spec default_base() :: String.t()
  def default_base do
    if File.dir?("/dev/shm"), do: "/dev/shm", else: System.tmp_dir!()
  end

  @doc "A name or prefix nobody can guess: 128 random bits, 32 hex digits."
  @spec new_token() :: String.t()
  def new_token, do: Base.encode16(:crypto.strong_rand_bytes(16), case: :lower)

  ## the pool's directory

  @doc """
  Makes the pool's private directory under `base` (mode 0700), then deletes the directories in
  `base` of this user's BEAMs that are gone and of earlier runs of pool `pool_name` in this BEAM
  (one killed before it could delete its own). Logs a warning when `base` is not on a tmpfs
  (regions then go through a disk-backed file system).
  """
  @spec open_pool_dir(atom, String.t(), pos_integer) :: {:ok, t} | {:error, String.t()}
  def open_pool_dir(pool_name, base, min_bytes) do
    base = Path.expand(base)
    owner = beam_tag()

    with :ok <- check_base(base),
         {:ok, dir} <- make_private_dir(base, owner, pool_name, 5) do
      swept = sweep(base, owner, pool_name, dir)

      if swept != [] do
        Logger.info(
          "snakepit pool #{inspect(pool_name)}: deleted #{length(swept)} shared-memory directories " <>
            "left by BEAMs that are gone (or an earlier run of this pool): #{Enum.join(swept, ", ")}"
        )
      end

      case tmpfs?(base) do
        false ->
          Logger.warning(
            "snakepit pool #{inspect(pool_name)}: #{base} is not a tmpfs: shared-memory regions " <>
              "go through a disk-backed file system (set shm_base_dir to a tmpfs such as /dev/shm)"
          )

        _ ->
          :ok
      end

      {:ok, %__MODULE__{dir: dir, min_bytes: min_bytes}}
    end
  end

  defp check_base(base) do
    if File.dir?(base),
      do: :ok,
      else: {:error, "shared-memory base directory #{base} does not exist"}
  end

  # A name someone else made first is not ours: then another (random) name.
  defp make_private_dir(base, {pid, start, ns}, pool_name, tries) do
    name = fn ->
      Enum.join(
        [@dir_prefix <> pid, start, ns, slug(pool_name), name_hash(pool_name), random_hex(8)],
        "-"
      )
    end

    case Snakepit.PrivateDir.create(base, name, tries) do
      {:ok, dir} -> {:ok, dir}
      {:error, _dir, why} -> {:error, "cannot make a shared-memory directory in #{base}: #{why}"}
    end
  end

  # The pool directories in `base` of this user that belong to a BEAM that is gone, or to this
  # BEAM and an earlier run of the pool named `pool_name` (not `keep`, the new one): deleted, and
  # their names returned.
  defp sweep(base, owner, pool_name, keep) do
    my_hash = name_hash(pool_name)
    my_uid = my_uid(keep)

    case File.ls(base) do
      {:ok, names} ->
        for name <- names,
            String.starts_with?(name, @dir_prefix),
            [_, pid, start, ns, _slug, hash, _rand] <- [Regex.run(@dir_pattern, name)],
            path = Path.join(base, name),
            path != keep,
            stale?({pid, start, ns}, owner, hash == my_hash),
            owned_dir?(path, my_uid),
            removed?(path) do
          name
        end

      {:error, _} ->
        []
    end
  end

  defp removed?(path), do: match?({:ok, _}, File.rm_rf(path))

  defp stale?(beam, beam, same_pool?), do: same_pool?
  defp stale?({pid, start, ns}, {_, _, ns}, _same_pool?), do: not beam_alive?(pid, start)
  # a BEAM in another pid namespace (another container sharing this tmpfs): its pid means
  # nothing here, so it is never taken for gone
  defp stale?(_beam, _me, _same_pool?), do: false

  defp owned_dir?(path, uid) do
    case File.lstat(path) do
      {:ok, %File.Stat{type: :directory, uid: ^uid}} -> true
      _ -> false
    end
  end

  defp my_uid(dir) when is_binary(dir) do
    case File.stat(dir) do
      {:ok, %File.Stat{uid: uid}} -> uid
      _ -> my_uid(nil)
    end
  end

  defp my_uid(nil) do
    with {:ok, status} <- File.read("/proc/self/status"),
         [_, uid] <- Regex.run(~r/^Uid:\s+(\d+)/m, status) do
      String.to_integer(uid)
    else
      _ -> nil
    end
  end

  @doc "Deletes a pool's directory and every region in it (the pool has stopped)."
  @spec remove_dir(t | nil) :: :ok
  def remove_dir(nil), do: :ok

  def remove_dir(%__MODULE__{dir: dir}) do
    File.rm_rf(dir)
    :ok
  end

  @doc "Deletes every region `\"<prefix>.*\"` in `dir`, for each of `prefixes`."
  @spec delete_prefixes(String.t(), [String.t()]) :: :ok
  def delete_prefixes(_dir, []), do: :ok

  def delete_prefixes(dir, prefixes) do
    starts = Enum.map(prefixes, &(&1 <> "."))

    case File.ls(dir) do
      {:ok, names} ->
        for name <- names, String.starts_with?(name, starts), do: File.rm(Path.join(dir, name))
        :ok

      {:error, _} ->
        :ok
    end
  end

  # This BEAM as its directories name it: OS pid, start time (clock ticks after boot, from /proc:
  # a pid reused by another process does not keep a dead BEAM's directory) and pid namespace.
  defp beam_tag do
    pid = System.pid()
    {pid, process_start(pid) || "0", pid_namespace()}
  end

  defp pid_namespace do
    with {:ok, link} <- File.read_link("/proc/self/ns/pid"),
         [_, inode] <- Regex.run(~r/\[(\d+)\]/, link) do
      inode
    else
      _ -> "0"
    end
  end

  defp beam_alive?(pid, start) do
    cond do
      File.exists?("/proc/self/stat") -> match?({:running, ^start}, process_state(pid))
      true -> kill_0(pid)
    end
  end

  defp process_start(pid) do
    case process_state(pid) do
      {_, start} -> start
      nil -> nil
    end
  end

  # {:running | :exited, start time} of an OS process from /proc (a zombie has exited: it is only
  # waiting for its parent to reap it), or nil
  defp process_state(pid) do
    with {:ok, stat} <- File.read("/proc/#{pid}/stat"),
         [_comm, fields] <- :binary.split(stat, ") ", [:global]) |> Enum.take(-2) do
      # fields from the 3rd (state) on; the 22nd is starttime
      fields = String.split(fields, " ")
      state = if hd(fields) in ["Z", "X"], do: :exited, else: :running
      {state, Enum.at(fields, 19)}
    else
      _ -> nil
    end
  end

  defp kill_0(pid) do
    {_, status} = System.cmd("kill", ["-0", pid], stderr_to_stdout: true)
    status == 0
  rescue
    _ -> true
  end

  # true, false or :unknown (no /proc/self/mounts): the file system of the longest mount point
  # that holds `path`
  defp tmpfs?(path) do
    case File.read("/proc/self/mounts") do
      {:ok, mounts} ->
        path = resolve(path)

        mounts
        |> String.split("\n", trim: true)
        |> Enum.map(&String.split(&1, " "))
        |> Enum.filter(&match?([_, _, _ | _], &1))
        |> Enum.map(fn [_dev, point, type | _] -> {unescape_mount(point), type} end)
        |> Enum.filter(fn {point, _} -> under?(path, point) end)
        |> Enum.max_by(fn {point, _} -> byte_size(point) end, fn -> {"/", "unknown"} end)
        |> elem(1)
        |> Kernel.in(["tmpfs", "ramfs"])

      {:error, _} ->
        :unknown
    end
  end

  defp under?(_path, "/"), do: true
  defp under?(path, point), do: path == point or String.starts_with?(path, point <> "/")

  # /proc/mounts writes a space as \040 (and tab, newline, backslash likewise)
  defp unescape_mount(point),
    do: Regex.replace(~r/\\([0-7]{3})/, point, fn _, oct -> <<String.to_integer(oct, 8)>> end)

  defp resolve(path) do
    path
    |> Path.split()
    |> Enum.reduce("/", fn part, acc ->
      next = Path.join(acc, part)

      case File.read_link(next) do
        {:ok, target} -> resolve(Path.expand(target, acc))
        _ -> next
      end
    end)
  end

  defp slug(name) do
    name |> Atom.to_string() |> String.replace(~r/[^A-Za-z0-9_]/, "_") |> binary_part_max(40)
  end

  defp binary_part_max(s, n) when byte_size(s) > n, do: binary_part(s, 0, n)
  defp binary_part_max(s, _n), do: s

  defp name_hash(name) do
    :crypto.hash(:sha256, :erlang.term_to_binary(name))
    |> binary_part(0, 8)
    |> Base.encode16(case: :lower)
  end

  defp random_hex(bytes), do: Base.encode16(:crypto.strong_rand_bytes(bytes), case: :lower)

  ## one call

  @doc "A new call's regions in the pool's directory (fresh, unguessable prefixes)."
  @spec new_call(t) :: call
  def new_call(%__MODULE__{dir: dir, min_bytes: min_bytes}) do
    %{
      dir: dir,
      min_bytes: min_bytes,
      args_prefix: new_token(),
      result_prefix: new_token(),
      args: []
    }
  end

  @doc "What `Snakepit.Codec.encode_placing/2` needs to name the call's argument regions."
  @spec args_spec(call, String.t() | nil) :: Snakepit.Codec.region_spec()
  def args_spec(call, sub \\ nil) do
    prefix = if sub, do: "#{call.args_prefix}.#{sub}", else: call.args_prefix
    %{prefix: prefix, min_bytes: call.min_bytes}
  end

  @doc "The call with the argument regions `placements` to write (`write_args/1`)."
  @spec with_args(call | nil, [Snakepit.Codec.placement()]) :: call | nil
  def with_args(nil, []), do: nil
  def with_args(call, placements), do: %{call | args: placements}

  @doc "The prefixes to register with the call's checkout (the pool deletes them if the caller dies)."
  @spec prefixes(call | nil) :: [String.t()]
  def prefixes(nil), do: []
  def prefixes(call), do: [call.args_prefix, call.result_prefix]

  @doc "The request fields that ask the worker for result regions."
  @spec request_fields(call | nil) :: map
  def request_fields(nil), do: %{}

  def request_fields(call),
    do: %{shm_result_prefix: call.result_prefix, shm_result_min_bytes: call.min_bytes}

  @doc """
  Writes the call's argument regions, each a new file with mode 0600 (the directory is 0700, so
  no one else can open it in between). On a failure (a full tmpfs), deletes what it wrote and
  returns a message naming the directory.
  """
  @spec write_args(call | nil) :: :ok | {:error, String.t()}
  def write_args(nil), do: :ok

  def write_args(call) do
    Enum.reduce_while(call.args, :ok, fn {name, data}, :ok ->
      path = Path.join(call.dir, name)

      with :ok <- File.write(path, data, [:exclusive]),
           :ok <- File.chmod(path, 0o600) do
        {:cont, :ok}
      else
        {:error, why} ->
          delete_args(call)

          {:halt,
           {:error,
            "cannot write a #{IO.iodata_length(data)}-byte shared-memory region in #{call.dir}: " <>
              "#{:file.format_error(why)} (make the tmpfs larger, raise shm_min_bytes or set shm: false)"}}
      end
    end)
  end

  @doc """
  The decoder's region reader for the call's results: reads region `name` (only one of the call's
  result regions, `"<result_prefix>.<n>"`), deletes its file, and returns its `nbytes` bytes from
  `offset` (an off-heap binary: no copy into the caller's heap).
  """
  @spec reader(call | nil) :: Snakepit.Codec.region_reader() | nil
  def reader(nil), do: nil

  def reader(%{dir: dir, result_prefix: prefix}) do
    mine = prefix <> "."

    fn name, offset, nbytes ->
      with :ok <- result_name(name, mine),
           path = Path.join(dir, name),
           {:ok, bin} <- read(path, name) do
        File.rm(path)

        if offset + nbytes <= byte_size(bin),
          do: {:ok, binary_part(bin, offset, nbytes)},
          else:
            {:error,
             "region #{name} has #{byte_size(bin)} bytes; #{nbytes} from offset #{offset} run past its end"}
      end
    end
  end

  defp result_name(name, mine) do
    if is_binary(name) and String.starts_with?(name, mine) and
         Regex.match?(~r/^[A-Za-z0-9_.-]+$/, name),
       do: :ok,
       else: {:error, "region #{inspect(name)} is not one of this call's result regions"}
  end

  defp read(path, name) do
    case File.read(path) do
      {:ok, bin} -> {:ok, bin}
      {:error, why} -> {:error, "cannot read region #{name}: #{:file.format_error(why)}"}
    end
  end

  @doc """
  The call is over: deletes its argument regions and, when it `failed`, every result region the
  worker wrote for it (`"<result_prefix>.*"`) that was not read.
  """
  @spec finish(call | nil, boolean) :: :ok
  def finish(nil, _failed), do: :ok

  def finish(call, failed) do
    delete_args(call)
    if failed, do: delete_prefixes(call.dir, [call.result_prefix])
    :ok
  end

  defp delete_args(call) do
    for {name, _} <- call.args, do: File.rm(Path.join(call.dir, name))
    :ok
  end
end
