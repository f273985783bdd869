"""Settings and the `ledgerflow` command line: the only place that wires the sides together."""
