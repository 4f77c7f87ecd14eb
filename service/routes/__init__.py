"""One router per resource: jobs, datasets, ops (health, readiness, metrics), models, compare."""
