"""Mutations of adapter files and the judge of one load, shared by the fuzz tests (hypothesis, small) and
``scripts/reliability_campaign.py`` (thousands of cases).

``judge_load`` loads a mutated folder into a host model that already holds an adapter, and classifies the result:

- ``"refused"``: a ``ValueError``/``TypeError`` whose message names the config or the weights file, and the host
  is exactly as before (``model_fingerprint``);
- ``"loaded"``: the load succeeded and, checked independently from the raw files, every layer has the rank,
  alpha and scaling peft's rules give for the raw JSON (bools must be JSON bools), its factors equal the file's
  tensors, the base weights are untouched and the outputs finite;
- otherwise a ``Finding`` is raised: ``crash`` (any other exception), ``unnamed`` (an error that does not name
  the file), ``lost`` (a failed load changed the host), ``silent_wrong`` (a load that disagrees with the files).
"""

from __future__ import annotations

import json
import math
import random
import re
import struct
import warnings
from pathlib import Path

import torch
from reliability_helpers import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    assert_same_fingerprint,
    logits,
    model_fingerprint,
)
from safetensors.torch import load_file

SAVED_PREFIX = "base_model.model."
FUZZED = "fuzzed"

CONFIG_FIELDS = [
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out", "bias",
    "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "use_dora", "lora_bias", "peft_type", "task_type", "inference_mode",
    "base_model_name_or_path", "revision", "auto_mapping", "peft_version", "megatron_core", "loftq_config",
    "qalora_group_size", "ensure_weight_tying", "layer_replication", "target_parameters", "not_a_field",
]  # fmt: skip
NAN, INF = float("nan"), float("inf")
INTERESTING = [
    None, True, False, 0, 1, -1, 2, 4, 8, 16, 2**31, 10**7, 10**12, -10**9, 0.5, -0.0, 1e-300, 1e38, 1e39,
    1e308, -1e308, NAN, INF, -INF, "", "q_proj", "v_proj", "all-linear", "ALL-LINEAR", ".*", ".*q_proj",
    ".*\\.(q|v)_proj", "(a+)+$", "(.*)*x", "(a|a)*b", ".*.*.*.*.*.*.*.*!", "\\1", "[", "(?P<x>", "é",
    "\u202e", "none", "all", "lora_only", "gaussian", "pissa", "LORA", "CAUSAL_LM", "SEQ_CLS", "x" * 3000,
    [], ["q_proj"], ["q_proj", "v_proj"], ["k_proj"], ["lm_head"], [0], [1, 0], [-1], [True], [None], [[]],
    ["(a+)+"], {}, {"q_proj": 2}, {"q_proj": 4}, {"v_proj": 8}, {"q_proj": 1e308}, {"(a+)+$": 2},
    {"q_proj": True}, {"q_proj": NAN}, {"": 1}, {"q_proj": "2"}, {"q_proj": 10**7},
]  # fmt: skip
DTYPES = ["F32", "F16", "BF16", "F64", "I32", "U32", "I8", "U8", "BOOL", "I64", "F8_E4M3", "X9"]
BASE_KEYS = [
    "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
    "base_model.model.model.norm.weight",
    "base_model.model.lm_head.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.weight",
]


class Finding(AssertionError):
    """A property violation; ``kind`` is crash, unnamed, lost or silent_wrong."""

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        super().__init__(f"{kind}: {detail}")


# ---------------------------------------------------------------------------------------------------- mutations
def mutate_config_text(text: str, rng: random.Random) -> bytes:
    """1-3 random edits of a config file's JSON: field values, deletions, or damage to the bytes."""
    operation = rng.random()
    if operation < 0.08:
        data = bytearray(text.encode())
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    if operation < 0.12:
        return text.encode()[: rng.randrange(len(text))]
    if operation < 0.14:
        depth = rng.choice([10, 1000, 100_000])
        return ("[" * depth + "]" * depth).encode()
    if operation < 0.16:
        return rng.choice([b"[]", b"null", b"3", b'"x"', b"\xff\xfe{}", b'{"r": "\xc3\x28"}'])
    config = json.loads(text)
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(CONFIG_FIELDS)
        if rng.random() < 0.1:
            config.pop(field, None)
        elif rng.random() < 0.02:
            config[field] = [f"name_{index}" for index in range(rng.choice([5000, 100_000]))]
        else:
            config[field] = rng.choice(INTERESTING)
    return json.dumps(config).encode()


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_safetensors(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload


def mutate_weights_bytes(data: bytes, rng: random.Random) -> bytes:
    """One random corruption of a safetensors file: truncation, bit flips, random bytes, or a header edit
    (dtype, shape, offsets, keys that name base weights, metadata, length field)."""
    operation = rng.random()
    if operation < 0.12:
        return data[: rng.randrange(len(data))]
    if operation < 0.24:
        (length,) = struct.unpack("<Q", data[:8])
        mutable = bytearray(data)
        region = 8 + length if rng.random() < 0.7 else len(data)
        for _ in range(rng.randint(1, 3)):
            mutable[rng.randrange(region)] ^= 1 << rng.randrange(8)
        return bytes(mutable)
    if operation < 0.28:
        return bytes(rng.randrange(256) for _ in range(rng.choice([0, 7, 64, 4096])))
    if operation < 0.32:
        return struct.pack("<Q", rng.choice([0, 1, 2**63, len(data), 10**9])) + data[8:]
    header, payload = split_safetensors(data)
    keys = [key for key in header if key != "__metadata__"]
    key = rng.choice(keys)
    edit = rng.randrange(7)
    if edit == 0:
        header[key]["dtype"] = rng.choice(DTYPES)
    elif edit == 1:
        shape = header[key]["shape"]
        header[key]["shape"] = rng.choice(
            [
                [shape[0] * 2, shape[1]],
                [shape[1], shape[0]],
                [-1, shape[1]],
                [10**12, 32],
                shape[:1],
                "x",
                [shape[0]] + shape,
            ]
        )
    elif edit == 2:
        start, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = rng.choice(
            [[start, end + 4], [start + 4, end], [end, start], [0, end - start], "x", [start]]
        )
    elif edit == 3:
        header[rng.choice(BASE_KEYS)] = header.pop(key)
    elif edit == 4:
        header["__metadata__"] = rng.choice(
            [{"format": 1}, [], "x", {"lora_engine_config_sha256": "0" * 64}, None]
        )
    elif edit == 5:
        del header[key]
    else:
        header[key.replace("lora_A", "lora_Z")] = header.pop(key)
    return join_safetensors(header, payload)


def write_values_mutation(folder: Path, rng: random.Random) -> None:
    """Rewrite the weights with a value-level defect: NaN/Inf entries, or an integer/bool dtype."""
    from safetensors.torch import save_file

    weights = load_file(folder / WEIGHTS_FILE)
    key = rng.choice(sorted(weights))
    if rng.random() < 0.5:
        weights[key].view(-1)[rng.randrange(weights[key].numel())] = rng.choice([NAN, INF, -INF])
    else:
        weights[key] = weights[key].to(
            rng.choice([torch.int32, torch.uint8, torch.int8, torch.bool, torch.int64])
        )
    save_file(weights, folder / WEIGHTS_FILE, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------- judging
def judge_load(host, folder: Path) -> str:
    """Load ``folder`` into ``host`` as ``FUZZED`` and classify it (module docstring). On success the fuzzed
    adapter is deleted again, so ``host`` can be reused."""
    before = model_fingerprint(host)
    base_tensors = [
        (param, param.detach().clone()) for name, param in host.named_parameters() if "lora_" not in name
    ]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            host.load_adapter(folder, FUZZED)
    except (ValueError, TypeError) as error:
        message = str(error)
        if str(folder / CONFIG_FILE) not in message and str(folder / WEIGHTS_FILE) not in message:
            raise Finding("unnamed", f"{type(error).__name__}: {message[:300]}") from error
        try:
            assert_same_fingerprint(before, model_fingerprint(host))
        except AssertionError as changed:
            raise Finding(
                "lost", f"failed load changed the host ({changed}) after: {message[:200]}"
            ) from error
        return "refused"
    except Exception as error:  # noqa: BLE001 - every other exception is what we count
        raise Finding("crash", f"{type(error).__name__}: {str(error)[:300]}") from error
    try:
        _check_agrees_with_files(host, folder, base_tensors)
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            host.delete_adapter(FUZZED)
    return "loaded"


def _raw_pattern_value(patterns, module_name: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _check_agrees_with_files(host, folder: Path, base_tensors: list) -> None:
    raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    tensors = load_file(folder / WEIGHTS_FILE)
    rslora = raw.get("use_rslora", False)
    if rslora not in (True, False):
        raise Finding("silent_wrong", f"loaded with use_rslora={rslora!r}, not a JSON bool")
    for name, layer in host.base_model.lora_layers():
        if FUZZED not in layer.r:
            continue
        rank = _raw_pattern_value(raw.get("rank_pattern"), name, raw.get("r", 8))
        alpha = _raw_pattern_value(raw.get("alpha_pattern"), name, raw.get("lora_alpha", 8))
        if type(rank) is not int or not _is_plain_number(alpha) or layer.r[FUZZED] != rank:
            raise Finding("silent_wrong", f"{name}: r={layer.r[FUZZED]} from raw r={rank!r}, alpha={alpha!r}")
        scaling = alpha / (math.sqrt(rank) if rslora else rank)
        if not math.isfinite(scaling) or abs(scaling) > 3.4e38 or layer.scaling[FUZZED] != scaling:
            raise Finding(
                "silent_wrong", f"{name}: scaling {layer.scaling[FUZZED]} vs {scaling} from the file"
            )
        for key, value in layer.adapter_state_keys(FUZZED).items():
            saved = f"{SAVED_PREFIX}{name}.{key}"
            if saved in tensors and not torch.equal(
                layer.state_dict()[value].float(), tensors[saved].float()
            ):
                raise Finding("silent_wrong", f"{saved} differs from the file")
    for param, value in base_tensors:
        if not torch.equal(param, value):
            raise Finding("silent_wrong", f"a base tensor of shape {tuple(param.shape)} was overwritten")
    active = host.base_model.active_adapter
    host.base_model.set_adapter(FUZZED)
    try:
        if not torch.isfinite(logits(host)).all():
            raise Finding("silent_wrong", "non-finite outputs")
    finally:
        host.base_model.set_adapter(active)


def _is_plain_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
