"""`pgwarden mcp`: the gate as a Model Context Protocol server.

The server decides nothing itself. Every statement a tool runs is sent over the PostgreSQL wire
protocol to the pgwarden proxy, authenticated as the agent (a token, or the pod's identity on
loopback), so identity, policy, approvals, masking, audit and recording are the proxy's, on the
one code path that also serves psql and every driver.

- `outcomes.py`: what the proxy answered, as typed results (pure: SQLSTATE and NOTICE → outcome)
- `gate.py`: the session to the proxy (pg8000), the row cap, statements held for approval
- `tools.py`: the tools, their JSON schemas and descriptions, argument checks, result building
- `policyview.py`: with `--config`, the policy's view for this agent (explain, access, masked columns)
- `server.py`: the MCP server (official `mcp` SDK) and the stdio / streamable-HTTP entry points
- `cli.py`: `pgwarden mcp`, which says what to install when the SDK is missing
"""
