"""PegaFlow as SGLang's HiCache storage tier (docs/sglang.md).

SGLang loads :class:`PegaHiCacheStorage` through its own dynamic storage
backend, no patch::

    python -m sglang.launch_server --model-path MODEL --enable-hierarchical-cache \\
        --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config \\
        '{"backend_name":"pegaflow","module_path":"pegaflow.sglang","class_name":"PegaHiCacheStorage","interface_v1":1}'

Modules:

* :mod:`.storage`: the ``HiCacheStorage`` subclass (lookups, loads, saves).
* :mod:`.layout`: SGLang's host pool described as a ``KvCache`` layout; the
  namespace of its pages.
* :mod:`.keys`: SGLang's page hashes as PegaFlow keys.

Importing this package imports SGLang.
"""

from pegaflow.sglang.storage import PegaHiCacheStorage

__all__ = ["PegaHiCacheStorage"]
