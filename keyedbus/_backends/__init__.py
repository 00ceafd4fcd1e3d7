"""Transports behind the bus: the embedded broker (memory://), NATS core and JetStream (nats://)."""
