"""Use cases: what happens to a user's adapter, reading and writing the stores in a documented order.

Each flow takes the process's stores (`pipeline.storage.stores.Stores`: the PostgreSQL pool and the object store),
the announcer of the promotions topic where it announces, and the settings values it needs; it never builds
settings or connections of its own. Entry points (the CLI, Celery tasks, the demo) parse input and call a flow.

- `retrain`: lease due users, plan, train from the production revision, write candidates;
- `gate`: measure a candidate against the revision serving, decide under the operator's rules, promote;
- `promotion`: promote, roll back, publish, forget (alias compare-and-swap, pointer, announcement);
- `schedule`: claim due users and enqueue their retrains;
- `export`: a revision as a directory stock peft loads;
- `failpoints`: named moments where a test forces the worst timing (no-op in production).
"""
