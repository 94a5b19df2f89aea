"""Test support shared by the unit and integration tests (and bench/hotpath): one place for it.

- messages: frontend and backend protocol messages, built on pypooler.protocol's builders, and
  reading bytes back as messages
- transports: fake asyncio transports, and a pool with one logged-in server over them
- model_server: a tiny model of how PostgreSQL answers prepared-statement traffic
- pgwire: a raw protocol-3 client, and one-shot raw exchanges on a socket
- poolers: a pypooler served in a thread (conftest's `start_pooler` fixture starts them)
- processes: a `pypooler run` process and its configuration file
- prometheus: reading /metrics, and a collector with traffic to read without a pooler
- tlscerts: a throwaway certificate authority
- clock: a clock that stands still until a test moves it
- waiting: polling until a condition holds

Fixtures stay in tests/conftest.py, where pytest finds them.
"""
