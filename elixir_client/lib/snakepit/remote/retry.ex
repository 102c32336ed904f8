defmodule Snakepit.Remote.Retry do
  @moduledoc """
  When `Snakepit.execute/4` on a `worker_profile: :remote` pool runs a call again on another
  endpoint (the pool's normal pick: the endpoint that failed is out of rotation by then, crashed
  or draining):

    * `:unavailable` - the server never ran the call (it refused the stream, was above a GOAWAY's
      last stream id, or was already shutting down): always safe; up to 2 more times.
    * `:worker_crashed` - the endpoint died with the call in flight: it may have run, partly or
      wholly, so only when the caller marks the call `idempotent: true`; once.

  Anything else, and every call on a pool of local workers, is returned as it is. Streams and
  batches are not retried.
  """

  alias Snakepit.Error

  @unavailable_retries 2

  @doc "Runs `attempt` (one call), and again as above; returns the last result."
  @spec run(atom | pid, keyword, (() -> {:ok, term} | {:error, Error.t()})) ::
          {:ok, term} | {:error, Error.t()}
  def run(pool, opts, attempt) do
    if Snakepit.Pool.remote?(pool),
      do: run(attempt, opts[:idempotent] == true, @unavailable_retries, 1),
      else: attempt.()
  end

  defp run(attempt, idempotent, unavailable_left, crashed_left) do
    case attempt.() do
      {:error, %Error{reason: :unavailable}} when unavailable_left > 0 ->
        run(attempt, idempotent, unavailable_left - 1, crashed_left)

      {:error, %Error{reason: :worker_crashed}} when idempotent and crashed_left > 0 ->
        run(attempt, idempotent, unavailable_left, crashed_left - 1)

      result ->
        result
    end
  end
end
