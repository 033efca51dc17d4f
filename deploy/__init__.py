"""Deployment on Flower's Deployment Engine: certificates and keys (:mod:`deploy.pki`), the command
lines (:mod:`deploy.commands`), process bookkeeping (:mod:`deploy.procs`), the CLI
(:mod:`deploy.cli`, ``python -m deploy``) and the local rehearsal (:mod:`deploy.rehearsal`).
Nothing here imports torch or flwr; see docs/deployment.md."""
