"""The fairness queue: per-model queues ordered by priority class, then recent usage."""
