"""The autoexport daemon, its export job runner, the built-in exporter and the CLI."""
