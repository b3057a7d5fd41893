"""Hugging Face transformers: one line makes a causal LM train through fastce's fused loss.

    import fastce.hf
    fastce.hf.patch(model)     # any *ForCausalLM, or a PEFT / torch.compile wrapper of one
    fastce.hf.unpatch(model)   # undoes it

In a training forward (``model.training``) with ``labels``, the loss is
:func:`fastce.linear_cross_entropy` of the LM head's input, with the semantics of transformers'
``ForCausalLMLoss`` (labels shifted, ``shift_labels``, ``ignore_index``, ``num_items_in_batch``,
``logits_to_keep``), and the output's ``logits`` is ``None``: the (tokens x vocabulary) logits
never exist. Every other forward (eval mode, no labels, ``generate()``) is the model's own.

How, for every family at once: the model's own forward still runs, so its decoder call, output
type, cache and auxiliary losses stay as they are. Only the LM head and the loss function are
replaced, for the duration of a training forward with labels: the head keeps its input and
returns a small probe (a few fixed values per token) instead of the logits; the forward applies
its logit transforms to the probe and hands it to ``self.loss_function``, which computes the
fused loss from the kept input. The transforms fastce applies come from the config
(``final_logit_softcapping``, ``logit_scale``, ``logits_scaling``); in eager mode the probe's
values as they reach the loss are compared with fastce's transform of them, so a forward that
does something else raises instead of training on a different loss.
"""
import functools
import inspect
import types

import torch
from torch import nn

try:
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    from transformers.utils import ModelOutput
except ImportError as e:  # transformers is an optional dependency of fastce
    raise ImportError("fastce.hf needs transformers: pip install 'fastce[hf]'") from e

from .functional import cross_entropy
from .linear import linear_cross_entropy
from .token import CrossEntropyOutput

__all__ = ["patch", "unpatch"]

_STATE = "_fastce_hf"  # attribute of the patched model and of its LM head: their _Patch

_LOSS_OPTIONS = ("label_smoothing", "lse_square_scale", "chunk_size", "return_token_accuracy")
_FROM_CONFIG = ("logit_scale", "softcap")

# What the head returns instead of the logits in a fused forward. Magnitudes from 1 to 1000, so
# that the usual logit scales and softcaps (and much larger caps) change them measurably.
_PROBE = (1.0, -24.0, 1000.0)

_FUSED = "fused"  # training forward with labels: fused loss from the head's input, no logits
_LOGITS = "logits"  # the same with keep_logits=True: the model's logits, fastce.cross_entropy


class _Patch:
    """What patch() replaced on one model, and the hand-over from its LM head to its loss
    function during one forward."""

    def __init__(self, model, head, options, keep_logits):
        self.name = type(model).__name__
        self.head = head
        self.options = options
        self.keep_logits = keep_logits
        self.labels_at = _positional_index(_class_forward(model), "labels")
        self.old_forward = model.__dict__.get("forward")  # e.g. accelerate's hooks
        self.old_head_forward = head.__dict__.get("forward")
        self.forward_func = _forward_like(type(model).forward)
        self.checked = None  # the (logit_scale, softcap) the probe has confirmed
        self.start(None)

    def start(self, mode):
        self.mode = mode
        self.hidden = None  # the LM head's input, kept during a fused forward
        self.logits = None  # what the forward passed to its loss function as logits
        self.token_accuracy = None  # with return_token_accuracy: the loss's by-product
        self.head_calls = self.loss_calls = 0

    def finish(self):
        """Checks that the forward went through the head and the loss function once each."""
        if self.mode == _FUSED and self.head_calls != 1:
            raise RuntimeError(
                f"fastce.hf: {self.name}.forward did not call its output embeddings "
                f"(get_output_embeddings()) in a training forward with labels; fastce.hf "
                f"cannot compute its loss (unpatch the model)")
        if self.mode is not None and self.loss_calls != 1:
            raise RuntimeError(
                f"fastce.hf: {self.name}.forward called self.loss_function {self.loss_calls} "
                f"times in a training forward with labels, not once (it computes its loss in "
                f"its own way); fastce.hf cannot replace it (unpatch the model)")
        logits, accuracy = self.logits, self.token_accuracy
        self.start(None)
        return logits, accuracy


def patch(model, **options):
    """Makes ``model`` compute its training loss with fastce's fused LM-head loss; in place,
    returns ``model``.

    ``model``: a transformers causal LM (any ``*ForCausalLM``, GPT-2's ``LMHeadModel``, ...), a
    PEFT model around one, or ``torch.compile``'s wrapper of either (better: patch, then
    compile). Options, as in :func:`fastce.linear_cross_entropy`: ``label_smoothing``,
    ``lse_square_scale``, ``chunk_size``, ``return_token_accuracy`` (a training forward's output
    then has ``token_accuracy``: the fraction of its non-ignored labels whose argmax logit is
    right, a by-product of the loss); and ``keep_logits=True``, which keeps the model's
    logits in the output and computes the loss from them with :func:`fastce.cross_entropy`
    (for trainers that read the logits; no memory saved on them). ``logit_scale`` and
    ``softcap`` are read from the model's config.
    """
    if getattr(_unwrap(model), _STATE, None) is not None:
        raise RuntimeError(f"fastce.hf: this {type(_unwrap(model)).__name__} is already "
                           f"patched (fastce.hf.unpatch(model) first)")
    lm = _causal_lm(model)
    keep_logits = bool(options.pop("keep_logits", False))
    _check_options(options, keep_logits)
    head = _lm_head(lm)
    _logit_transform(lm.config)  # a bad config value is reported now, not at the first step
    state = _Patch(lm, head, options, keep_logits)
    setattr(lm, _STATE, state)
    setattr(head, _STATE, state)
    lm.forward = types.MethodType(state.forward_func, lm)
    head.forward = types.MethodType(_head_forward, head)
    lm.loss_function = types.MethodType(_loss_function, lm)
    return model


def unpatch(model):
    """Restores a model patched by :func:`patch`; returns ``model``."""
    lm = _unwrap(model)
    state = getattr(lm, _STATE, None)
    if state is None:
        raise RuntimeError(f"fastce.hf: this {type(lm).__name__} is not patched")
    # A forward that was wrapped again after patch() (accelerate's mixed precision does) stays,
    # and passes straight through once the state is gone.
    if getattr(lm.__dict__.get("forward"), "__func__", None) is state.forward_func:
        _restore(lm, "forward", state.old_forward)
    if getattr(state.head.__dict__.get("forward"), "__func__", None) is _head_forward:
        _restore(state.head, "forward", state.old_head_forward)
    if getattr(lm.__dict__.get("_loss_function"), "__func__", None) is _loss_function:
        del lm._loss_function
    delattr(state.head, _STATE)
    delattr(lm, _STATE)
    return model


# ---- what patch() accepts ---------------------------------------------------------------------


def _unwrap(model):
    """The transformers model inside torch.compile's and PEFT's wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    if not isinstance(model, PreTrainedModel) and callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()  # PEFT
    return model


def _causal_lm(model):
    lm = _unwrap(model)
    if not isinstance(lm, PreTrainedModel):
        raise TypeError(f"fastce.hf.patch expects a transformers causal LM (a PreTrainedModel, or "
                        f"a PEFT / torch.compile wrapper of one), got {type(model).__name__}")
    name = type(lm).__name__
    if getattr(lm.config, "is_encoder_decoder", False):
        raise TypeError(f"fastce.hf.patch: {name} is an encoder-decoder model, not a causal LM")
    if "_loss_function" in lm.__dict__:
        raise TypeError(f"fastce.hf.patch: {name} has its own loss_function; fastce.hf replaces "
                        f"transformers' ForCausalLMLoss only")
    loss_type = getattr(lm, "loss_type", None)
    if LOSS_MAPPING.get(loss_type, ForCausalLMLoss) is not ForCausalLMLoss:
        raise TypeError(f"fastce.hf.patch: {name} is not a causal LM (its loss is {loss_type})")
    return lm


def _lm_head(lm):
    """The output embedding, when it is a plain nn.Linear whose weight is materialized."""
    name = type(lm).__name__
    head = lm.get_output_embeddings()
    if head is None:
        raise TypeError(f"fastce.hf.patch: {name} has no output embeddings "
                        f"(get_output_embeddings() is None): not a causal LM with an LM head")
    if type(head) is not nn.Linear:
        raise ValueError(
            f"fastce.hf.patch: {name}'s LM head is a {type(head).__module__}."
            f"{type(head).__qualname__}, not a torch.nn.Linear; fastce.hf cannot compute its "
            f"logits (quantized heads and heads adapted by LoRA or modules_to_save are not "
            f"supported)")
    if head.weight.device.type == "meta":
        raise ValueError(f"fastce.hf.patch: {name}'s LM head weight is on the meta device "
                         f"(offloaded or not loaded yet)")
    return head


def _check_options(options, keep_logits):
    from_config = sorted(set(options) & set(_FROM_CONFIG))
    if from_config:
        raise TypeError(f"fastce.hf.patch: {from_config} come from the model's config "
                        f"(final_logit_softcapping, logit_scale, logits_scaling), not options")
    unknown = sorted(set(options) - set(_LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"fastce.hf.patch got unknown options {unknown}; it takes "
                        f"{sorted(_LOSS_OPTIONS + ('keep_logits',))}")
    if keep_logits and "chunk_size" in options:
        raise TypeError("fastce.hf.patch: chunk_size is an option of the fused loss; "
                        "keep_logits=True computes the loss from the logits")
    # Bad values are reported now by the loss itself, on a one-token problem.
    linear_cross_entropy(torch.zeros(1, 1), torch.zeros(2, 1), torch.zeros(1, dtype=torch.long),
                         **options)


def _logit_transform(config):
    """(logit_scale, softcap) of the model's final logits, from its (text) config."""
    config = config.get_text_config()
    scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    scale = 1.0 if scale is None else float(scale)
    divisor = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if divisor is not None:
        scale /= float(divisor)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3: c * tanh(z / c)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"fastce.hf: final_logit_softcapping must be positive, got {softcap}")
    return scale, None if softcap is None else float(softcap)


def _class_forward(model):
    return types.MethodType(type(model).forward, model)


def _positional_index(function, name):
    """Where argument `name` sits among `function`'s positional arguments (None: keyword only)."""
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [p for p in inspect.signature(function).parameters.values() if p.kind in positional]
    return next((i for i, p in enumerate(params) if p.name == name), None)


def _restore(module, name, old):
    if old is None:
        delattr(module, name)
    else:
        setattr(module, name, old)


# ---- the patched forward, head and loss --------------------------------------------------------


def _forward_like(class_forward):
    """The patched forward, with the signature of the class's forward (the Trainer and
    generate() read it). It closes over nothing of the model, so deep copies stay patched."""

    @functools.wraps(class_forward)
    def forward(model, *args, **kwargs):
        return _patched_forward(model, args, kwargs)

    return forward


def _patched_forward(model, args, kwargs):
    state = getattr(model, _STATE, None)
    if state is None:  # unpatched, but wrapped again after patch(): pass through
        return type(model).forward(model, *args, **kwargs)
    mode = _mode(model, state, args, kwargs)
    state.start(mode)
    if state.old_forward is not None:
        output = state.old_forward(*args, **kwargs)
    else:
        output = type(model).forward(model, *args, **kwargs)
    logits, accuracy = state.finish()
    output = _without(output, logits) if mode == _FUSED else output
    if accuracy is not None and isinstance(output, ModelOutput):
        output["token_accuracy"] = accuracy  # (as Liger's patched models return it)
    return output


def _mode(model, state, args, kwargs):
    labels = kwargs.get("labels")
    if labels is None and state.labels_at is not None and len(args) > state.labels_at:
        labels = args[state.labels_at]
    if not model.training or labels is None:
        return None
    if model.get_output_embeddings() is not state.head:
        raise RuntimeError(f"fastce.hf: {state.name}'s output embeddings were replaced after "
                           f"patch() (LoRA on the LM head?); unpatch, then patch again")
    return _LOGITS if state.keep_logits else _FUSED


def _without(output, logits):
    """The output with its logits (the probe) taken out, as if the model had returned None."""
    if isinstance(output, ModelOutput):
        return type(output)(**{k: v for k, v in output.items() if k != "logits"})
    return tuple(v for v in output if v is not logits)  # to_tuple() leaves None fields out


def _head_forward(head, input):
    state = getattr(head, _STATE, None)
    if state is None or state.mode != _FUSED:
        if state is not None and state.old_head_forward is not None:
            return state.old_head_forward(input)
        return nn.Linear.forward(head, input)
    state.head_calls += 1
    if state.head_calls > 1:
        raise RuntimeError(f"fastce.hf: {state.name}.forward calls its LM head more than once "
                           f"in a forward; fastce.hf supports one call (unpatch the model)")
    state.hidden = input
    return input.new_tensor(_PROBE).repeat(*input.shape[:-1], 1)


def _loss_function(model, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                   shift_labels=None, **kwargs):
    """transformers' ForCausalLMLoss, computed by fastce in a training forward."""
    state = getattr(model, _STATE, None)
    if state is None or state.mode is None:
        return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index,
                               shift_labels, **kwargs)
    state.loss_calls += 1
    state.logits = logits
    target = _shifted_labels(labels, shift_labels, ignore_index).reshape(-1)
    reduction = "mean" if num_items_in_batch is None else "sum"
    if state.mode == _LOGITS:
        loss = cross_entropy(logits.reshape(-1, vocab_size), target.to(logits.device),
                             ignore_index=ignore_index, reduction=reduction, **state.options)
    else:
        loss = _fused_loss(state, model.config, logits, vocab_size, target, ignore_index,
                           reduction)
    if isinstance(loss, CrossEntropyOutput):  # return_token_accuracy=True
        state.token_accuracy, loss = loss.token_accuracy, loss.loss
    return _normalized(loss, num_items_in_batch)


def _shifted_labels(labels, shift_labels, ignore_index):
    """Token t's target is label t + 1; the last token's is ignore_index. Only the labels are
    shifted, so the hidden states are used as they are."""
    if shift_labels is not None:
        return shift_labels
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _normalized(loss, num_items_in_batch):
    """ForCausalLMLoss's result: float32; the sum over num_items_in_batch when it is given."""
    loss = loss.float()
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _fused_loss(state, config, probe, vocab_size, target, ignore_index, reduction):
    head = state.head
    hidden = state.hidden
    if hidden is None:
        raise RuntimeError(f"fastce.hf: {state.name}.forward called its loss function before "
                           f"its LM head; fastce.hf cannot compute its loss (unpatch the model)")
    weight, bias = head.weight, head.bias
    if vocab_size != weight.shape[0] or weight.dim() != 2:
        raise RuntimeError(
            f"fastce.hf: {state.name} computes its loss over {vocab_size} classes, but its LM "
            f"head's weight has shape {tuple(weight.shape)}; fastce.hf cannot compute it")
    scale, softcap = _logit_transform(config)
    _check_probe(state, probe, scale, softcap)
    hidden, weight, bias = _autocast(hidden.to(weight.device), weight, bias)
    return linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, target.to(weight.device), linear_bias=bias,
        reduction=reduction, ignore_index=ignore_index, logit_scale=scale, softcap=softcap,
        **state.options)


def _autocast(hidden, weight, bias):
    """The LM head's operands as autocast would give them to nn.Linear (fastce's op is not
    autocast-aware itself)."""
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _check_probe(state, probe, scale, softcap):
    """In eager mode, once per transform: the probe went through the forward's logit
    transforms; they must be the ones fastce applies."""
    if state.checked == (scale, softcap) or torch.compiler.is_compiling():
        return
    width = len(_PROBE)
    if probe.shape[-1] != width:
        raise RuntimeError(
            f"fastce.hf: {state.name}.forward reshapes or slices the logits before its loss "
            f"(the LM head's {width} columns became {probe.shape[-1]}); fastce.hf cannot "
            f"compute its loss (unpatch the model)")
    if probe.numel():
        got = probe.detach().reshape(-1, width)[0].double().cpu()
        want = torch.tensor(_PROBE, dtype=torch.float64) * scale
        if softcap is not None:
            want = softcap * torch.tanh(want / softcap)
        # The forward may transform in 16 bits and upcast after: the lesser precision counts.
        exact = {probe.dtype, state.hidden.dtype} <= {torch.float32, torch.float64}
        if not torch.allclose(got, want, rtol=1e-5 if exact else 2e-2, atol=0):
            raise RuntimeError(
                f"fastce.hf: {state.name}.forward transforms the logits in a way fastce.hf "
                f"does not know: the LM head's values {list(_PROBE)} reached the loss as "
                f"{got.tolist()}; from the config (logit_scale={scale}, softcap={softcap}) "
                f"fastce would use {want.tolist()}. Training would compute a different loss "
                f"(unpatch the model)")
    state.checked = (scale, softcap)
