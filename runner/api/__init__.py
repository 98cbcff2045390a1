"""The runner server's API in rooms: `auth` (the token, sessions and the checks every request passes), `service`
(the store, registry, dispatcher and scheduler the routes act on, and the dispatch loop), `jobs` (jobs, logs, the
cluster). runner/server.py assembles them with the model, schedule and dashboard routers."""
