"""The request flow of the orchestrator model: its configuration (`config`), routing
decisions over pools (`router`), pool membership and probes (`membership`), a request's
lifecycle (`pipeline`), its phases on engines with retries and migration (`phases`,
`migration`, `child_replies`, `child_stops`), its answers (`progress`), timers
(`deadline`), and stop=true between sibling instances (`siblings`).

May import: wire, text, telemetry, runtime, clients, routing.
"""
