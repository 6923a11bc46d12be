"""What every Anvil service process shares beyond the wire contract: typed configs from TOML with
`--set` overrides and the entry-point body (`config`), dying with the launching process (`process`),
and the seq-id sequencer core behind exactly-once training requests (`sequencer`).

`learner/`, `rollout/` and `coordinator/` import this package and `protos/`; it imports only `protos/`.
"""
