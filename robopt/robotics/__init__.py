"""Simulated robot tasks (MuJoCo), scripted experts, closed-loop rollouts and the control-rate timing model."""
