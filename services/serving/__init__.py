"""The Ray Serve layer: every stage and the gateway as independent Serve applications (docs/serving.md).

- `apps`: the deployments and the builders a Serve config (`deploy/*.yaml`) names, with their pydantic args.
- `routes`: how peers reach a stage's replicas: directly on each replica's own gRPC port, one replica per call
  chosen from Serve's live list (why: the module's docstring).
- `autoscaling`: the policy that adds the calls replicas report to the requests Serve counts itself.
- `serve_cmd`: `omni serve`, a local cluster running a config.
"""
