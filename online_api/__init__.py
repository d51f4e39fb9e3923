"""Online tier: FastAPI service completing item codes under cached prefixes within a latency budget."""
