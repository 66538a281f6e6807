"""SALE attention for Hugging Face ``transformers`` (5.x) models, through its ``AttentionInterface``.

Two ways in::

    import sale_ops.hf

    # 1. at load time: register the "sale" implementation, then load as usual
    sale_ops.hf.register(thresholds=1e-3)                     # process-wide default settings
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16, attn_implementation="sale")

    # 2. on a model that is already loaded (any attention implementation), with its own settings
    sale_ops.hf.enable(model, thresholds="llama8b.safetensors", dense_below=1024)
    ...
    sale_ops.hf.disable(model)                                # back to "sdpa"

Routing, per attention call (one layer, one forward pass):

- **SALE** (:func:`sale_ops.attention`, K/V passed with their ``Hkv`` heads, never repeated) for a
  causal prefill: more than one query, at least ``dense_below`` keys, fp16/bf16, head dim 64 or 128,
  no dropout, no gradient, and a mask that is either absent (plain causal) or exactly the
  bottom-right causal pattern (chunked prefill after a cache of ``Nk - Nq`` tokens).
- **exact attention** otherwise, through transformers' own ``sdpa`` path (so the result is what
  ``attn_implementation="sdpa"`` computes): decode (one query), short prompts, fp32 models, padded
  batches and any other non-causal mask, static-cache slots that are masked out, dropout
  (training), tensors that need gradients, soft-capping, sliding windows, attention sinks, position
  biases, paged caches, and modules without a ``layer_idx``.

The attention masks given to ``"sale"`` are those of ``"sdpa"`` (the same mask function is
registered under this name), which is what lets padded batches be detected and sent to the exact path.

Settings (:class:`SaleSettings`: thresholds per layer and query head, ``dense_below``, block sizes)
live in a small registry keyed by the model's config object (all attention modules of a model share
it; configs are not hashable, so the key is ``id(config)``, dropped when the config is garbage
collected). Models without their own settings use the process-wide default set by :func:`register`.
``sale_ops.hf.stats`` counts the calls per route (``"sale"``, ``"exact:<reason>"``).
"""

from __future__ import annotations

import collections
import os
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from . import _checks
from . import reference as ref
from .functional import DEFAULT_BK, DEFAULT_BQ, DEFAULT_WINDOW, attention

__all__ = [
    "NAME",
    "DEFAULT_THRESHOLD",
    "DEFAULT_DENSE_BELOW",
    "SaleSettings",
    "register",
    "enable",
    "disable",
    "settings_for",
    "capture",
    "stats",
]

NAME = "sale"
# Used when no calibration file is given: a middle value of SPEC §8's search range (0.008 halved
# ~3 times). Calibrate (python -m sale_ops.calibrate) for a known accuracy.
DEFAULT_THRESHOLD = 1e-3
# Prompts with fewer keys go to the model's exact attention (sdpa: cuDNN or FlashAttention on a
# GPU). Measured on an H100 (benchmarks/bench_breakeven.py, sessions 6 and 7): SALE beats cuDNN
# from ~16K keys at block density 0.1 (Llama-3.1-8B shape) and from ~48K at density 0.25, so below
# 32K keys the exact path is the faster one at the densities real prompts give. Evaluation and
# calibration pass dense_below=0 to study SALE itself.
DEFAULT_DENSE_BELOW = 32768

# Keyword arguments of transformers' attention call that SALE does not implement; any of them
# set (not None) sends the call to the exact path.
_UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "s_aux", "sinks", "position_bias", "cache")

stats: collections.Counter = collections.Counter()

Thresholds = Union[float, torch.Tensor, str, os.PathLike]


@dataclass(frozen=True)
class SaleSettings:
    """What the ``"sale"`` attention uses for one model.

    ``thresholds``: one float for every layer and head, or a float32 ``[layers, query heads]``
    tensor (CPU). ``dense_below``: prompts with fewer keys use exact attention. ``bq``, ``bk``,
    ``window``: as in :func:`sale_ops.attention`.
    """

    thresholds: Union[float, torch.Tensor] = DEFAULT_THRESHOLD
    dense_below: int = DEFAULT_DENSE_BELOW
    bq: int = DEFAULT_BQ
    bk: int = DEFAULT_BK
    window: int = DEFAULT_WINDOW

    def layer_thresholds(self, layer_idx: int, heads: int) -> Union[float, torch.Tensor]:
        """The ``[heads]`` thresholds of layer ``layer_idx`` (or the constant)."""
        if not isinstance(self.thresholds, torch.Tensor):
            return self.thresholds
        layers, table_heads = self.thresholds.shape
        if not 0 <= layer_idx < layers:
            raise ValueError(
                f"sale_ops.hf: argument 'thresholds' has {layers} layers but layer {layer_idx} asked for its thresholds"
            )
        if table_heads != heads:
            raise ValueError(
                f"sale_ops.hf: argument 'thresholds' has {table_heads} heads per layer but layer {layer_idx} "
                f"has {heads} query heads"
            )
        return self.thresholds[layer_idx]


def _make_settings(thresholds, dense_below, bq, bk, window, config=None) -> SaleSettings:
    """Checked :class:`SaleSettings`; a path is read with :func:`sale_ops.calibrate.load_thresholds`."""
    if isinstance(thresholds, (str, os.PathLike)):
        if config is None:
            raise ValueError(
                "sale_ops.hf.register: argument 'thresholds' cannot be a calibration file (it is checked against "
                "a model's layers and heads); use sale_ops.hf.enable(model, thresholds=path)"
            )
        from .calibrate import load_thresholds  # late import: calibrate imports this module

        thresholds = load_thresholds(thresholds, config)
    if isinstance(thresholds, torch.Tensor):
        if thresholds.dim() == 0:
            thresholds = float(thresholds)
        else:
            if thresholds.dim() != 2 or not thresholds.dtype.is_floating_point:
                raise ValueError(
                    "sale_ops.hf: argument 'thresholds' must be a float or a floating [layers, heads] tensor, "
                    f"got {thresholds.dtype} of shape {tuple(thresholds.shape)}"
                )
            thresholds = thresholds.detach().to("cpu", torch.float32).contiguous()
            _checks.check_tau_values("sale_ops.hf", thresholds.flatten(), "thresholds")
            if config is not None:
                _check_table(thresholds, config)
    elif isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        thresholds = float(thresholds)
    else:
        raise TypeError(
            "sale_ops.hf: argument 'thresholds' must be a float, a [layers, heads] tensor or a calibration "
            f"file path, got {type(thresholds).__name__}"
        )
    if isinstance(thresholds, float):
        _checks.check_tau_values("sale_ops.hf", torch.tensor([thresholds]), "thresholds")
    if isinstance(dense_below, bool) or not isinstance(dense_below, int) or dense_below < 0:
        raise ValueError(f"sale_ops.hf: argument 'dense_below' must be an int >= 0, got {dense_below!r}")
    _checks.check_blocks("sale_ops.hf", bq, bk, window)
    return SaleSettings(thresholds, dense_below, bq, bk, window)


def model_shape(config) -> tuple[int, int]:
    """``(layers, query heads)`` of a transformers config (its text config for multimodal models)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        return int(text.num_hidden_layers), int(text.num_attention_heads)
    except AttributeError as e:
        raise ValueError(f"sale_ops.hf: the model config has no {e.name!r}; cannot size per-layer thresholds") from e


def _check_table(thresholds: torch.Tensor, config) -> None:
    layers, heads = model_shape(config)
    if tuple(thresholds.shape) != (layers, heads):
        raise ValueError(
            f"sale_ops.hf: argument 'thresholds' has shape {tuple(thresholds.shape)} but the model has "
            f"{layers} layers x {heads} query heads"
        )


class _ModelState:
    """Per-model settings and, while :func:`capture` runs, the capture hook."""

    def __init__(self, settings: SaleSettings):
        self.settings = settings
        self.capture: Optional[Callable] = None


_DEFAULT = _ModelState(SaleSettings())
_STATES: dict[int, _ModelState] = {}
_registered = False


def _state(module) -> _ModelState:
    config = getattr(module, "config", None)
    return _STATES.get(id(config), _DEFAULT) if config is not None else _DEFAULT


def settings_for(model) -> SaleSettings:
    """The settings the ``"sale"`` attention uses for ``model`` (its own or the default)."""
    return _state(model).settings


def register(
    thresholds: Union[float, torch.Tensor, None] = None,
    *,
    dense_below: Optional[int] = None,
    bq: int = DEFAULT_BQ,
    bk: int = DEFAULT_BK,
    window: int = DEFAULT_WINDOW,
) -> None:
    """Register the ``"sale"`` attention (and its mask function) with transformers; idempotent.

    With arguments, also replace the process-wide default settings used by models that have none
    of their own (:func:`enable` gives a model its own). ``thresholds`` here is a float or a
    ``[layers, heads]`` tensor (a calibration file needs a model: use :func:`enable`).
    """
    global _registered
    if thresholds is not None or dense_below is not None:
        current = _DEFAULT.settings
        _DEFAULT.settings = _make_settings(
            current.thresholds if thresholds is None else thresholds,
            current.dense_below if dense_below is None else dense_below,
            bq,
            bk,
            window,
        )
    if _registered:
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise ImportError("sale_ops.hf needs transformers >= 5: pip install 'sale_ops[hf]'") from e
    AttentionInterface.register(NAME, sale_attention_forward)
    # Without a registered mask function transformers passes no mask at all to unknown
    # implementations, and padded batches could not be told apart from plain causal ones.
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def _attention_configs(model) -> list:
    """The distinct config objects that the attention modules of ``model`` read (plus the model's)."""
    configs = {id(model.config): model.config}
    for m in model.modules():
        if hasattr(m, "layer_idx") and getattr(m, "config", None) is not None:
            configs.setdefault(id(m.config), m.config)
    return list(configs.values())


def enable(
    model,
    thresholds: Thresholds = DEFAULT_THRESHOLD,
    *,
    dense_below: int = DEFAULT_DENSE_BELOW,
    bq: int = DEFAULT_BQ,
    bk: int = DEFAULT_BK,
    window: int = DEFAULT_WINDOW,
):
    """Switch a loaded transformers model to SALE attention with its own settings; returns ``model``.

    ``thresholds``: a float for every head, a ``[layers, query heads]`` tensor, or a calibration
    file from :mod:`sale_ops.calibrate` (checked against the model's layers and heads).
    Uses ``model.set_attn_implementation("sale")`` (transformers 5), which also checks that the
    model dispatches its attention through ``AttentionInterface``.
    """
    register()
    settings = _make_settings(thresholds, dense_below, bq, bk, window, config=model.config)
    for config in _attention_configs(model):
        key = id(config)
        _STATES[key] = _ModelState(settings)
        weakref.finalize(config, _STATES.pop, key, None)
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(
            f"sale_ops.hf.enable: argument 'model' ({type(model).__name__}) has no set_attn_implementation; "
            "it must be a transformers >= 5 PreTrainedModel"
        )
    model.set_attn_implementation(NAME)
    return model


def disable(model, attn_implementation: str = "sdpa"):
    """Switch ``model`` back to ``attn_implementation`` and forget its SALE settings; returns ``model``."""
    for config in _attention_configs(model):
        _STATES.pop(id(config), None)
    model.set_attn_implementation(attn_implementation)
    return model


class capture:
    """Context manager: while active, every prefill attention call of ``model`` (must use the
    ``"sale"`` implementation) computes exact attention and first calls
    ``hook(layer_idx, query, key, value, scaling)`` with the tensors SALE would get (used by
    :mod:`sale_ops.calibrate` so that errors of one layer do not feed the next)."""

    def __init__(self, model, hook: Callable):
        self.model, self.hook = model, hook
        self._added: list[int] = []

    def __enter__(self):
        for config in _attention_configs(self.model):
            key = id(config)
            if key not in _STATES:
                _STATES[key] = _ModelState(_DEFAULT.settings)
                self._added.append(key)
            _STATES[key].capture = self.hook
        return self

    def __exit__(self, *exc):
        for config in _attention_configs(self.model):
            state = _STATES.get(id(config))
            if state is not None:
                state.capture = None
        for key in self._added:
            _STATES.pop(key, None)
        return False


def _is_bottom_right_causal(mask: torch.Tensor, q_len: int, kv_len: int) -> bool:
    """True if the boolean ``[B, 1 or H, q_len, kv_len]`` mask is exactly SPEC §1's bottom-right
    causal pattern for every batch row (reads values: eager mode only)."""
    if mask.dtype != torch.bool or mask.dim() != 4 or tuple(mask.shape[-2:]) != (q_len, kv_len):
        return False
    if torch.compiler.is_compiling():
        return False
    causal = ref._visible(torch.arange(q_len, device=mask.device), q_len, kv_len)
    return bool(torch.equal(mask, causal.expand_as(mask)))


def _exact_reason(module, query, key, value, attention_mask, dropout, is_causal, kwargs, settings) -> Optional[str]:
    """Why this call cannot use SALE (None when it can)."""
    q_len = query.shape[2]
    if q_len <= 1:
        return "decode"
    if getattr(module, "layer_idx", None) is None:
        return "no_layer_idx"
    if query.dtype not in _checks.SUPPORTED_DTYPES:
        return "dtype"
    if query.shape[-1] not in _checks.SUPPORTED_HEAD_DIMS or key.shape[-1] != value.shape[-1]:
        return "head_dim"
    if query.device.type not in _checks.SUPPORTED_DEVICES:
        return "device"
    if dropout:
        return "dropout"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return "grad"  # the SALE ops have no backward
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        return "not_causal"
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return name
    if attention_mask is not None and not (
        isinstance(attention_mask, torch.Tensor) and _is_bottom_right_causal(attention_mask, q_len, key.shape[2])
    ):
        return "mask"
    if key.shape[2] < settings.dense_below:  # last: capture() takes calls refused only for this
        return "short"
    return None


def sale_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``"sale"`` attention function (transformers' ``AttentionInterface`` signature).

    ``query`` ``[B, Hq, Nq, D]``, ``key``/``value`` ``[B, Hkv, Nk, D]``; returns
    ``([B, Nq, Hq, D], None)``. See the module docstring for the routing.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _state(module)
    settings = state.settings
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if causal and attention_mask is None and 1 < q_len < key.shape[2]:
        # No mask with more keys than queries is a static cache's empty prefill: the keys past the
        # prompt are unwritten slots (sdpa crops them the same way).
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    reason = _exact_reason(module, query, key, value, attention_mask, dropout, is_causal, kwargs, settings)
    if state.capture is not None and reason in (None, "short"):
        # calibration sees every prefill SALE could serve, whatever the length
        reason = "capture"
        state.capture(module.layer_idx, query, key, value, scaling)
    if reason is not None:
        stats["exact:" + reason] += 1
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    tau = settings.layer_thresholds(module.layer_idx, query.shape[1])
    out = attention(
        query,
        key,
        value,
        tau,
        bq=settings.bq,
        bk=settings.bk,
        window=settings.window,
        scale=scaling,
    )
    stats["sale"] += 1
    return out.transpose(1, 2).contiguous(), None
