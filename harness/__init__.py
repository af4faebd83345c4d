"""The run harness: what keeps a run's directory safe and its results whole (not part of the homework)."""
