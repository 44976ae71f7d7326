"""Cache tier, stager, prewarm, cold-start optimizer and the warmer's CloudEvents app."""
