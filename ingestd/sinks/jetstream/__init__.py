"""The NATS JetStream sink: codec (record <-> message), sink, and the fan-out
that routes each record to the file sink, JetStream or both."""
