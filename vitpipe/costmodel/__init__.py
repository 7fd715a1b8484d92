"""The cost model: device profiles (data), parameters / FLOPs / memory of a network at a
setting, the micro-batch planner, the profile table and the reference report's figures.
Pure arithmetic over `vitpipe.models` configs: it never probes the machine (that is
`vitpipe.hardware`, which imports this package, never the reverse)."""
