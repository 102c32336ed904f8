import Config

# Pools started by the :snakepit application (see README.md for every key):
#
#     config :snakepit,
#       pools: [
#         %{name: :default, worker_profile: :process, pool_size: 4}
#       ]
config :snakepit, pools: []

if config_env() == :test do
  # Worker stdout/stderr and per-call logs are :debug; keep test output readable.
  config :logger, level: :warning
end
