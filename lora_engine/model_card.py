"""The model card (``README.md``) ``PeftModel.save_pretrained`` writes next to the adapter, as peft 0.21.2 does.

An existing ``README.md`` is kept and only updated the way peft updates it: the YAML front matter gets
``library_name: peft``, the model's tags plus peft's (``transformers``, ``lora``, ``base_model:adapter:<name>``),
``base_model`` and, for a causal LM, ``pipeline_tag: text-generation`` unless one is set; the text gets a
``### Framework versions`` block naming the peft format version once. A new card starts from huggingface_hub's
template, as in peft. peft 0.21.2 never writes its quantization section (its check reads an attribute of a dict),
so neither do we: the cards are identical.
"""

from __future__ import annotations

import os

from torch import nn
from transformers import PreTrainedModel

from lora_engine.peft_format import PEFT_FORMAT_VERSION

README_NAME = "README.md"


def _tags(peft_model: nn.Module) -> list[str]:
    base_model = peft_model.get_base_model()
    tags = set(getattr(base_model, "model_tags", None) or [])
    if isinstance(base_model, PreTrainedModel):
        tags.add("transformers")
    tags.add("lora")
    if hasattr(base_model, "name_or_path"):
        tags.add(f"base_model:adapter:{base_model.name_or_path}")
    return sorted(tags)


def create_or_update_model_card(
    peft_model: nn.Module, output_dir: str | os.PathLike, causal_lm: bool
) -> None:
    """Write or update ``output_dir/README.md`` (the folder must exist) for ``peft_model``; see the module doc."""
    from huggingface_hub import ModelCard, ModelCardData  # a transformers dependency; only needed when saving

    filename = os.path.join(output_dir, README_NAME)
    card = ModelCard.load(filename) if os.path.exists(filename) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    card.data["tags"] = _tags(peft_model)
    if not card.data.pipeline_tag and causal_lm:
        card.data.pipeline_tag = "text-generation"
    config = getattr(peft_model, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    if "_name_or_path" in config_dict:
        card.data["base_model"] = config_dict["_name_or_path"]
    lines = card.text.splitlines()
    version_line = f"- PEFT {PEFT_FORMAT_VERSION}"
    heading = "### Framework versions"
    if version_line not in lines:
        if heading in lines:
            lines.insert(lines.index(heading) + 2, version_line)
        else:
            lines.append(f"{heading}\n\n{version_line}")
    card.text = "\n".join(lines)
    card.save(filename)
