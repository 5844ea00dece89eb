"""`make bench`: latency and throughput of the model, a FastAPI baseline and the services."""
