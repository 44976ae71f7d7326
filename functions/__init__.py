"""The per-model vLLM function: Flask app, gunicorn runner, engine adapter."""
