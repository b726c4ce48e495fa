"""Asyncio agents: Kafka in, protocol state machine, Kafka out."""
