"""Real deployment on Flower: SuperLink + SuperNodes, TLS, our strategy and our clients.

* :mod:`~fmtl_lightning.deploy.server_app` - the ServerApp (round loop, checkpoints, resume)
* :mod:`~fmtl_lightning.deploy.strategy` - the Flower strategy (slice, validate, aggregate)
* :mod:`~fmtl_lightning.deploy.client_app` - the ClientApp (Lightning or edge per node)
* :mod:`~fmtl_lightning.deploy.lightning_client` - a node trained like the simulator
* the round logic itself is :mod:`fmtl_lightning.engine` (shared with the in-process simulation)
* :mod:`~fmtl_lightning.deploy.local` - SuperLink + SuperNodes as local processes
* :mod:`~fmtl_lightning.deploy.tls` - self-signed CA + server certificate
* :mod:`~fmtl_lightning.deploy.cli` - ``fmtl deploy ...`` (``python -m fmtl_lightning.deploy``)

The wire records live in :mod:`mobile_client.flower_app` (the ground floor owns formats).
Importing this package imports nothing heavy.
"""
