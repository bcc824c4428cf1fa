"""Batch work on Ray: corpus preparation (Ray Data) and fine-tuning (Ray Train)."""
