"""Load tests that measure cold start: the locustfiles (run by the `locust` command) and `thaw bench`."""
