"""The embedded schema registry: Apicurio Registry from Maven Central, run on the venv's own Java."""
