"""Analytical framework: what each named operation costs on each device, and where to place it.

Modules: hardware (device specs + measured CPU profile), models (HF config parsing, presets),
workload, ops (per-operation FLOPs/bytes/time), stagespec (the DESIGN stage-spec format),
planner, calibrate/validate (this CPU), plots. Nothing here imports the engine.
"""
