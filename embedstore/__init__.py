"""embedstore."""
