"""The embedded serving plane: Knative Serving semantics on one machine."""
