"""The BentoML service and its web page."""
