"""The meshserve controller: routing, worlds, health, launchers, admin API and the CLI."""
