"""Edges of the service: Kafka clients, Redis reference queues, media sources, metrics, local services."""
