"""Built-in demo models: deterministic weights, no downloads."""
