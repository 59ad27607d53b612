"""Commands beside the daemon: `ingestd simulate`, `ingestd export`,
`ingestd quarantine`."""
