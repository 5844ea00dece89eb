"""The request path the BentoML service (top-level `serving/`) runs: settings, request parsing
and errors, preprocessing, the served forward pass, explanations, the prediction store and
feedback ingestion."""
