"""The fetch engine: the range scheduler, its pace, hedging, link rate, retries, workers."""
