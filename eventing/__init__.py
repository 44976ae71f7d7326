"""Eventing: CloudEvent types, the local broker with Knative triggers, the inference-graph router."""
