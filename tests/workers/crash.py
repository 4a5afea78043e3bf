"""Test worker that fails at once, like an app with a broken deploy."""
import sys

print("crashing on purpose", file=sys.stderr, flush=True)
sys.exit(3)
