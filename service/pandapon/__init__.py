"""The thin PandaPon client: ``client`` (the calls), ``signer``, ``endpoints`` (the table),
``errors`` (the exception tree), ``ratelimit`` (the shared bucket), ``mapping`` (payloads →
``models``)."""
