"""Release: evaluate a trained model, register it, promote it if better, package it as a Bento."""
