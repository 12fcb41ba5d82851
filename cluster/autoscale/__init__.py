"""Autoscaling: policies (pure), the metrics collector, actuators and the loop."""
