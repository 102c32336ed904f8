# The Elixir pool that uses workers.yaml's Deployment (config/runtime.exs of the Elixir application,
# which runs in the same namespace, "default" here). The workers are found by DNS through the
# headless Service and watched with grpc.health.v1.Health/Watch; their capacity is each server's
# --max-workers (GetStats max_workers). tests/test_deploy_kubernetes.py checks it against workers.yaml.
import Config

config :snakepit,
  pools: [
    %{
      name: :remote_workers,
      worker_profile: :remote,
      discovery: {:dns, "snakepit-workers.default.svc.cluster.local", 50052},
      resolve_interval: 5_000,
      max_connection_age: {10, :minutes},
      call_timeout: 60_000
    }
  ]
