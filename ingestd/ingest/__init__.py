"""The ingest core: access rules, the steps of a device post, the pipeline
(bounded queue, group commit), the device registry, metrics."""
