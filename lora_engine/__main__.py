"""``python -m lora_engine ...``: the same as the ``lora-engine`` command."""

from lora_engine.cli.main import main

raise SystemExit(main())
