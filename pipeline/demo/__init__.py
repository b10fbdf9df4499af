"""`persona demo`: simulated users (`sim`), the run through a real deployment's processes (`run`, `processes`) and
its report (`report`). Imported only by the CLI (and the tests)."""
