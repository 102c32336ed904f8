import Config

# Pools started by the :snakepit application (see README.md for every key):
#
#     config :snakepit,
#       pools: [
#         %{name: :default, worker_profile: :process, pool_size: 4}
#       ]
config :snakepit, pools: []

# Worker stdout/stderr, per-call lines and workers becoming ready are :debug; recycling and
# stopping :info; crashes :warning. This file is not loaded when snakepit is a dependency (see
# README.md, "Quick start").
config :logger, level: if(config_env() == :test, do: :warning, else: :info)
