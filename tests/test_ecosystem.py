"""transformers' Trainer, accelerate and pipelines see a lora_engine model as a peft model.

peft 0.21.2 runs the same scripts as the oracle. TRL has its own file (test_trl.py), torch.distributed too
(test_distributed.py); that `import lora_engine` loads no peft is in test_import_graph.py.
"""

import subprocess
import sys
import types

import peft
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import is_peft_model
from conftest import tiny_llama_config
from test_trainer import _history, _tied_llama, _TokenRows, _trainable
from transformers import LlamaForCausalLM, Trainer, TrainingArguments, pipeline
from transformers.trainer_utils import _is_peft_model
from trl_setup import tokenizer

import lora_engine
from lora_engine.integrations import recognition

TARGETS = ["q_proj", "v_proj"]


def _plain(library, lora_seed: int = 0):
    """A tied tiny Llama with LoRA and no task_type: a plain ``PeftModel``, whose forward is ``(*args, **kwargs)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora_seed)
        return library.get_peft_model(_tied_llama(), library.LoraConfig(target_modules=TARGETS))


def _trainer(model, output_dir, **overrides) -> Trainer:
    settings = dict(
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        use_cpu=True,
        report_to=[],
    )
    settings.update(overrides)
    args = TrainingArguments(str(output_dir), **settings)
    return Trainer(model=model, args=args, train_dataset=_TokenRows(), eval_dataset=_TokenRows())


def test_accelerate_and_transformers_checks_answer_true_for_our_peft_model():
    model = _plain(lora_engine)
    assert is_peft_model(model)
    assert _is_peft_model(model)
    assert not is_peft_model(model.get_base_model())
    assert is_peft_model(_plain(peft))  # peft's own models keep the libraries' own answer
    mixed = lora_engine.get_peft_model(
        _tied_llama(), lora_engine.LoraConfig(target_modules=TARGETS), mixed=True
    )
    assert _is_peft_model(mixed)  # transformers checks peft's PeftMixedModel too


# Imports lora_engine before or after the libraries, checks a plain model (our model classes not imported yet), then
# builds our PeftModel: the libraries' checks must answer False, then True, whichever came first.
_IMPORT_ORDER = """
import sys
first_ours = sys.argv[1] == "lora_engine first"
if first_ours:
    import lora_engine
from accelerate.utils import is_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.trainer_utils import _is_peft_model
if not first_ours:
    import lora_engine
base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1))
plain = (is_peft_model(base), _is_peft_model(base), "lora_engine.peft_model" in sys.modules)
model = lora_engine.get_peft_model(base, lora_engine.LoraConfig(target_modules=["q_proj"]))
print(plain, (is_peft_model(model), _is_peft_model(model)))
"""


@pytest.mark.parametrize("order", ["lora_engine first", "libraries first"])
def test_checks_learn_our_model_whether_lora_engine_is_imported_before_or_after_them(order, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_ORDER, order],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "(False, False, False) (True, True)"


def test_unsupported_library_layout_fails_loudly_naming_the_missing_check():
    renamed = types.ModuleType("trl.trainer.sft_trainer")
    renamed.is_peft_model_v2 = is_peft_model  # a future trl that renamed what we teach
    with pytest.raises(
        recognition.UnsupportedLibraryError, match=r"trl\.trainer\.sft_trainer.*is_peft_model"
    ):
        recognition.teach(renamed)


def test_stock_trainer_trains_a_peft_model_without_task_type_like_peft(tmp_path):
    expected = _trainer(_plain(peft), tmp_path / "peft")
    expected.train()
    model = _plain(lora_engine)
    actual = _trainer(model, tmp_path / "ours")
    actual.train()

    assert actual.label_names == expected.label_names == ["labels"]
    assert len(_history(actual, "loss")) == 4
    assert _history(actual, "loss") == pytest.approx(_history(expected, "loss"), rel=1e-5)
    ours, theirs = _trainable(model), _trainable(expected.model)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def test_stock_trainer_resumes_a_peft_model_without_task_type(tmp_path):
    straight = _plain(lora_engine)
    straight_trainer = _trainer(straight, tmp_path / "straight")
    straight_trainer.train()
    resumed = _plain(lora_engine, lora_seed=1)  # different init: only the checkpoint can make it match
    resumed_trainer = _trainer(resumed, tmp_path / "resumed")
    resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))

    assert _history(resumed_trainer, "loss") == _history(straight_trainer, "loss")
    for name, value in _trainable(straight).items():
        torch.testing.assert_close(_trainable(resumed)[name], value, rtol=0, atol=0, msg=name)


def test_stock_trainer_reloads_the_best_adapter_of_a_peft_model_without_task_type(tmp_path):
    overrides = dict(eval_strategy="steps", eval_steps=2, load_best_model_at_end=True)
    # Best = highest eval loss = checkpoint-2, so that reloading it visibly changes the weights.
    overrides.update(metric_for_best_model="eval_loss", greater_is_better=True)
    expected = _trainer(_plain(peft), tmp_path / "peft", **overrides)
    expected.train()
    model = _plain(lora_engine)
    actual = _trainer(model, tmp_path / "ours", **overrides)
    actual.train()

    assert actual.state.best_model_checkpoint.endswith("checkpoint-2")
    assert expected.state.best_model_checkpoint.endswith("checkpoint-2")
    best = lora_engine.PeftModel.from_pretrained(_tied_llama(), actual.state.best_model_checkpoint)
    ours = lora_engine.get_peft_model_state_dict(model)
    for name, value in lora_engine.get_peft_model_state_dict(best).items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=0, msg=name)
    theirs = peft.get_peft_model_state_dict(expected.model)
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-6, msg=name)


def _accelerate_losses(library, steps: int = 3) -> tuple[list[float], object]:
    accelerator = Accelerator(cpu=True)
    model = _plain(library)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rows = torch.utils.data.DataLoader(_TokenRows(), batch_size=4)
    model, optimizer, rows = accelerator.prepare(model, optimizer, rows)
    losses = []
    for _, batch in zip(range(steps), rows):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, accelerator.unwrap_model(model)


def test_accelerate_loop_trains_and_unwraps_to_our_peft_model_like_peft(tmp_path):
    expected, _ = _accelerate_losses(peft)
    actual, unwrapped = _accelerate_losses(lora_engine)

    assert actual == pytest.approx(expected, rel=1e-5)
    assert isinstance(unwrapped, lora_engine.PeftModel)
    unwrapped.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(_tied_llama(), str(tmp_path))
    input_ids = _TokenRows()[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(
            unwrapped.eval()(input_ids=input_ids).logits, reloaded.eval()(input_ids=input_ids).logits
        )


def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward():
    batch = {key: value[None] for key, value in _TokenRows()[1].items()}
    gradients = []
    for checkpointing in (False, True):
        model = _plain(lora_engine).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            assert model.get_base_model().is_gradient_checkpointing
        model(**batch).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    assert all(grad is not None for grad in gradients[1].values())
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, msg=name)


def test_text_generation_pipeline_runs_the_wrapped_model_like_peft():
    outputs = []
    for library in (peft, lora_engine):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            base = LlamaForCausalLM(tiny_llama_config())
            config = library.LoraConfig(
                target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM"
            )
            wrapped = library.get_peft_model(base, config).eval()
        generate = pipeline("text-generation", model=wrapped, tokenizer=tokenizer(), device="cpu")
        outputs.append(generate("the cat sat", max_new_tokens=6, do_sample=False)[0]["generated_text"])
    assert outputs[1] == outputs[0]
    assert outputs[0] != "the cat sat"
