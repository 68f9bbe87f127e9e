"""Storage: shards and the manifest on local disk and/or S3, written by one owner, read by many.

Writing: ``transport`` (writer threads, or the Ray ``writer_pool``) → ``sink`` (atomic local writes,
S3 uploads) → ``manifest`` (one owner, group commit). The format of one shard is ``shard``, of the
manifest ``manifest_format``; ``target`` says where a store lives, ``files`` reads and writes its
local files safely; ``claim`` (one writing run per store) and ``history`` (what an S3 prefix
holds) guard it; ``s3`` makes boto3 clients; ``recovery`` is ``mechray sync`` / ``mechray repair``.
Reading: ``reader`` (:class:`ShardStore`, checksums verified, S3 cached locally).

Inside, a module imports only modules listed before it (no circle, lazy imports counted:
``tests/test_import_flow.py``): ``lazy``, ``s3``, ``files``, ``shard``, ``entry``, ``summary``,
``target``; ``manifest_format``; ``claim``; ``history``; ``sink``; ``manifest``; ``writer_pool``;
``transport``; ``reader`` and ``recovery``.

May import: ``mechray.config``, ``mechray.errors``. Never ``capture``, ``analysis`` or ``api``.
"""
