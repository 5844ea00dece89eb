"""One entry point per DVC stage; each composes the Hydra config and calls one digitops function."""
