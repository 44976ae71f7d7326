"""thaw: serverless LLM functions on Knative that start fast from zero."""
