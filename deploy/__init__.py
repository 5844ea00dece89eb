"""Running digitops as a team deployment on real engines: PostgreSQL, an MLflow server, nginx."""
