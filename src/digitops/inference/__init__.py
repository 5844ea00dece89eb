"""The request path the BentoML service (top-level `serving/`) runs: settings, request parsing
and errors, preprocessing, batching, explanations, the prediction store and feedback ingestion."""
