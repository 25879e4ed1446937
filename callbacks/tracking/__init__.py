"""MLflow bookkeeping of a run: the spool, dataset lineage, system metrics, the run's logger."""
