defmodule Snakepit.MixProject do
  use Mix.Project

  def project do
    [
      app: :snakepit,
      version: "0.1.0",
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      elixirc_paths: elixirc_paths(Mix.env()),
      # hex.pm is unreachable here: everything (HTTP/2, HPACK, protobuf) is carried in-tree.
      deps: []
    ]
  end

  def application do
    [
      # jiffy comes from Debian's erlang-jiffy, installed in OTP's own code path; crypto makes
      # the workers' readiness nonces; ssl (and its public_key) is the channel's TLS.
      extra_applications: [:logger, :crypto, :jiffy, :public_key, :ssl],
      mod: {Snakepit.Application, []}
    ]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]
end
