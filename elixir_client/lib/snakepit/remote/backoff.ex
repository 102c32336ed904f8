defmodule Snakepit.Remote.Backoff do
  @moduledoc """
  Reconnect delays of a remote endpoint: capped exponential backoff with "equal jitter" (half the
  delay fixed, half random), so that the connections of many pools to an endpoint that comes back
  do not all retry at the same instant, while a retry still waits at least half the step.
  Pure: the caller holds the `:rand` state.
  """

  @doc """
  The delay (ms) before the `failures`-th consecutive reconnect: `base * 2^(failures-1)` capped
  at `max`, then a uniform draw in `[delay/2, delay]`; and the next `:rand` state.
  """
  @spec delay(pos_integer, pos_integer, pos_integer, :rand.state()) ::
          {pos_integer, :rand.state()}
  def delay(failures, base, cap, rand) when failures >= 1 do
    step = min(base * Integer.pow(2, min(failures - 1, 16)), cap)
    {x, rand} = :rand.uniform_s(rand)
    {max(div(step, 2) + round(x * (step - div(step, 2))), 1), rand}
  end
end
