"""The operator console (`persona console`): server-rendered pages over the registry, the gate's decisions and the
pipeline, and operator actions (promote, roll back, forget) through the same flows as the CLI.

An entry point like the CLI: it parses input and calls `pipeline.flows` or reads through `pipeline.storage`; the
library never imports it. Every page but the login needs an operator session (an admin key, then a session cookie
and a CSRF token on every form); templates are autoescaped, so nothing a user typed is rendered as markup.
"""
