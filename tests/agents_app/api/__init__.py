"""PROTOCOL.md's agent endpoints, spoken over real HTTP to a real uvicorn process on the test database: one
file per endpoint (register, claim, heartbeat, progress, complete, artifacts) and one for what they all share.

Every refusal is checked through `assert_error`, which also pins the error body to exactly
{"error", "detail"}. The server runs with the fast clocks of tests/conftest.py (heartbeat 1 s, lease 6 s,
max wait 5 s, offline after 3 s), so every test here finishes well inside those windows.
"""
