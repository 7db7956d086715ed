"""The test and benchmark kit: what tests/ and bench/ both use, in one place, so neither
copies the other's helpers and bench/ never imports tests/. The server never imports it
(controller/ and worker/ run without it), and it imports nothing from controller/.

- ``clock``: ``FakeClock``, the injected clock a test moves by hand.
- ``ports``: ``free_port``, ``free_ports`` on loopback.
- ``configs``: ``write_config`` / ``config_text``, the one config writer (endpoints,
  controller keys, deployments TOML).
- ``waits``: ``until`` (a predicate, a deadline, what was awaited) and ``wait_status`` (the
  admin ``status`` until a predicate on it holds).
- ``ledger``: ``LedgerClient``, a real client that keeps a ``Ledger`` of what it sent and
  what came back, per request id.
- ``processes``: finding, starting and ending processes by PID.
- ``cluster``: ``Cluster``, a running controller process and the means to look at it.
- ``hosts``: ``Hosts`` and ``Site``, several hosts simulated with network namespaces.
"""
