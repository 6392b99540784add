"""Autoscaling on the load that stage replicas report.

Serve counts the requests it routes itself (its gRPC proxy, deployment handles). Peers stream to stage replicas
directly (`services.serving.routes`), so Serve does not see those calls: each stage replica counts the stage calls
it is running and reports them through `record_autoscaling_stats` (`services.serving.apps`), and this policy adds
them to Serve's own count. Select it per deployment in a Serve config:

    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      target_ongoing_requests: 4
      policy: {policy_function: services.serving.autoscaling:stage_load_policy}

Serve's controller imports this module: keep it free of torch and the engines.
"""

from __future__ import annotations

from typing import Any

STAGE_CALLS = "omni_stage_calls"  # the custom metric: stage calls in progress on a replica


def stage_load_policy(ctx) -> tuple[float, dict[str, Any]]:
    """Serve's default rule, replicas = load / target_ongoing_requests, with load = the requests Serve routed plus
    the stage calls the replicas report (each averaged over the look-back window). Serve applies min/max replicas,
    up/downscale delays and smoothing factors around the number returned. `ctx` is a Serve AutoscalingContext."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    reported = sum((ctx.aggregated_metrics or {}).get(STAGE_CALLS, {}).values())
    return (ctx.total_num_requests + reported) / ctx.config.get_target_ongoing_requests(), {}
