"""Studies over continual runs: order designs, the Tune runner, the command-line layer shared by the
scripts in sweeps/, the closing analysis and its report."""
