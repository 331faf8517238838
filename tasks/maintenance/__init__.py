"""The daily maintenance stage: health checks, cleanup, utilization and error review."""
