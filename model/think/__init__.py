"""OneRec-Think: itemic-token LLM and its three training stages (alignment, activation, enhancement)."""
