"""The PandaPon emulator behind ``pandasync sandbox`` (docs/sandbox.md).

``world`` keeps orders in neutral terms, ``render`` turns them into Taobao and 1688 payloads,
``app`` serves the query endpoints and the control API, ``delivery`` sends the callbacks,
``scenario`` makes seeded random traffic and ``remote`` is a client for the control API.
"""
