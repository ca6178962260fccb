"""The machinery behind a sweep: CLI, trainloop, one job, the job iterator, executors and the store."""
