"""Storage: shards and the manifest on local disk and/or S3, written by one owner, read by many.

Writing: ``transport`` (writer threads, or the Ray ``writer_pool``) → ``sink`` (atomic local writes,
S3 uploads) → ``manifest`` (one owner, group commit). The format of one shard is ``shard``;
``s3`` makes boto3 clients; ``recovery`` is ``mechray sync`` / ``mechray repair``. Reading:
``reader`` (:class:`ShardStore`, checksums verified, S3 cached locally).

May import: ``mechray.config``, ``mechray.errors``. Never ``capture``, ``analysis`` or ``api``.
"""
