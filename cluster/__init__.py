"""Where Ray work runs: cluster connection, job submission, hardware presets."""
