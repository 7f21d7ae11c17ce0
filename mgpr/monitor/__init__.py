"""Run monitoring: NVML sampling, the run-monitor callback, progress, the report and its plot."""
