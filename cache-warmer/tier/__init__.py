"""The cache tier library: the tier on disk (cache.py), where weights come from (origins.py), staging them in
(stager.py, ensure.py) and reading them ahead (prewarm.py). Replicas, the warmer service and the command line
import it; it imports nothing of theirs."""
