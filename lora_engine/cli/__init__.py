"""The ``lora-engine`` command: ``main`` (the dispatcher and console entry point ``lora_engine.cli.main:main``),
``inspect`` and ``merge`` (one module per subcommand) and ``errors`` (``UsageError``, which every subcommand
raises). The ``demo`` subcommand lives in ``lora_engine.demo``, the ``bench`` one in ``lora_engine.bench``.

Nothing is imported here, so a subcommand importing ``lora_engine.cli.errors`` does not load the dispatcher.
"""
